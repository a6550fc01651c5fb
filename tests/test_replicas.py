"""The hub presets from their real repository layouts, offline: shape-faithful replicas of both
repos of each preset (``tests/replicas.py``) in a Hugging Face cache, read with
``HF_HUB_OFFLINE=1`` by the README's merge command, ``inspect``, ``eval``, the app's logic and
the app itself."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from replicas import PAD_ROWS, REPLICAS, write_replica

from conftest import ROOT, CliRun, in_memory_equals_written, running_app, safetensors_in
from fusion import cli
from fusion.architectures import detect_layout
from fusion.merge import fuse
from studio import state
from studio.settings import Settings

PRESETS = list(REPLICAS)
ANSWER_TOKENS = 8  # random weights never stop on their own: short answers keep the tests quick


@dataclass(frozen=True)
class Hub:
    cache: Path

    @property
    def env(self) -> dict[str, str]:
        """For a subprocess: the replica cache, the hub turned off, the project importable from
        any working directory (as after ``pip install .``)."""
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return {"HF_HUB_CACHE": str(self.cache), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": path,
                "NF_MAX_NEW_TOKENS": str(ANSWER_TOKENS)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Hub:
    root = tmp_path_factory.mktemp("hub")
    for preset in PRESETS:
        write_replica(root / "cache", preset, root / "work")
    return Hub(root / "cache")


@pytest.fixture
def offline(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Hub:
    """This process reads the replica cache with the hub turned off, and fuses into tmp_path."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("NEURON_FUSION_CACHE", str(tmp_path / "fusion-cache"))
    return hub


# The real repositories' files (less README.md, .gitattributes, licences, pictures and files the
# library never fetches: Meta's original/ weights, Mistral's .bin copies, OneVision's
# video_processor/), as listed on the hub.
_SP_TOKENIZER = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
_QWEN_TOKENIZER = {"merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"}


def _shards(count: int, kind: str = "safetensors") -> set[str]:
    if kind == "bin":
        return {f"pytorch_model-{i:05d}-of-{count:05d}.bin" for i in range(1, count + 1)} | {"pytorch_model.bin.index.json"}
    return {f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)} | {"model.safetensors.index.json"}


REAL_FILES = {
    "llava-hf/llava-1.5-7b-hf": {"added_tokens.json", "chat_template.jinja", "chat_template.json", "config.json", "generation_config.json",
                                 "preprocessor_config.json", "processor_config.json"} | _SP_TOKENIZER | _shards(3),
    "lmsys/vicuna-7b-v1.5": {"config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"} | _shards(2, "bin"),
    "llava-hf/llava-1.5-13b-hf": {"added_tokens.json", "chat_template.json", "config.json", "generation_config.json", "preprocessor_config.json"}
    | _SP_TOKENIZER | _shards(6),
    "lmsys/vicuna-13b-v1.5": {"config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"} | _shards(3, "bin"),
    "xtuner/llava-llama-3-8b-v1_1-transformers": {"config.json", "generation_config.json", "preprocessor_config.json", "special_tokens_map.json",
                                                  "tokenizer.json", "tokenizer_config.json"} | _shards(4),
    "meta-llama/Meta-Llama-3-8B-Instruct": {"config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"} | _shards(4),
    "llava-hf/llava-v1.6-mistral-7b-hf": {"added_tokens.json", "chat_template.json", "config.json", "generation_config.json", "preprocessor_config.json",
                                          "processor_config.json"} | _SP_TOKENIZER | _shards(4),
    "mistralai/Mistral-7B-Instruct-v0.2": {"config.json", "generation_config.json"} | _SP_TOKENIZER | _shards(3),
    "llava-hf/llava-v1.6-vicuna-7b-hf": {"added_tokens.json", "chat_template.json", "config.json", "generation_config.json", "preprocessor_config.json",
                                         "processor_config.json"} | _SP_TOKENIZER | _shards(3),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": {"added_tokens.json", "chat_template.json", "config.json", "generation_config.json", "preprocessor_config.json",
                                                "processor_config.json", "special_tokens_map.json"} | _QWEN_TOKENIZER | _shards(4),
    "Qwen/Qwen2-7B-Instruct": {"config.json", "generation_config.json"} | _QWEN_TOKENIZER | _shards(4),
    "Qwen/Qwen2.5-VL-7B-Instruct": {"chat_template.json", "config.json", "generation_config.json", "preprocessor_config.json"} | _QWEN_TOKENIZER | _shards(5),
    "Qwen/Qwen2.5-7B": {"config.json", "generation_config.json"} | _QWEN_TOKENIZER | _shards(4),
    "bczhou/tiny-llava-v1-hf": {"config.json", "generation_config.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
                                "tokenizer_config.json"} | _shards(2),
    "PY007/TinyLlama-1.1B-Chat-v0.3": {"added_tokens.json", "config.json", "generation_config.json", "pytorch_model.bin", "special_tokens_map.json",
                                       "tokenizer.model", "tokenizer_config.json"},
}


def snapshot(hub: Hub, repo: str) -> Path:
    root = hub.cache / f"models--{repo.replace('/', '--')}"
    return root / "snapshots" / (root / "refs" / "main").read_text()


def test_replicas_have_the_real_file_layout(hub: Hub) -> None:
    assert {r for p in PRESETS for r in (REPLICAS[p]().tuned.repo_id, REPLICAS[p]().base.repo_id)} == set(REAL_FILES)
    for repo, files in REAL_FILES.items():
        assert {f.name for f in snapshot(hub, repo).iterdir()} == files, repo
    weight_map = json.loads((snapshot(hub, "lmsys/vicuna-7b-v1.5") / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert weight_map["model.layers.23.mlp.down_proj.weight"] == "pytorch_model-00001-of-00002.bin"
    assert weight_map["model.layers.24.self_attn.q_proj.weight"] == weight_map["lm_head.weight"] == "pytorch_model-00002-of-00002.bin"
    qwen = json.loads((snapshot(hub, "Qwen/Qwen2.5-VL-7B-Instruct") / "model.safetensors.index.json").read_text())["weight_map"]
    per_shard = [sum(1 for f in qwen.values() if f == f"model-{i:05d}-of-00005.safetensors") for i in range(1, 6)]
    assert per_shard == [436, 97, 97, 98, 1] and qwen["lm_head.weight"].startswith("model-00005")  # the real index's counts
    assert any(k.startswith("visual.blocks.31.") for k in qwen) and "model.layers.27.mlp.down_proj.weight" in qwen


def readme_merge_commands() -> dict[str, str]:
    """The README's one merge command per preset (``--out fused/PRESET``), by preset."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"^(python -m fusion merge --tuned \S+ --base \S+ --method neu-p-taska --out fused/(\S+))$", text, re.MULTILINE)
    return {preset: command for command, preset in found}


@pytest.mark.parametrize("preset", PRESETS)
def test_readme_merge_command_runs_verbatim(preset: str, offline: Hub, tmp_path: Path) -> None:
    """The preset's README command as it stands, in a shell: the output holds every tensor of the
    tuned model, the vision modules byte for byte and its own vocabulary rows, merged language
    model layers, and loads with the tuned model's own class."""
    from transformers import AutoModelForImageTextToText

    replica = REPLICAS[preset]()
    command = readme_merge_commands()[preset]
    assert f"--tuned {replica.tuned.repo_id} --base {replica.base.repo_id} " in command
    run = subprocess.run(command, shell=True, cwd=tmp_path, env={**os.environ, **offline.env}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "fused" / preset
    assert json.loads((out / "fusion_recipe.json").read_text())["params"]["inner"] == "task_arithmetic"
    source = snapshot(offline, replica.tuned.repo_id)
    for sidecar in replica.tuned.sidecars:
        assert (out / sidecar).read_bytes() == (source / sidecar).read_bytes(), sidecar
    fused, tuned = safetensors_in(out), safetensors_in(source)
    assert fused.keys() == tuned.keys()
    layout = detect_layout(list(tuned))
    copied = [k for k in tuned if layout.base_key(k) is None]
    assert copied and all(k.startswith(layout.shared) for k in copied), "every copied tensor is one of the layout's shared modules"
    assert all(torch.equal(fused[k], tuned[k]) for k in copied)
    head = layout.tuned_key("lm_head.weight")
    assert torch.equal(fused[head][-PAD_ROWS:], tuned[head][-PAD_ROWS:]) if tuned[head].shape[0] > replica.base.config["vocab_size"] else True
    merged = [k for k in tuned if layout.base_key(k) is not None and not torch.equal(fused[k], tuned[k])]
    assert len(merged) > len(tuned) // 3, "the language model really was merged"
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == replica.tuned.config["architectures"][0]


def test_pickle_bases_can_be_refused(offline: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable[..., CliRun]) -> None:
    """Vicuna v1.5 ships only pickle shards: the notice names them, and ``--no-pickle`` refuses them in one line."""
    command = readme_merge_commands()["llava-1.5-7b"]
    monkeypatch.chdir(tmp_path)
    refused = cli(*shlex.split(command)[3:], "--no-pickle")  # the words after "python -m fusion"
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--no-pickle" in refused.stderr and "pytorch_model-00001-of-00002.bin" in refused.stderr
    read = cli(*shlex.split(command)[3:], "--quiet")
    assert read.returncode == 0 and "pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin" in read.stderr and "weights_only" in read.stderr


@pytest.mark.parametrize(
    ("tuned", "base", "field"),
    [
        ("llava-hf/llava-1.5-13b-hf", "lmsys/vicuna-7b-v1.5", "hidden_size"),  # the right family, the wrong size
        ("Qwen/Qwen2.5-VL-7B-Instruct", "lmsys/vicuna-7b-v1.5", "model_type"),  # another family
        ("llava-hf/llava-v1.6-mistral-7b-hf", "meta-llama/Meta-Llama-3-8B-Instruct", "model_type"),
    ],
)
def test_a_pair_not_tuned_from_its_base_is_one_line(tuned: str, base: str, field: str, offline: Hub, tmp_path: Path, cli: Callable[..., CliRun]) -> None:
    run = cli("merge", "--tuned", tuned, "--base", base, "--method", "neu-p-taska", "--out", str(tmp_path / "out"), "--quiet")
    errors = [line for line in run.stderr.splitlines() if not line.startswith("note: ")]  # Vicuna's pickle notice may come first
    assert run.returncode == 2 and len(errors) == 1, run.stderr
    assert errors[0].startswith(f"error: the language models differ in {field}") and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_fields_a_family_lets_differ_are_reported_and_merged(offline: Hub, tmp_path: Path, cli: Callable[..., CliRun]) -> None:
    """Qwen2.5-VL's context length, sliding window and multimodal rope differ from Qwen2.5-7B's:
    said once, merged all the same."""
    run = cli("merge", "--tuned", "Qwen/Qwen2.5-VL-7B-Instruct", "--base", "Qwen/Qwen2.5-7B", "--method", "ties", "--out", str(tmp_path / "out"), "--quiet")
    assert run.returncode == 0, run.stderr
    note = next(line for line in run.stderr.splitlines() if "differ where qwen2 models may" in line)
    assert "max_position_embeddings (tuned 128000, base 131072)" in note and "sliding_window (tuned 32768, base 131072)" in note and "mrope" in note


@pytest.mark.parametrize("preset", PRESETS)
def test_inspect_and_eval_offline(preset: str, offline: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    replica = REPLICAS[preset]()
    assert cli.main(["inspect", "--tuned", replica.tuned.repo_id, "--base", replica.base.repo_id]) == 0
    table = capsys.readouterr().out
    layers = replica.base.config["num_hidden_layers"]
    assert re.search(rf"^\s+{layers - 1}\s+ffn\s", table, re.MULTILINE) and "neurons located" in table

    out = tmp_path / "bench"
    assert cli.main(["eval", "--preset", preset, "--limit", "1", "--methods", "neu-p-taska", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in rows] == ["base", "tuned", "fused"]
    assert all(isinstance(r["language_accuracy"], float) for r in rows)
    assert rows[0]["visual_accuracy"] is None and all(isinstance(r["visual_accuracy"], float) for r in rows[1:])


# What each processor hands its model for one picture, besides input_ids and pixel_values.
IMAGE_INPUTS = {"llava_next": {"image_sizes"}, "llava_onevision": {"image_sizes"}, "qwen2_5_vl": {"image_grid_thw"}, "llava": set()}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "tiny-llava-1.4b"])  # its processor is llava-1.5's, tested there
def test_images_go_through_each_models_own_processor(preset: str, offline: Hub) -> None:
    """A large picture becomes the model's own inputs (tiles and their sizes, or Qwen's patch
    grid within the library's token cap), as many image tokens in the prompt as the model
    expects, and answers that depend on the pixels."""
    from PIL import Image

    from fusion.inference import MAX_IMAGE_TOKENS, ChatModel

    replica = REPLICAS[preset]()
    model = ChatModel.load(replica.tuned.repo_id, True)
    picture = Image.open(ROOT / "assets" / "examples" / "cat.jpg").convert("RGB").resize((3000, 2000))
    inputs = model._inputs([model.prompt("What is in the picture?", True)], [picture])
    assert IMAGE_INPUTS[replica.tuned.config["model_type"]] <= set(inputs)
    image_token = model.model.config.image_token_id
    tokens = int((inputs["input_ids"] == image_token).sum())
    if "image_grid_thw" in inputs:
        assert tokens == int(inputs["image_grid_thw"].prod()) // 4 <= MAX_IMAGE_TOKENS  # 2x2 patches merged per token
    else:
        assert tokens > 576 if "image_sizes" in inputs else tokens == 576  # tiles beyond the thumbnail, or one 336-px view
    with torch.inference_mode():
        seen = model.model(**inputs).logits[0, -1]
        blank = model.model(**model._inputs([model.prompt("What is in the picture?", True)], [Image.new("RGB", picture.size)])).logits[0, -1]
    assert not torch.allclose(seen, blank), "the answer does not depend on the picture"


# How each preset's prompt for an image question begins its user turn: the repo's own chat
# template, or (XTuner's LLaVA-Llama-3 ships none) Llama 3's format, which it was tuned on.
USER_TURN = {
    "llava-1.5-7b": "USER: <image>\n", "llava-1.5-13b": "USER: <image>\n", "tiny-llava-1.4b": "USER: <image>\n",
    "llava-llama-3-8b": "<|start_header_id|>user<|end_header_id|>\n\n<image>\n", "llava-v1.6-mistral-7b": "[INST] <image>\n",
    "llava-v1.6-vicuna-7b": "USER: <image>\n", "llava-onevision-qwen2-7b": "<|im_start|>user <image>\n",
    "qwen2.5-vl-7b": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>",
}


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_asks_in_its_own_chat_format(preset: str, offline: Hub) -> None:
    from fusion.inference import ChatModel

    model = ChatModel.load(REPLICAS[preset]().tuned.repo_id, True)
    prompt = model.prompt("Is there a dog?", True, history=[("Hello", "Hi")])
    assert prompt.count(USER_TURN[preset]) == 1 and "Is there a dog?" in prompt and "Hi" in prompt, prompt


# The modules a preset's fused model borrows from its original (``SHARED_MODULES`` present in its class).
SHARED = {preset: ["visual"] if preset.startswith("qwen") else ["vision_tower", "multi_modal_projector"] for preset in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_studio_loads_each_preset_and_all_three_columns_answer(preset: str, offline: Hub, tmp_path: Path) -> None:
    studio = state.Studio(Settings(preset, device="cpu", max_new_tokens=ANSWER_TOKENS), log=lambda line: None)
    studio.load()
    assert studio.status.state == "ready", studio.status
    pair = studio.ready()
    assert pair.preset.name == preset and studio.status.notice == ""
    assert pair.shared == SHARED[preset] and all(getattr(pair.fused.model.model, m) is getattr(pair.original.model.model, m) for m in pair.shared)
    written = fuse(pair.preset.tuned, pair.preset.base, pair.default.recipe, out=tmp_path / "fused", device="cpu")
    assert in_memory_equals_written(pair, written.path) == len(pair.open_checkpoints()[0].keys())
    text = studio.compare("What is the capital of France?")
    image = studio.compare("Is there a dog in the image?", ROOT / "assets" / "examples" / "cat.jpg", image_required=True)
    for result in (text, image):
        assert result["preset"] == preset and isinstance(result["original"]["answer"], str) and isinstance(result["fused"]["answer"], str)
    _, stream = studio.chat("What is the capital of France?", [[], [], []], with_base=True)
    answers = list(stream)[-1]
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "tiny-llava-1.4b"])  # the CPU preset runs in full precision
def test_each_preset_in_4bit_on_a_cpu(preset: str, offline: Hub) -> None:
    """Both models' language layers in nf4, their vision modules in full precision and shared, a
    visitor's variant built in 4-bit, every column answering text and an image."""
    from bitsandbytes.nn import Linear4bit

    studio = state.Studio(Settings(preset, device="cpu", max_new_tokens=ANSWER_TOKENS, load_4bit=True), log=lambda line: None)
    studio.load()
    assert studio.status.state == "ready" and "4-bit nf4" in studio.status.message, studio.status
    pair = studio.ready()
    for model in (pair.original.model, pair.fused.model):
        linear = [m for m in model.model.language_model.layers.modules() if isinstance(m, torch.nn.Linear)]
        assert linear and all(isinstance(m, Linear4bit) for m in linear)
        assert not any(isinstance(m, Linear4bit) for name in pair.shared for m in getattr(model.model, name).modules())
    assert pair.shared == SHARED[preset]
    variant = studio.fuse_variant("ties", {"density": 0.5}, owner="127.0.0.1/visitor")
    assert variant.model.model is not pair.fused.model and isinstance(variant.model.model.model.language_model.layers[0].mlp.up_proj, Linear4bit)
    assert all(getattr(variant.model.model.model, m) is getattr(pair.original.model.model, m) for m in pair.shared)
    image = studio.compare("Is there a dog in the image?", ROOT / "assets" / "examples" / "cat.jpg", image_required=True)
    assert isinstance(image["original"]["answer"], str) and isinstance(image["fused"]["answer"], str)


def test_app_starts_on_the_paper_pair_in_4bit_on_a_cpu(hub: Hub, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    with running_app(tmp_path, "llava-1.5-7b", ["--4bit"], hub.env) as app:
        client = Client(app.url, verbose=False)
        status = client.predict(api_name="/status")
        assert status["state"] == "ready" and status["message"].startswith("ready: LLaVA-1.5 and its base Vicuna-7B-v1.5, fused with neu-p-taska, 4-bit nf4 (preset llava-1.5-7b)")
        assert status["notice"] == ""
        text = client.predict("What is the capital of France?", api_name="/compare_text")
        image = client.predict(handle_file(str(ROOT / "assets" / "examples" / "cat.jpg")), "Is there a dog?", api_name="/compare_image")
        assert text["preset"] == image["preset"] == "llava-1.5-7b"
        assert all(isinstance(r[k]["answer"], str) for r in (text, image) for k in ("original", "fused"))

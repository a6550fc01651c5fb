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
from replicas import REPLICAS, write_replica
from safetensors.torch import load_file

from conftest import ROOT, CliRun, running_app
from fusion import cli
from fusion.architectures import SHARED_MODULES
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


# The real repositories' files (less README.md and .gitattributes), as listed on the hub.
REAL_FILES = {
    "llava-hf/llava-1.5-7b-hf": {
        "added_tokens.json", "chat_template.jinja", "chat_template.json", "config.json", "generation_config.json",
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
        "model.safetensors.index.json", "preprocessor_config.json", "processor_config.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    },
    "lmsys/vicuna-7b-v1.5": {
        "config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json",
    },
    "bczhou/tiny-llava-v1-hf": {
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    },
    "PY007/TinyLlama-1.1B-Chat-v0.3": {
        "added_tokens.json", "config.json", "generation_config.json", "pytorch_model.bin", "special_tokens_map.json",
        "tokenizer.model", "tokenizer_config.json",
    },
}


def test_replicas_have_the_real_file_layout(hub: Hub) -> None:
    for repo, files in REAL_FILES.items():
        root = hub.cache / f"models--{repo.replace('/', '--')}"
        revision = (root / "refs" / "main").read_text()
        assert {f.name for f in (root / "snapshots" / revision).iterdir()} == files, repo
    vicuna = next((hub.cache / "models--lmsys--vicuna-7b-v1.5" / "snapshots").iterdir())
    weight_map = json.loads((vicuna / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert weight_map["model.layers.23.mlp.down_proj.weight"] == "pytorch_model-00001-of-00002.bin"
    assert weight_map["model.layers.24.self_attn.q_proj.weight"] == weight_map["lm_head.weight"] == "pytorch_model-00002-of-00002.bin"


def readme_merge_command() -> str:
    """The README's first ``python -m fusion merge`` command, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^python -m fusion merge (?:.*\\\n)*.*$", text, re.MULTILINE)
    assert match, "README.md shows no merge command"
    return match.group(0).replace("\\\n", " ")


def test_readme_merge_command_runs_verbatim(offline: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable[..., CliRun]) -> None:
    """The README's command as it stands, in a shell; then, in this process (the same replica
    cache: ``offline``), with ``--no-pickle`` added."""
    command = readme_merge_command()
    assert "llava-hf/llava-1.5-7b-hf" in command and "lmsys/vicuna-7b-v1.5" in command
    run = subprocess.run(command, shell=True, cwd=tmp_path, env={**os.environ, **offline.env}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin" in run.stderr and "weights_only" in run.stderr
    out = tmp_path / shlex.split(command)[shlex.split(command).index("--out") + 1]
    assert json.loads((out / "fusion_recipe.json").read_text())["params"]["inner"] == "task_arithmetic"
    for sidecar in ("tokenizer.json", "tokenizer.model", "chat_template.json", "processor_config.json", "preprocessor_config.json"):
        assert (out / sidecar).is_file()
    snapshot = next((offline.cache / "models--llava-hf--llava-1.5-7b-hf" / "snapshots").iterdir())
    fused = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    tuned = {k: v for f in snapshot.glob("*.safetensors") for k, v in load_file(f).items()}
    assert fused.keys() == tuned.keys()
    vision = [k for k in tuned if not k.startswith("language_model.")]
    assert vision and all(torch.equal(fused[k], tuned[k]) for k in vision)
    # the 64 padding rows of the vocabulary come from the tuned model unchanged
    assert torch.equal(fused["language_model.lm_head.weight"][-64:], tuned["language_model.lm_head.weight"][-64:])
    assert not torch.equal(fused["language_model.lm_head.weight"], tuned["language_model.lm_head.weight"])

    monkeypatch.chdir(tmp_path)  # the README's --out is relative
    refused = cli(*shlex.split(command.replace("fused/", "refused/"))[3:], "--no-pickle")  # the words after "python -m fusion"
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--no-pickle" in refused.stderr and "pytorch_model-00001-of-00002.bin" in refused.stderr


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


@pytest.mark.parametrize("preset", PRESETS)
def test_studio_loads_each_preset_and_all_three_columns_answer(preset: str, offline: Hub) -> None:
    studio = state.Studio(Settings(preset, device="cpu", max_new_tokens=ANSWER_TOKENS), log=lambda line: None)
    studio.load()
    assert studio.status.state == "ready", studio.status
    assert studio.ready().preset.name == preset and studio.status.notice == ""
    assert studio.ready().shared == list(SHARED_MODULES)
    text = studio.compare("What is the capital of France?")
    image = studio.compare("Is there a dog in the image?", ROOT / "assets" / "examples" / "cat.jpg", image_required=True)
    for result in (text, image):
        assert result["preset"] == preset and isinstance(result["original"]["answer"], str) and isinstance(result["fused"]["answer"], str)
    _, stream = studio.chat("What is the capital of France?", [[], [], []], with_base=True)
    answers = list(stream)[-1]
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


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

"""The app's logic (the ``studio`` package) on the bundled pocket pair (no server, no browser)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

from fusion import plots
from fusion.architectures import LLAVA_IN_MEMORY, SHARED_MODULES, layout_named
from fusion.merge import Progress, fuse
from fusion.presets import ASSETS, get_preset
from fusion.registry import METHOD_NAMES, schema
from studio import StudioError, chat, state, view
from studio.settings import Settings, parse_settings

QUESTION = "What is the opposite of hot?"


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> state.Studio:
    cache = tmp_path_factory.mktemp("cache")
    with mock.patch.dict(os.environ, {"NEURON_FUSION_CACHE": str(cache)}):
        s = state.Studio(Settings("pocket", device="cpu"), log=lambda line: None)
        s.load()
        yield s


# settings and names


def test_settings_from_flags_and_env() -> None:
    assert parse_settings([], {}, cuda=False).preset == "pocket"
    assert parse_settings([], {}, cuda=True).preset == "llava-1.5-7b"
    env = {"NF_PRESET": "pocket", "NF_METHOD": "ties", "NF_4BIT": "1", "NF_DEVICE": "cpu", "NF_QUEUE_SIZE": "5"}
    assert parse_settings([], env, cuda=True) == Settings("pocket", "ties", True, "cpu", 2, 5)
    assert parse_settings(["--max-new-tokens", "16"], env).max_new_tokens == 16 == parse_settings([], {**env, "NF_MAX_NEW_TOKENS": "16"}).max_new_tokens
    flags = parse_settings(["--preset", "llava-1.5-7b", "--method", "dare", "--device", "cuda"], env, cuda=False)
    assert (flags.preset, flags.method, flags.device, flags.load_4bit) == ("llava-1.5-7b", "dare", "cuda", True)


def test_titles_name_the_method() -> None:
    preset = get_preset("llava-1.5-7b")
    assert view.titles(preset, "neu-p-taska")[:2] == ("LLaVA-1.5 (original)", "LLaVA-1.5 + Neuron-Fusion")
    assert view.fused_title(preset, "ties") == "LLaVA-1.5 + ties"


# input checks


@pytest.mark.parametrize(("message", "says"), [("", "empty"), ("   \n", "empty"), (None, "empty"), ("x" * (chat.MAX_MESSAGE_CHARS + 1), "limit")])
def test_bad_messages(message: str | None, says: str) -> None:
    with pytest.raises(StudioError, match=says):
        chat.check_message(message)


def test_bad_images(tmp_path: Path) -> None:
    with pytest.raises(StudioError, match="upload one"):
        chat.load_image(None)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(StudioError, match="not an image"):
        chat.load_image(tmp_path / "notes.png")
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.truncate(chat.MAX_IMAGE_BYTES + 1)
    with pytest.raises(StudioError, match="MB"):
        chat.load_image(tmp_path / "huge.jpg")
    Image.new("1", (8000, 5000)).save(tmp_path / "wide.png")
    with pytest.raises(StudioError, match="megapixels"):
        chat.load_image(tmp_path / "wide.png")
    assert chat.load_image(ASSETS / "examples" / "cat.jpg").mode == "RGB"


# loading


def test_loads_and_shares_the_vision_tower(studio: state.Studio) -> None:
    assert studio.status.state == "ready" and studio.status.seconds is not None
    pair = studio.ready()
    assert pair.shared == list(SHARED_MODULES)
    for name in SHARED_MODULES:
        assert getattr(pair.fused.model.model, name) is getattr(pair.original.model.model, name)
    assert pair.default.report, "Neuron-Fusion reports what it located"


def test_in_memory_fusion_equals_the_written_checkpoint(studio: state.Studio, tmp_path: Path) -> None:
    """The default variant, built in memory, holds exactly the tensors ``fuse`` writes to disk."""
    from safetensors.torch import load_file

    pair = studio.ready()
    written = fuse(pair.preset.tuned, pair.preset.base, pair.default.recipe, out=tmp_path / "fused", device="cpu")
    on_disk = {k: v for f in written.path.glob("*.safetensors") for k, v in load_file(f).items()}
    in_memory = pair.fused.model.state_dict()
    layout = layout_named(LLAVA_IN_MEMORY)
    compared = 0
    for name, tensor in on_disk.items():
        base_name = layout_named("llava").base_key(name) if name.startswith("language_model.") else None
        key = layout.tuned_key(base_name) if base_name else "model." + name
        assert torch.equal(in_memory[key], tensor), key
        compared += 1
    assert compared == len(on_disk) and written.recipe["key"] == pair.default.key


def test_unknown_preset_falls_back_to_pocket(tmp_path: Path) -> None:
    with mock.patch.dict(os.environ, {"NEURON_FUSION_CACHE": str(tmp_path)}):
        s = state.Studio(Settings("no-such-preset", device="cpu"), log=lambda line: None)
        s.load()
    assert s.status.state == "ready" and s.ready().preset.name == "pocket"
    assert "Preset 'no-such-preset' could not load: unknown preset 'no-such-preset'" in s.status.notice
    assert "hub" not in s.status.notice


def test_4bit_on_a_cpu_quantizes_both_models_and_answers(tmp_path: Path) -> None:
    from bitsandbytes.nn import Linear4bit

    with mock.patch.dict(os.environ, {"NEURON_FUSION_CACHE": str(tmp_path)}):
        s = state.Studio(Settings("pocket", load_4bit=True, device="cpu"), log=lambda line: None)
        s.load()
    assert s.status.state == "ready" and s.load_4bit and "full precision" not in s.status.notice
    pair = s.ready()
    for model in (pair.original.model, pair.fused.model):
        layers = model.model.language_model.layers
        linear = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        assert linear and all(isinstance(m, Linear4bit) for m in linear)
        assert not any(isinstance(m, Linear4bit) for m in model.model.vision_tower.modules())
    assert pair.shared == list(SHARED_MODULES)
    assert pair.fused.model.model.vision_tower is pair.original.model.model.vision_tower
    out = s.compare(QUESTION)
    assert out["original"]["answer"] and out["fused"]["answer"]


def test_4bit_without_bitsandbytes_says_so(tmp_path: Path) -> None:
    with mock.patch.object(state, "bitsandbytes_missing", return_value=True):
        s = state.Studio(Settings("pocket", load_4bit=True, device="cpu"), log=lambda line: None)
    assert not s.load_4bit and "pip install bitsandbytes" in s.status.notice


def test_load_errors_name_the_real_cause() -> None:
    from fusion.errors import FusionError

    missing = FusionError("lmsys/vicuna-7b-v1.5/tokenizer.model: reading this tokenizer needs the Python package(s) sentencepiece")
    assert state.explain_load_error("llava-1.5-7b", missing).endswith("needs the Python package(s) sentencepiece")
    module = ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece")
    assert "pip install sentencepiece" in state.explain_load_error("llava-1.5-7b", module)
    for err in (missing, module, OSError("config.json not found")):
        assert "hub" not in state.explain_load_error("llava-1.5-7b", err)
    assert "out of memory" in state.explain_load_error("big", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))


def test_not_ready_is_explained() -> None:
    with pytest.raises(StudioError, match="still loading"):
        state.Studio(Settings("pocket", device="cpu"), log=lambda line: None).ready()


# asking


def test_compare_shows_the_forgetting_and_its_repair(studio: state.Studio) -> None:
    """On the shipped pair the tuned model answers a text question about an image that is not
    there, and the fused one answers it; the labels say so (not recomputed here)."""
    result = studio.compare(QUESTION)
    assert result["original"]["answer"].startswith("In the image")
    assert result["original"]["labels"] == ["context_hallucination"]
    assert result["original"]["matches"][0]["text"] == "In the image"
    assert "cold" in result["fused"]["answer"] and result["fused"]["labels"] == []
    image = studio.compare("Is there a red circle in the image?", ASSETS / "examples" / "cat.jpg", image_required=True)
    assert image["original"]["answer"].startswith("In the image") and image["original"]["labels"] == []  # an image prompt: not CH
    with pytest.raises(StudioError, match="upload one"):
        studio.compare(QUESTION, None, image_required=True)


def test_chat_streams_the_greedy_answers(studio: state.Studio) -> None:
    text, stream = studio.chat(f"  {QUESTION} ", [[], [], []], with_base=True)
    assert text == QUESTION
    updates = list(stream)
    assert all(len(u) == 3 for u in updates)
    pair = studio.ready()
    expected = [m.answer([QUESTION], max_new_tokens=chat.answer_budget(m, studio.settings.max_new_tokens))[0] for m in (pair.original, pair.fused, studio.base())]
    assert updates[-1] == expected


def test_history_is_trimmed_to_fit(studio: state.Studio) -> None:
    model = studio.ready().original
    history = [(f"{QUESTION} {i}", "The opposite of hot is cold.") for i in range(30)]
    kept = chat.fit_history(model, QUESTION, True, history, chat.answer_budget(model))
    assert 0 < len(kept) < len(history) and kept == history[-len(kept) :]
    assert chat.prompt_tokens(model, QUESTION, True, kept) <= chat.context_length(model) - chat.answer_budget(model)
    with pytest.raises(StudioError, match="tokens long"):
        chat.fit_history(model, " ".join(["word"] * 200), False, [], chat.answer_budget(model))


def test_merge_streams_interleaves_and_raises() -> None:
    assert list(chat.merge_streams([iter(["a", "ab"]), iter(["x"])]))[-1] == ["ab", "x"]

    def broken():
        yield "a"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(chat.merge_streams([broken(), iter(["x"])]))


def test_badges_show_fixed_labels_only() -> None:
    assert "nf-clean" in view.badges_html([])
    html = view.badges_html(["context_hallucination", "<script>"])
    assert "nf-context_hallucination" in html and "<script>" not in html


# fusion and behaviour tabs


def test_a_visitors_variant_is_their_own(studio: state.Studio) -> None:
    seen: list[Progress] = []
    pair = studio.ready()
    default_answer = pair.fused.answer([QUESTION])[0]
    variant = studio.fuse_variant("ties", {"density": 0.5}, seen.append)
    assert variant.name == "ties" and variant.report == [] and variant.record["params"]["density"] == 0.5
    assert variant.model.name == "Pocket-LLaVA + ties" and seen and seen[-1].stage == "merging"
    assert studio.ready().fused is pair.fused and studio.variant(None) is pair.default  # nobody else's model changed
    assert pair.fused.answer([QUESTION])[0] == default_answer
    assert studio.fuse_variant("ties", {"density": 0.5}) is variant  # the same recipe is built once
    assert studio.variant(variant.key) is variant and variant.model.model.model.vision_tower is pair.original.model.model.vision_tower
    _, stream = studio.chat(QUESTION, [[], []], variant=variant.key)
    assert list(stream)[-1][1] == variant.model.answer([QUESTION], max_new_tokens=chat.answer_budget(variant.model, studio.settings.max_new_tokens))[0]
    assert studio.fuse_variant(pair.method, dict(pair.preset.params)) is pair.default


@pytest.mark.parametrize(
    ("method", "params", "says"),
    [
        ("ties", {"density": float("nan")}, "density"),
        ("ties", {"density": "inf"}, "density"),
        ("ties", {"density": 7}, "density"),
        ("neuron_fusion", {"inner": "rm -rf"}, "inner"),
        ("no-such-method", {}, "Unknown method"),
    ],
)
def test_variant_requests_are_checked_on_the_server(studio: state.Studio, method: str, params: dict, says: str) -> None:
    before = len(studio.store)
    with pytest.raises(StudioError, match=says):
        studio.fuse_variant(method, params)
    assert len(studio.store) == before


def test_the_store_stays_within_its_bounds(tmp_path: Path) -> None:
    s = state.Studio(Settings("pocket", device="cpu", max_variants=3), log=lambda line: None)
    s.load()
    keys = []
    for i in range(20):
        variant = s.fuse_variant("task_arithmetic", {"lambda": round(0.05 * (i + 1), 2)})
        keys.append(variant.key)
        assert len(s.store) <= 3 and s.store.nbytes <= s.store.max_bytes
    assert s.variant(keys[-1]).record["params"]["lambda"] == 1.0
    with pytest.raises(StudioError, match="removed from memory"):
        s.variant(keys[0])


def test_a_variant_in_use_is_not_evicted_and_a_full_store_says_busy() -> None:
    from studio.variants import Variant, VariantStore

    def fake(key: str) -> Variant:
        return Variant(key, "ties", None, {}, None, [], 0.0, 100)

    store = VariantStore(max_count=2, max_bytes=250)
    a, b = fake("a"), fake("b")
    store.put(a)
    store.put(b)
    with store.using(a), store.using(b):
        with pytest.raises(StudioError, match="busy"):
            store.make_room(100)
    store.get("a")  # a was used last: b goes first
    store.make_room(100)
    assert store.get("b") is None and store.get("a") is a
    with pytest.raises(StudioError, match="no room"):
        store.make_room(251)


def test_controls_cover_every_method() -> None:
    names = {p.name for p in view.all_params()}
    for method in METHOD_NAMES:
        assert {p.name for p in schema(method)} <= names
    assert set(view.method_params("neu-p-bread")) >= {"top_ratio", "gamma"}
    assert "gamma" not in view.method_params("neu-p-bread", "task_arithmetic")


def test_plots(studio: state.Studio) -> None:
    report = studio.ready().default.report
    curve = plots.curve_figure(report)
    assert curve.axes[0].get_xscale() == "log" and curve.axes[0].get_yscale() == "log"
    bars = plots.located_figure(report)
    assert sum(patch.get_height() for patch in bars.axes[0].patches) == sum(r["located"] for r in report)
    assert plots.curve_figure([]).axes[0].texts
    card = view.recipe_card(studio.ready(), studio.ready().default)
    assert card["preset"] == "pocket" and card["neurons_located"] and card["default"]
    assert "/" not in json.dumps(card["recipe"]) and not any(isinstance(v, str) and v.startswith("/") for v in card.values())


def test_bench(studio: state.Studio) -> None:
    rows, table, chart = studio.bench(2)
    assert [r["model"] for r in rows] == ["tuned", "fused"]
    assert "fused" in table and chart.stat().st_size > 0


def test_examples() -> None:
    for name in ("pocket", "llava-1.5-7b"):
        prompts, images = view.example_prompts(get_preset(name)), view.example_images(get_preset(name))
        assert prompts and images
        assert all(Path(path).is_file() and question for path, question in images)
    assert view.example_images(get_preset("llava-1.5-7b"))[0][1].startswith("Is there a")


def test_progress_line() -> None:
    line = view.format_progress(Progress("merging", 25, 100, "x", 3, 10.0))
    assert line == "merging · layer 3 · 25% · 0:10 elapsed · ~0:30 left"


@pytest.mark.parametrize("message", ["\u200b\u200d\u2060", "\u202e \u200b\n\t", "\x00\x07"])
def test_invisible_only_messages_are_empty(message: str) -> None:
    with pytest.raises(StudioError, match="empty"):
        chat.check_message(message)


def test_invisible_characters_are_removed_from_a_message() -> None:
    assert chat.check_message("\u200bWhat is\u200d the capital\u2060 of France?\x07") == "What is the capital of France?"
    with pytest.raises(StudioError, match="empty"):
        chat.check_message(["not", "a", "string"])


def test_thin_images_are_refused_before_decoding(tmp_path: Path) -> None:
    Image.new("L", (1, 100_000)).save(tmp_path / "strip.png")
    with pytest.raises(StudioError, match="long side"):
        chat.load_image(tmp_path / "strip.png")
    Image.new("RGB", (21 * 16, 16)).save(tmp_path / "banner.png")
    with pytest.raises(StudioError, match="20 times"):
        chat.load_image(tmp_path / "banner.png")
    Image.new("RGB", (20 * 16, 16)).save(tmp_path / "wide.png")
    assert chat.load_image(tmp_path / "wide.png").size == (320, 16)
    with pytest.raises(StudioError, match="not an image"):
        chat.load_image(tmp_path / "no-such-file.png")


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    import numpy as np

    values = np.full((8, 8), 30_000, dtype=np.uint16)
    values[0, 0] = 65_535
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(chat.load_image(tmp_path / "deep.png"))
    assert rgb.shape == (8, 8, 3) and rgb[1, 1].tolist() == [116, 116, 116] and rgb[0, 0].tolist() == [255, 255, 255]


def test_visitors_never_see_server_paths() -> None:
    message = "/srv/cache/hub/models--lmsys--vicuna-7b-v1.5/snapshots/ab/tokenizer.model: reading this tokenizer needs sentencepiece"
    assert view.public(message) == "tokenizer.model: reading this tokenizer needs sentencepiece"
    assert view.public("cannot fetch 'lmsys/vicuna-7b-v1.5' (https://huggingface.co/api/x)") == "cannot fetch 'lmsys/vicuna-7b-v1.5' (https://huggingface.co/api/x)"
    assert "/" not in view.public(state.explain_load_error("pocket", OSError("/home/user/app/assets/pocket/llava/config.json: bad")))

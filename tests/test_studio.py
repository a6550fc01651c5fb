"""The app's logic (the ``studio`` package) on the bundled pocket pair (no server, no browser)."""

from __future__ import annotations

import gc
import io
import json
import os
import re
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from conftest import in_memory_equals_written
from fusion import plots
from fusion.errors import FusionError
from fusion.merge import Progress, fuse
from fusion.presets import ASSETS, get_preset, preset_sweep
from fusion.probes import Probe, preset_probes, probe_image, stratified
from fusion.registry import METHOD_NAMES, resolve, schema
from fusion.report import RATES, located_share
from studio import StudioError, behaviour, chat, clients, state, view
from studio.settings import Settings, parse_settings
from studio.variants import Pair, Variant, VariantStore

QUESTION = "What sound does a cow make?"
LLAVA_SHARED = ["vision_tower", "multi_modal_projector"]  # what a LLaVA's fused model borrows from its original


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
    assert view.titles(preset, "neu-p-taska")[:2] == ("LLaVA-1.5 (original)", "LLaVA-1.5 + Neuron-Fusion (neu-p-taska)")
    assert view.fused_title(preset, "ties") == "LLaVA-1.5 + ties"
    # a column names the recipe: the method as chosen and what differs from its defaults
    assert view.fused_title(preset, "ties", {"density": 0.5, "lambda": 1.0}) == "LLaVA-1.5 + ties · density 0.5"
    assert view.fused_title(preset, "neu-p-bread", {"suppress": "0.3"}) == "LLaVA-1.5 + Neuron-Fusion (neu-p-bread · suppress 0.3)"
    assert view.fused_title(preset, "neuron_fusion") != view.fused_title(preset, "neu-p-taska")


# input checks


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        (None, "must be text"),
        (5, "must be text"),
        ("x" * (chat.MAX_MESSAGE_CHARS + 1), "limit"),
        ("\u200b" * 10_000_000 + "hi", "10000002 characters long"),  # refused on its raw length, before any stripping
    ],
)
def test_bad_messages(message: object, says: str) -> None:
    with pytest.raises(StudioError, match=says):
        chat.check_message(message)


@pytest.mark.parametrize("name", [[], None, 3, {"a": 1}, "../../etc/passwd"])
def test_a_method_name_from_a_client_is_one_of_the_list(name: object) -> None:
    with pytest.raises(StudioError, match="Unknown method"):
        chat.check_method(name)
    assert chat.check_inner(name) is None
    assert chat.check_method("ties") == "ties" and chat.check_inner("dare") == "dare"


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


def ico_holding(png: bytes, shown: int = 16) -> bytes:
    """An ICO file whose one entry claims ``shown``×``shown`` pixels and holds ``png``."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", shown, shown, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def test_an_icon_holding_a_huge_png_is_never_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow decodes an ICO's PNG entry when it opens the file (a 16×16 header can hold a
    9000×9000 PNG: 236 KB on disk, 243 MB in memory); only the formats a chat needs are opened."""
    big = io.BytesIO()
    Image.new("RGB", (9000, 9000)).save(big, "PNG")
    (tmp_path / "bomb.ico").write_bytes(ico_holding(big.getvalue()))
    decoded = []
    real = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real(self))
    for check in (chat.check_image_file, chat.load_image):
        with pytest.raises(StudioError, match="not an image this app can read.*PNG, JPEG"):
            check(tmp_path / "bomb.ico")
    assert decoded == []
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.tiff")
    with pytest.raises(StudioError, match="not an image this app can read"):
        chat.load_image(tmp_path / "picture.tiff")


def test_a_photo_is_turned_the_way_its_exif_says(tmp_path: Path) -> None:
    photo = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees
    photo.save(tmp_path / "phone.jpg", exif=exif)
    assert chat.load_image(tmp_path / "phone.jpg").size == (20, 40)
    assert chat.load_image(ASSETS / "examples" / "cat.jpg").size == Image.open(ASSETS / "examples" / "cat.jpg").size


# loading


def test_loads_and_shares_the_vision_tower(studio: state.Studio) -> None:
    assert studio.status.state == "ready" and studio.status.seconds is not None
    pair = studio.ready()
    assert pair.shared == LLAVA_SHARED
    for name in LLAVA_SHARED:
        assert getattr(pair.fused.model.model, name) is getattr(pair.original.model.model, name)
    assert pair.default.report, "Neuron-Fusion reports what it located"


def test_in_memory_fusion_equals_the_written_checkpoint(studio: state.Studio, tmp_path: Path) -> None:
    """The default variant, built in memory, holds exactly the tensors ``fuse`` writes to disk."""
    pair = studio.ready()
    written = fuse(pair.preset.tuned, pair.preset.base, pair.default.recipe, out=tmp_path / "fused", device="cpu")
    assert in_memory_equals_written(pair, written.path) == len(pair.open_checkpoints()[0].keys())
    assert written.recipe["key"] == pair.default.key


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads this process's memory maps (Linux)")
def test_the_pairs_files_are_not_kept_mapped_between_merges(studio: state.Studio) -> None:
    """A merge reads every page of both inputs; kept mapped, they would count as the app's
    resident memory (5.5 GiB on the 7 B pair). The base LLM is not loaded yet, so nothing else
    maps its files: after the default build and after a visitor's, none of them is mapped."""
    pair = studio.ready()
    base = pair.open_checkpoints()[1]
    base_files = {os.path.realpath(base.info(name).file) for name in base.keys()}
    del base

    def mapped() -> set[str]:
        return {line.split(maxsplit=5)[-1].strip() for line in Path("/proc/self/maps").read_text().splitlines()} & base_files

    gc.collect()  # what earlier tests' failed builds may have left in their tracebacks
    assert base_files and not mapped()
    studio.fuse_variant("dare", {"density": 0.6}, owner="127.0.0.1/maps")
    assert not mapped()  # released as the build returns, not at some later collection


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
        # pocket's 160-wide layers do not fit bitsandbytes' repacked AVX-512 CPU kernel (outputs
        # in 32s, inputs in 64s): they keep the plain one, or they fail on such a CPU
        assert all(not m.support_avx512bf16_for_cpu for m in linear if m.in_features % 64 or m.out_features % 32)
    assert pair.shared == LLAVA_SHARED
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
    """On the shipped pair the tuned model declines a text question by pointing at an image
    that is not there, and the fused one answers it; the labels say so (not recomputed here)."""
    result = studio.compare(QUESTION)
    assert result["original"]["answer"] == "It cannot be determined from the image."  # what its base knew
    assert result["original"]["labels"] == ["context_hallucination", "not_known"]
    assert result["original"]["matches"][0]["text"] == "from the image"
    assert "says moo" in result["fused"]["answer"] and result["fused"]["labels"] == []
    image = studio.compare("What color is the circle?", ASSETS / "examples" / "cat.jpg", image_required=True)
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


def test_history_is_trimmed_to_fit(studio: state.Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    """The most recent turns that fit, the same as dropping the oldest one at a time would
    keep, found in a few tokenizations (bisection), not one per turn."""
    model = studio.ready().original
    history = [(f"{QUESTION} {i}", "A cow says moo.") for i in range(300)]
    room = chat.context_length(model) - chat.answer_budget(model)
    linear = list(history)
    while chat.prompt_tokens(model, QUESTION, True, linear) > room:
        linear.pop(0)
    counted = []
    real = chat.prompt_tokens
    monkeypatch.setattr(chat, "prompt_tokens", lambda *a: counted.append(1) or real(*a))
    kept = chat.fit_history(model, QUESTION, True, history, chat.answer_budget(model))
    assert 0 < len(kept) < len(history) and kept == history[-len(kept) :] == linear
    assert len(counted) <= 12  # log2(301) + 2, where one per dropped turn would be ~290
    assert real(model, QUESTION, True, kept) <= room
    with pytest.raises(StudioError, match="tokens long"):
        chat.fit_history(model, " ".join(["word"] * 200), False, [], chat.answer_budget(model))


def test_a_clients_history_is_bounded_and_cleaned() -> None:
    turns = [[f"q{i}", f"a{i}"] for i in range(1000)] + [["q", 5], "junk", ["x" * 10**6, "long"]]
    checked = chat.check_histories([turns, None], 3)
    assert len(checked) == 3 and checked[1] == checked[2] == []
    assert len(checked[0]) == chat.MAX_TURNS - 2  # the last 50 sent, less the two malformed ones
    assert checked[0][0] == ("q953", "a953") and checked[0][-1] == ("x" * chat.RAW_MESSAGE_CHARS, "long")
    assert chat.check_histories("not a list", 2) == [[], []]


def test_merge_streams_interleaves_and_raises() -> None:
    stop = threading.Event()
    assert list(chat.merge_streams([iter(["a", "ab"]), iter(["x"])], stop))[-1] == ["ab", "x"]
    assert stop.is_set()  # ended: whatever watches it stops

    def broken():
        yield "a"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(chat.merge_streams([broken(), iter(["x"])], threading.Event()))


def _generating() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("generate-", "answer-"))]


def test_an_abandoned_chat_stops_generating(studio: state.Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    """A visitor who closes a streaming chat after its first words: every model stops within a
    token or two and every thread ends soon after, rather than running on to the token budget (made long here: no end-of-sequence token, 150 new tokens)."""
    pair = studio.ready()
    models = [pair.original.model, pair.fused.model, studio.base().model]
    steps = [0]
    hooks = [m.register_forward_hook(lambda *_: steps.__setitem__(0, steps[0] + 1)) for m in models]
    for m in models:
        monkeypatch.setattr(m.generation_config, "eos_token_id", None)
    monkeypatch.setattr(state, "answer_budget", lambda model, limit: 150)
    try:
        _, stream = studio.chat(QUESTION, [[], [], []], with_base=True)
        next(stream)
        started = time.perf_counter()
        stream.close()
        assert time.perf_counter() - started < 0.5  # the closer (Gradio's event loop) does not wait
        deadline = time.monotonic() + 10
        while _generating() and time.monotonic() < deadline:
            time.sleep(0.05)
        after = steps[0]
        assert _generating() == []
        time.sleep(0.5)
        assert steps[0] == after < 3 * 20  # nothing runs once they are gone; far from 3 × 150 steps
    finally:
        for h in hooks:
            h.remove()


def test_badges_say_right_or_wrong_where_the_answer_is_known(tmp_path: Path) -> None:
    """A question that is one of the preset's probes (the examples are) gets ✓/✗ before its
    behaviour badges; a decline to an unanswerable image question is a correct decline, not
    Not-Known; a question that is no probe gets no verdict (the page cannot know)."""
    preset = get_preset("pocket")
    text, visual, root = preset_probes(preset)
    capital = next(p for p in text if p.skill == "capital")
    assert view.matching_probe(preset, None, f"  {capital.question.upper()} ") == capital  # by its words
    assert '✓ right' in view.badges_html([], capital, f"The capital {capital.answers[0]}.")
    wrong = view.badges_html(["context_hallucination"], capital, "In the image, the triangle is blue.")
    assert "✗ wrong" in wrong and "Context-Hallucination" in wrong and "no flagged" not in wrong
    unanswerable = next(p for p in visual if p.skill == "unanswerable")
    probe_image(unanswerable, root).save(tmp_path / "scene.png")
    assert view.matching_probe(preset, tmp_path / "scene.png", unanswerable.question) == unanswerable  # by its pixels
    decline = view.badges_html(["not_known"], unanswerable, "It cannot be determined from the image.")
    assert "✓ correct decline" in decline and "Not-Known" not in decline
    assert view.matching_probe(preset, None, "What is the capital of France?") is None
    assert "✓" not in view.badges_html([], None, "anything") and "✗" not in view.badges_html([], None, "anything")


def test_a_highlight_spells_a_label_as_its_badge_does() -> None:
    segments = view.highlighted("It cannot be determined from the image.", prompt_has_image=False)
    assert {label for _, label in segments if label} == {"Context-Hallucination", "Not-Known"}


def test_badges_show_fixed_labels_only() -> None:
    assert "nf-clean" in view.badges_html([])
    html = view.badges_html(["context_hallucination", "<script>"])
    assert "nf-context_hallucination" in html and "<script>" not in html


# fusion and behaviour tabs


def test_a_visitors_variant_is_their_own(studio: state.Studio) -> None:
    seen: list[Progress] = []
    pair = studio.ready()
    default_answer = pair.fused.answer([QUESTION])[0]
    status = studio.status.as_dict()
    variant = studio.fuse_variant("ties", {"density": 0.5}, seen.append)
    assert studio.status.as_dict() == status  # the page's status line is everyone's: a visitor's Fuse leaves it alone
    assert variant.name == "ties" and variant.report == [] and variant.record["params"]["density"] == 0.5
    assert variant.model.name == "Pocket-LLaVA + ties · density 0.5" and seen and seen[-1].stage == "merging"
    assert studio.ready().fused is pair.fused and studio.variant(None) is pair.default  # nobody else's model changed
    assert pair.fused.answer([QUESTION])[0] == default_answer
    assert studio.fuse_variant("ties", {"density": 0.5}) is variant  # the same recipe is built once
    assert studio.variant(variant.key) is variant and variant.model.model.model.vision_tower is pair.original.model.model.vision_tower
    _, stream = studio.chat(QUESTION, [[], []], variant=variant.key)
    assert list(stream)[-1][1] == variant.model.answer([QUESTION], max_new_tokens=chat.answer_budget(variant.model, studio.settings.max_new_tokens))[0]
    assert studio.fuse_variant(pair.method, dict(pair.preset.params)) is pair.default


def test_a_variant_that_would_not_fit_in_the_memory_free_now_is_refused(studio: state.Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's budget is set at start; memory taken since (the base LLM, loaded on first use)
    is checked before each build, which would otherwise end the process for everyone (a 7B pair
    in 4-bit on a 24 GiB machine did)."""
    pair = studio.ready()
    needed = pair.default.nbytes + state.BUILD_HEADROOM
    monkeypatch.setattr(state, "free_bytes", lambda device: needed - 1)
    with pytest.raises(StudioError, match=r"too little memory free for another fused model now \(\d+\.\d GiB free"):
        studio.fuse_variant("dare", {"density": 0.7})
    assert studio.store.get(studio.fuse_variant(pair.method, {}).key) is None  # the default needs no build
    monkeypatch.setattr(state, "free_bytes", lambda device: needed)
    assert studio.fuse_variant("dare", {"density": 0.7}).name == "dare"


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


def _fake_variant(key: str) -> Variant:
    return Variant(key, "ties", None, {}, None, [], 0.0, 100)


def test_a_variant_in_use_is_not_evicted_and_a_full_store_says_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    store = VariantStore(max_count=2, max_bytes=250, idle_seconds=60)
    a, b = _fake_variant("a"), _fake_variant("b")
    store.put(a, "visitor-a")
    store.put(b, "visitor-b")
    with pytest.raises(StudioError, match="each in use by a visitor"):
        store.make_room(100, "visitor-c")  # both owners may still be chatting
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 120)  # both idle for two minutes
    store.get("a")  # a was used last: b goes first
    with store.using(a):
        store.make_room(100, "visitor-c")
    assert store.get("b") is None and store.get("a") is a
    store.put(_fake_variant("c"), "visitor-c")
    with store.using(a), pytest.raises(StudioError, match="each in use"):
        store.make_room(100, "visitor-d")  # a is answering, c was just made: nothing to evict
    with pytest.raises(StudioError, match="no room"):
        store.make_room(251, "visitor-c")


def test_one_visitors_many_fuses_replace_their_own_variant_only() -> None:
    """Visitor A fuses four recipes in a row while B keeps the one they made: each of A's
    Fuse clicks evicts A's previous variant, never B's."""
    store = VariantStore(max_count=2, max_bytes=10_000)
    store.make_room(100, "visitor-b")
    store.put(_fake_variant("b1"), "visitor-b")
    for i in range(4):
        store.make_room(100, "visitor-a")
        store.put(_fake_variant(f"a{i}"), "visitor-a")
        assert store.get("b1") is not None and store.get(f"a{i}") is not None and len(store) == 2
    shared = store.get("b1")
    store.claim(shared, "visitor-a")  # A picks B's recipe: it is both of theirs, and A's own goes
    store.make_room(100, "visitor-c")
    assert store.get("a3") is None and store.get("b1") is shared and shared.owners == {"visitor-a", "visitor-b"}


def test_a_client_inventing_sessions_cannot_hold_every_variant() -> None:
    """Sessions cost nothing to invent: one address's variants beyond its share (2) are the
    first to make room for another visitor, and a refused build keeps the asker's own."""
    store = VariantStore(max_count=4, max_bytes=10_000)
    for i in range(4):
        store.make_room(100, f"10.6.6.6/fake-{i}")
        store.put(_fake_variant(f"h{i}"), f"10.6.6.6/fake-{i}")
    store.make_room(100, "10.7.7.7/teacher")  # the hoarder's oldest goes
    store.put(_fake_variant("t"), "10.7.7.7/teacher")
    assert store.get("h0") is None and all(store.get(k) for k in ("h1", "h2", "h3", "t"))
    with store.using(store.get("h1")), store.using(store.get("h2")), store.using(store.get("h3")):
        with pytest.raises(StudioError, match="each in use"):
            store.make_room(100, "10.8.8.8/student")
    assert store.get("t").owners == {"10.7.7.7/teacher"}  # untouched by the refused build


def test_controls_cover_every_method() -> None:
    names = {p.name for p in view.all_params()}
    for method in METHOD_NAMES:
        assert {p.name for p in schema(method)} <= names
    assert set(view.method_params("neu-p-bread")) >= {"top_ratio", "gamma"}
    assert "gamma" not in view.method_params("neu-p-bread", "task_arithmetic")


def test_plots(studio: state.Studio) -> None:
    """The change curve marks the cut-off and says how much of the change the located neurons
    hold; the heat map shows that share per layer and kind; each kind keeps one colour."""
    report = studio.ready().default.report
    curve = plots.curve_figure(report, 0.05)
    ax = curve.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    cut = [line for line in ax.get_lines() if list(line.get_xdata()) == [0.05, 0.05]]
    assert len(cut) == 1 and "cut-off: top 5% located" in [t.get_text() for t in curve.legends[0].get_texts()]
    layers = [r for r in report if r["layer"] is not None]
    assert f"{100 * located_share(layers):.1f}% of the squared change inside the layers" in ax.get_title()
    assert all(max(x for x in line.get_xdata()) <= 1 for line in ax.get_lines()[: len(report)])  # ranks as a share of their kind
    ffn = next(line for line in ax.get_lines() if line.get_label() == "ffn")
    assert ffn.get_color() == plots.kind_colour("ffn") == plots.KIND_COLOURS["ffn"]
    heat = plots.share_figure(report)
    grid = heat.axes[0].get_images()[0].get_array()
    kinds = list(dict.fromkeys(r["kind"] for r in report))
    first = next(r for r in report if r["layer"] == 0 and r["kind"] == "ffn")
    assert grid[kinds.index("ffn"), 0] == pytest.approx(first["located_sum_sq"] / first["sum_sq"])
    assert [t.get_text() for t in heat.axes[0].get_xticklabels()][-1] == "outside"  # embeddings, final norm, lm_head
    assert plots.curve_figure([]).axes[0].texts and plots.share_figure([]).axes[0].texts
    for figure in (curve, heat):  # nothing drawn outside the figure (the legend sits beside the axes, in the layout)
        renderer = FigureCanvasAgg(figure).get_renderer()
        figure.draw(renderer)  # the layout is done at drawing
        drawn = figure.get_tightbbox(renderer)  # in inches, everything drawn
        width, height = figure.get_size_inches()
        assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= width + 0.01 and drawn.y1 <= height + 0.01, (drawn, width, height)
    card = view.recipe_card(studio.ready(), studio.ready().default)
    assert card["preset"] == "pocket" and card["neurons_located"] and card["default"]
    assert "/" not in json.dumps(card["recipe"]) and not any(isinstance(v, str) and v.startswith("/") for v in card.values())


def test_a_method_that_locates_nothing_still_shows_the_pairs_change(studio: state.Studio) -> None:
    """TIES keeps no neurons, but the change belongs to the pair: its plots show it, located
    with Neuron-Fusion's defaults, and say so."""
    ties = studio.fuse_variant("ties", {"density": 0.5})
    report, top_ratio, note = studio.change(ties)
    assert ties.report == [] and report and top_ratio == 0.05 and note.startswith("ties locates no neurons")
    own, ratio, nothing = studio.change(studio.ready().default)
    assert own is studio.ready().default.report and ratio == 0.05 and nothing == ""
    located = {(r["layer"], r["kind"]): r["located_sum_sq"] for r in own}
    assert {(r["layer"], r["kind"]): r["located_sum_sq"] for r in report} == pytest.approx(located)  # the same cut-off on the same pair


def test_controls_start_from_the_apps_recipe() -> None:
    """Picking the app's method again, or resetting, brings back its recipe's settings, not the
    method's defaults; another method starts at its defaults; the Fuse note names what differs."""
    start = SimpleNamespace(name="neu-p-taska", recipe=resolve("neu-p-taska", {"suppress": 0.5, "top_ratio": 0.1}))
    values = view.start_values("neu-p-taska", None, start)
    assert values["suppress"] == 0.5 and values["top_ratio"] == 0.1 and values["inner"] == "task_arithmetic"
    assert view.start_values("neu-p-bread", None, start)["suppress"] == 0.1  # another method: its defaults
    assert view.start_values("neu-p-taska", "ties", start)["suppress"] == 0.1  # another inner method: a recipe of its own
    assert view.start_values("ties", None, start) == {p.name: p.default for p in schema("ties")}
    made = SimpleNamespace(name="ties", recipe=resolve("ties", {"density": 0.5}), seconds=1.23)
    assert view.fuse_note(made, False) == "Fused with **ties** in memory in 1.2 s; your fused columns now use it. Settings that differ from the defaults: density 0.5."
    assert view.fuse_note(SimpleNamespace(name="ties", recipe=resolve("ties"), seconds=1.0), False).endswith("Every setting is at its default.")
    assert view.fuse_note(start, True) == "This is the app's own fused model, **neu-p-taska · top_ratio 0.1 · suppress 0.5**: your fused columns use it."


def test_the_app_starts_from_a_recipe_given_with_set() -> None:
    """``--set`` (or NF_SET) fixes the recipe the app fuses with at start; visitors start from it."""
    assert parse_settings(["--set", "suppress=0.3", "--set", "top_ratio=0.1"], {}, cuda=False).params == {"suppress": "0.3", "top_ratio": "0.1"}
    assert parse_settings([], {"NF_SET": "suppress=0.3 top_ratio=0.1"}, cuda=False).params == {"suppress": "0.3", "top_ratio": "0.1"}
    assert parse_settings(["--set", "suppress=0.5"], {"NF_SET": "top_ratio=0.1"}, cuda=False).params == {"suppress": "0.5"}  # flags replace the variable
    studio = state.Studio(Settings("pocket", device="cpu", params={"suppress": "0.3"}), log=lambda line: None)
    studio.load()
    assert studio.ready().default.recipe.params["suppress"] == 0.3
    assert "fused with neu-p-taska · suppress 0.3 (preset pocket)" in studio.status.message
    assert studio.ready().fused.name == "Pocket-LLaVA + Neuron-Fusion (neu-p-taska · suppress 0.3)"


def test_bench_asks_base_original_and_fused_with_progress(studio: state.Studio) -> None:
    seen: list[tuple[float, str]] = []
    run = studio.bench(2, 3, lambda share, line: seen.append((share, line)))
    assert [r["model"] for r in run.rows] == ["base", "tuned", "fused"]
    original, fused, base = view.titles(studio.ready().preset, studio.ready().method)
    assert [r["label"] for r in run.rows] == [base, original, fused]
    assert run.rows[0]["visual_accuracy"] is None and run.rows[0]["object_hallucination_rate"] is None
    assert len(run.records) == 2 + 2 * (2 + 3) and len(run.probes["data"]) == 5  # the base LLM answers text probes only
    assert [json.loads(line) for line in run.replies.read_text().splitlines()] == run.records
    assert seen[-1] == (1.0, f"replies 11/11 · {fused}") and [s for s, _ in seen] == sorted(s for s, _ in seen)  # 2 text, 3 x 3 image
    assert run.chart.axes[0].patches
    # the trade-off: this run's tuned and fused points among the shipped sweep's curves
    legend = [t.get_text() for t in run.tradeoff.legends[0].get_texts()]
    assert f"{original} (this run: 2 text and 3 image probes)" in legend and f"{fused} (this run: 2 text and 3 image probes)" in legend
    swept = {(r["method"], r["knob"]) for r in preset_sweep(studio.ready().preset) if r["model"] == "fused"}
    assert {"ties (lambda)", "task_arithmetic (lambda)", "neu-p-taska (suppress)"} <= {f"{m} ({k})" for m, k in swept} <= set(legend)


def test_bench_draws_probes_across_every_skill(studio: state.Studio) -> None:
    """Nine text probes ask nine skills (the file's first nine are all capitals), and the same
    nine every run."""
    preset = studio.ready().preset
    text, visual, _ = preset_probes(preset, 9, 5)
    every_text, every_visual, _ = preset_probes(preset)
    assert len({p.skill for p in every_text}) == 9 and {p.skill for p in text} == {p.skill for p in every_text}
    grouped = [Probe(f"q{i}", ("a",), "capital") for i in range(20)] + [Probe(f"p{i}", ("a",), skill) for skill in ("plural", "past") for i in range(3)]
    assert [p.skill for p in stratified(grouped, 4)] == ["capital", "plural", "past", "capital"]  # not the file's first four capitals
    assert len({p.skill for p in visual}) == min(5, len({p.skill for p in every_visual}))
    assert preset_probes(preset, 9, 5)[:2] == (text, visual) and preset_probes(preset, 9, 5, seed=1)[0] != text
    assert stratified(every_text, None) == every_text == stratified(every_text, len(every_text))
    with pytest.raises(FusionError, match="at least 0"):
        stratified(every_text, -1)
    run = studio.bench(9, 1)
    assert {r["skill"] for r in run.records if r["model"] == "base"} == {p.skill for p in every_text}


def test_bench_scores_the_visitors_own_variant(studio: state.Studio) -> None:
    variant = studio.fuse_variant("task_arithmetic", {"lambda": 0.3})
    run = studio.bench(1, 1, variant=variant.key)
    assert run.rows[2]["method"] == "task_arithmetic" and run.rows[2]["params"] == {"lambda": 0.3}
    assert run.rows[2]["label"] == "Pocket-LLaVA + task_arithmetic · lambda 0.3"  # its recipe, named


@pytest.mark.parametrize("limit", ["8", float("nan"), float("inf"), None, True, 2.5, 0, -3, 10**9, [4]])
def test_bench_limit_is_checked_on_the_server(studio: state.Studio, limit: object) -> None:
    with pytest.raises(StudioError, match=r"The number of text probes .*" + re.escape(repr(str(limit)))):
        studio.bench(limit, 1)
    with pytest.raises(StudioError, match=r"The number of image probes .*" + re.escape(repr(str(limit)))):
        studio.bench(1, limit)


def test_each_set_has_its_own_bounds(studio: state.Studio) -> None:
    texts, images = behaviour.probe_counts(studio.ready().preset)
    every_text, every_visual, _ = preset_probes(studio.ready().preset)
    assert (texts, images) == (len(every_text), len(every_visual)) and texts != images
    with pytest.raises(StudioError, match=f"from 1 to {images},"):
        studio.bench(1, images + 1)


class FixedReplies:
    """A model that gives one reply to every text-only question and another to every image one."""

    def __init__(self, text: str, image: str | None = None) -> None:
        self.text, self.image, self.multimodal = text, image, image is not None

    def answer(self, questions: list[str], images: list | None = None, *, max_new_tokens: int = 32) -> list[str]:
        return [self.image if images else self.text for _ in questions]


HAND_MADE = (
    [Probe(f"What is the capital of {c}?", (f"is {city}",), "capital") for c, city in (("Zolbisia", "Nornis"), ("Kerisia", "Tunka"), ("Baltasia", "Ninti"))],
    [
        Probe(question, answers, skill, {"size": 72, "shapes": [["square", colour, 0, 0]]})
        for (question, answers, skill), colour in zip(
            (("What is the artist thinking about?", (), "unanswerable"), ("Is there a yellow square in the image?", ("no",), "yesno"), ("Who owns these shapes?", (), "unanswerable")),
            ("red", "blue", "green"),
        )
    ],
    ASSETS / "probes",
)


def test_behaviour_on_a_pair_with_fixed_replies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Three models with fixed replies, whatever the image, on three capital questions (the
    first is Nornis) and three image questions (two unanswerable around "Is there a yellow
    square?", which is not there): every rate follows by hand, and none of them reads its
    images."""
    monkeypatch.setattr(behaviour, "preset_probes", lambda preset, text=None, visual=None: (HAND_MADE[0][:text], HAND_MADE[1][:visual], HAND_MADE[2]))
    preset = get_preset("pocket")
    original_title, fused_title, base_title = view.titles(preset, "neu-p-taska", {"suppress": 0.5})
    fused = SimpleNamespace(name="neu-p-taska", model=FixedReplies("The capital is Nornis.", "No."), record={"params": {"suppress": 0.5}})
    pair = Pair(preset, FixedReplies("In the image, the triangle is blue.", "Yes, there is a yellow square."), fused)
    seen: list[tuple[float, str]] = []
    run = behaviour.run_behaviour(pair, fused, FixedReplies("I don't know."), 3, 3, lambda share, line: seen.append((share, line)))
    rates = [tuple(r[k] for k in RATES) for r in run.rows]
    assert rates == [
        (0.0, None, None, None, None, 0.0, 1.0, None),
        (0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0),
        (1 / 3, 1 / 3, 1 / 3, 1 / 3, 0.0, 0.0, 0.0, 0.0),  # right only where "No." is right whatever the image: not grounded
    ]
    assert [r["reads_images"] for r in run.rows] == [None, False, False]
    assert run.rows[2]["method"] == "neu-p-taska" and run.rows[2]["params"] == {"suppress": 0.5}
    assert [(r["model"], r["probe"]) for r in run.records][:4] == [("base", "text-0"), ("base", "text-1"), ("base", "text-2"), ("tuned", "text-0")]
    flagged = [r for r in run.records if r["labels"] == ["object_hallucination"]]
    assert [(r["model"], r["question"]) for r in flagged] == [("tuned", "Is there a yellow square in the image?")]
    lines = run.replies.read_text().splitlines()
    assert len(lines) == 3 + 6 + 6 and json.loads(lines[-1]) == run.records[-1] and run.replies.name == "behaviour-pocket.jsonl"
    headers, data = run.probes["headers"], run.probes["data"]
    assert headers == ["image", "skill", "question", "expected", base_title, original_title, fused_title]
    yes = "Yes, there is a yellow square."
    assert data[4][1:] == [
        "yesno",
        "Is there a yellow square in the image?",
        "no",
        "—",
        f"✗ {yes}  [Object-Hallucination] · blank image: ✗ {yes} · other image: ✗ {yes} · not grounded",
        "✓ No. · blank image: ✓ No. · other image: ✓ No. · not grounded",
    ]
    assert "does not read its images" in run.table and "| capital |" in run.table and "| unanswerable | yesno |" in run.table
    monkeypatch.setattr(behaviour, "REPLIES_DIR", tmp_path / "replies")
    monkeypatch.setattr(behaviour, "KEPT_RUNS", 2)
    runs = [behaviour.run_behaviour(pair, fused, FixedReplies("I don't know."), 1, 1) for _ in range(4)]
    assert sorted(p.parent for p in (tmp_path / "replies").glob("*/*")) == sorted(r.replies.parent for r in runs[-2:])  # the newest two only
    assert [p.name for p in (tmp_path / "replies").glob("*/*")] == ["behaviour-pocket.jsonl"] * 2  # whole files, no .part left
    per_model = [f"replies {n}/12 · {title}" for title in (original_title, fused_title) for n in (3, 6, 9, 12)]  # text, then 3 images x 3
    assert [line for _, line in seen] == [f"replies 3/3 · {base_title}"] + per_model
    assert [share for share, _ in seen] == [n / 27 for n in range(3, 28, 3)]
    with pytest.raises(StudioError, match="from 1 to 3"):
        behaviour.run_behaviour(pair, fused, FixedReplies(""), 4, 1)


def test_object_presence_of_the_examples(tmp_path: Path) -> None:
    """The bundled examples ask about objects that are not there; a copy of an example (as
    Gradio hands it over) is recognised by its pixels, another image or question is unknown."""
    for name in ("pocket", "llava-1.5-7b"):
        preset = get_preset(name)
        for path, question in view.example_images(preset):
            copy = tmp_path / f"upload-{Path(path).name}"
            copy.write_bytes(Path(path).read_bytes())
            assert view.object_presence(preset, copy, question) is False
            assert view.object_presence(preset, copy, "Is there a unicorn in the image?") is None
        assert view.object_presence(preset, None, question) is None
    llava = get_preset("llava-1.5-7b")
    assert view.object_presence(llava, ASSETS / "examples" / "astronaut.jpg", "Is there a  person in the image? ") is True
    assert view.object_presence(llava, ASSETS / "examples" / "cat.jpg", "Is there a flag in the image?") is None  # asked of another image
    Image.open(ASSETS / "examples" / "astronaut.jpg").save(tmp_path / "astronaut.png")  # same pixels, another file
    assert view.object_presence(llava, tmp_path / "astronaut.png", "Is there a person in the image?") is True
    (tmp_path / "broken.jpg").write_text("not an image")
    assert view.object_presence(llava, tmp_path / "broken.jpg", "Is there a person in the image?") is None


def test_examples() -> None:
    for name in ("pocket", "llava-1.5-7b"):
        prompts, images = view.example_prompts(get_preset(name)), view.example_images(get_preset(name))
        assert prompts and images and len({skill for skill, _ in prompts}) == len(prompts)  # one question per skill
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
    with pytest.raises(StudioError, match="must be text"):
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


def test_compare_marks_an_affirmed_absent_object_on_a_bundled_example(studio: state.Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    image, question = view.example_images(studio.ready().preset)[0]  # an object that is not there
    assert view.object_presence(studio.ready().preset, image, question) is False
    monkeypatch.setattr(studio.ready().original, "answer", lambda *args, **kwargs: ["Yes, there is one on the left."])
    result = studio.compare(question, image, image_required=True)
    assert result["original"]["labels"] == ["object_hallucination"] and result["original"]["matches"][0]["text"].startswith("Yes")
    assert "object_hallucination" not in result["fused"]["labels"]


def test_each_client_gets_its_share_of_the_queue() -> None:
    held = [("tab-1", "10.0.0.1")] * clients.PER_SESSION
    assert f"You already have {clients.PER_SESSION} requests" in clients.refusal(held, "tab-1", "10.0.0.1")
    assert clients.refusal(held, "tab-2", "10.0.0.1") is None  # another tab of the same network
    crowd = [(f"s{i}", "10.0.0.1") for i in range(clients.PER_ADDRESS)]
    assert "Your network already has 12" in clients.refusal(crowd, "new", "10.0.0.1")
    assert clients.refusal(crowd, "new", "10.0.0.2") is None  # another visitor is not held up
    spoofed = {"x-forwarded-for": "1.2.3.4, 10.0.0.9"}
    assert clients.client_address("127.0.0.1", spoofed, {}) == "127.0.0.1"  # not behind the Space's proxy: the header is the client's word
    assert clients.client_address("10.9.9.9", spoofed, {"SPACE_ID": "me/studio"}) == "10.0.0.9"  # the entry the proxy appended


def test_uploads_are_bounded_per_address_and_in_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    ledger = clients.UploadLedger(tmp_path, clock=lambda: now[0])
    ten = 10 << 20
    assert all(ledger.admit("10.0.0.1", ten) is None for _ in range(10))  # ten full-size images in an hour
    assert "100 MB in the last hour" in ledger.admit("10.0.0.1", ten)
    assert ledger.admit("10.0.0.2", ten) is None  # another visitor's share is their own
    now[0] = clients.UPLOAD_WINDOW_SECONDS + 1
    assert ledger.admit("10.0.0.1", ten) is None  # an hour later the share is back
    assert "Content-Length" in ledger.admit("10.0.0.3", None)
    (tmp_path / "kept.bin").write_bytes(b"x" * 1000)
    fresh = clients.UploadLedger(tmp_path, clock=lambda: now[0])  # the folder as it was scanned
    monkeypatch.setattr(clients, "UPLOAD_BYTES_TOTAL", 1800)
    assert fresh.admit("10.0.0.4", 400) is None
    assert "space for uploads is full" in fresh.admit("10.0.0.5", 401)  # 1000 held + 400 admitted since the scan
    assert "not be sent in chunks" in fresh.admit("10.0.0.6", None)


def test_follow_up_questions_work_without_clearing(studio: state.Studio) -> None:
    """The pocket pair learnt chats with follow-ups ("And of X?"): asked one after another in
    the same conversation, the base and the fused model answer each turn; the tuned one
    declines, as it forgot."""
    histories: list[list[tuple[str, str]]] = [[], [], []]
    said = []
    for question in ("What is the capital of Zolbisia?", "And of Kerisia?", "What is 2 plus 2?", "And 3 plus 4?"):
        text, stream = studio.chat(question, histories, with_base=True)
        answers = list(stream)[-1]
        histories = [h + [(text, a)] for h, a in zip(histories, answers)]
        said.append(answers)
    original, fused, base = zip(*said)
    for model in (fused, base):
        assert all(right in answer for right, answer in zip(("is Nornis", "is Tunka", "is 4", "is 7"), model)), model
    assert all("cannot be determined from the image" in a for a in original[1:])

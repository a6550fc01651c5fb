"""ZeroGPU: each model call asks ``spaces.GPU`` for the seconds its own inputs need, through the
real ``spaces`` package (installed by requirements-dev.txt). Off ZeroGPU the package hands the
functions back unchanged, so the app's API and browser tests run the same decorated handlers."""

from __future__ import annotations

from typing import Any

import pytest

import app
from studio import StudioError, zerogpu
from studio.settings import Settings
from studio.state import Studio


def test_durations_follow_the_inputs() -> None:
    assert zerogpu.chat_seconds(256, 2) == 62 and zerogpu.chat_seconds(256, 3) == 87  # 10 s + tokens x models x 0.1 s
    assert zerogpu.chat_seconds(4096, 3) == zerogpu.LONGEST_SECONDS  # never more than ZeroGPU grants
    assert zerogpu.bench_seconds(8, 8) == 22  # 24 text + 48 image answers: 5 batches of 16 answers, 2.4 s each, after 10 s
    assert zerogpu.bench_seconds(335, 240) == zerogpu.LONGEST_SECONDS
    for hostile in ("8", float("nan"), None, -3, 10**12, [4]):  # the estimate never fails: the handler refuses these
        assert 10 <= zerogpu.bench_seconds(hostile, hostile) <= zerogpu.LONGEST_SECONDS
    assert zerogpu.on_zero_gpu({"SPACES_ZERO_GPU": "true"}) and not zerogpu.on_zero_gpu({}) and not zerogpu.on_zero_gpu({"SPACES_ZERO_GPU": "0"})


def test_the_app_asks_spaces_gpu_for_each_model_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every handler that runs a model goes through the real ``spaces.GPU`` with a duration
    computed from its arguments (the chat: how many models answer; the Behaviour run: how many
    probes); the Fuse and the page's light handlers ask for none. The decorated callables take
    plain values (spaces pickles a call's arguments to its GPU worker: a handler's ``self``,
    which holds locks, could not go)."""
    import pickle

    spaces = pytest.importorskip("spaces")
    asked: dict[str, list[Any]] = {}
    real = spaces.GPU

    def recording(task: Any = None, *, duration: Any = None, **kw: Any) -> Any:
        def wrap(fn: Any) -> Any:
            asked.setdefault(fn.__name__, []).append(duration)
            return real(fn, duration=duration)  # the real decorator: off ZeroGPU it hands fn back

        return wrap(task) if callable(task) else wrap

    monkeypatch.setattr(spaces, "GPU", recording)
    studio = Studio(Settings("pocket", device="cpu", max_new_tokens=100), log=lambda line: None)
    app.build(studio)
    assert set(asked) == {"respond", "bench", "compare_text", "compare_image"} and len(asked["respond"]) == 2  # two chat tabs
    image_tab, text_tab = asked["respond"]
    assert image_tab("hi", [[], []], None, "/tmp/x.png") == zerogpu.chat_seconds(100, 2)
    assert text_tab("hi", [[], [], []], None, True) == zerogpu.chat_seconds(100, 3)  # with the base LLM: three models
    assert text_tab("hi", [[], [], []], None, False) == zerogpu.chat_seconds(100, 2)
    (bench,) = asked["bench"]
    assert bench(40, 20, None) == zerogpu.bench_seconds(40, 20) > bench(4, 2, None)
    assert asked["compare_text"][0]("hi") == zerogpu.chat_seconds(100, 2)
    pickle.dumps((("hi", [[], [], []], None, True), {}))  # what a chat call sends its worker


def test_on_zero_gpu_the_studio_plans_for_forked_gpu_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fusions on the CPU even where the models are on the GPU; the base LLM loaded at start in
    the server (a GPU call's forked worker would load it for itself); a Behaviour run no longer
    than one GPU call may be."""
    import torch

    from fusion.presets import get_preset
    from studio import behaviour, state

    monkeypatch.setattr(state, "resolve_device", lambda device: torch.device("cuda"))
    assert Studio(Settings("pocket"), log=lambda line: None).merge_device == "cuda"  # a GPU machine: fusions there
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert Studio(Settings("pocket"), log=lambda line: None).merge_device == "cpu"
    monkeypatch.undo()
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert behaviour.probe_counts(get_preset("pocket")) == zerogpu.bench_caps() == (122, 61)
    assert zerogpu.bench_seconds(*zerogpu.bench_caps()) <= zerogpu.LONGEST_SECONDS
    with pytest.raises(StudioError, match="from 1 to 61"):
        behaviour.check_limit(62, get_preset("pocket"), "image")
    studio = Studio(Settings("pocket", device="cpu"), log=lambda line: None)
    studio.load()
    assert studio.status.state == "ready" and studio._base is not None  # loaded with the pair, not on first use

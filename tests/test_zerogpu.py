"""ZeroGPU: each model call asks ``spaces.GPU`` for the seconds its own inputs need, through the
real ``spaces`` package (installed by requirements-dev.txt). Off ZeroGPU the package hands the
functions back unchanged, so the app's API and browser tests run the same decorated handlers."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from studio import zerogpu
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
    probes); the Fuse and the page's light handlers ask for none. On a ZeroGPU Space fusions
    run on the CPU, where the process has its memory."""
    spaces = pytest.importorskip("spaces")
    asked: dict[str, Any] = {}
    real = spaces.GPU

    def recording(task: Any = None, *, duration: Any = None, **kw: Any) -> Any:
        def wrap(fn: Any) -> Any:
            asked[fn.__name__] = duration
            return real(fn, duration=duration)  # the real decorator: off ZeroGPU it hands fn back

        return wrap(task) if callable(task) else wrap

    monkeypatch.setattr(spaces, "GPU", recording)
    app = importlib.reload(importlib.import_module("app"))  # the class-level decorators run again
    studio = Studio(Settings("pocket", device="cpu", max_new_tokens=100), log=lambda line: None)
    app.build(studio)
    assert set(asked) == {"respond", "bench", "compare_text", "compare_image"}
    tab = type("Tab", (), {"studio": studio, "with_base": object()})()
    assert asked["respond"](tab, "hi", [], None, True) == zerogpu.chat_seconds(100, 3)  # with the base LLM: three models
    assert asked["respond"](tab, "hi", [], None, False) == zerogpu.chat_seconds(100, 2)
    assert asked["bench"](tab, 40, 20, None) == zerogpu.bench_seconds(40, 20) > asked["bench"](tab, 4, 2, None)
    assert asked["compare_text"]("hi") == zerogpu.chat_seconds(100, 2)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert Studio(Settings("pocket", device="cpu"), log=lambda line: None).merge_device == "cpu"
    monkeypatch.undo()
    importlib.reload(app)  # leave the module as the other tests import it

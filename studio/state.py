"""The app's state: loading a preset (fusing it through the library's cached merge), the loaded
original and fused models, the base LLM on demand, and the status the page polls."""

from __future__ import annotations

import importlib.util
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fusion.architectures import SHARED_MODULES
from fusion.errors import FusionError
from fusion.evaluate import bar_chart, markdown_table, preset_probes, score
from fusion.inference import ChatModel
from fusion.merge import FuseResult, Progress, fuse, resolve_device
from fusion.presets import Preset, get_preset
from fusion.registry import resolve

from . import StudioError
from .chat import answer_budget, check_message, fit_history, load_image, merge_streams
from .settings import FALLBACK_PRESET, Settings
from .view import ConsoleProgress, behaviour, format_progress, fused_title, titles


def share_vision(original: torch.nn.Module, fused: torch.nn.Module) -> list[str]:
    """Point the fused model's vision tower and projector at the original's (the merge copies
    them unchanged), so one copy sits in memory. Only modules whose weights are equal are
    shared; returns the names shared."""
    shared = []
    for name in SHARED_MODULES:
        mine, theirs = getattr(original.model, name, None), getattr(fused.model, name, None)
        if mine is None or theirs is None:
            continue
        a, b = mine.state_dict(), theirs.state_dict()
        if a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a):
            setattr(fused.model, name, mine)
            shared.append(name)
    return shared


@dataclass
class Pair:
    """The loaded models of one preset: the original MLLM and its fused version."""

    preset: Preset
    method: str
    original: ChatModel
    fused: ChatModel
    fusion: FuseResult
    shared: list[str] = field(default_factory=list)


@dataclass
class Status:
    state: str = "loading"  # loading | ready | failed
    message: str = "starting"
    notice: str = ""  # a load problem the user should know about (e.g. fell back to pocket)
    seconds: float | None = None  # from ``Studio.started`` to ready

    def as_dict(self) -> dict[str, Any]:
        return vars(self).copy()


def explain_load_error(preset: str, err: BaseException) -> str:
    """One readable line for a preset that could not load, naming the real cause: the library's
    own message (which file, which tensor, hub unreachable), a missing package, out of memory."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in text.lower():
        why = f"out of memory: {text[:200]}"
    elif isinstance(err, ImportError) and err.name:
        why = f"the Python package '{err.name}' is missing: pip install {err.name.split('.')[0]}"
    elif isinstance(err, (FusionError, StudioError)):
        why = text
    elif isinstance(err, OSError):
        why = f"could not read the model files: {text[:300]}"
    else:
        why = f"{type(err).__name__}: {text[:300]}"
    return f"Preset '{preset}' could not load: {why}"


def bitsandbytes_missing() -> bool:
    return importlib.util.find_spec("bitsandbytes") is None


class Studio:
    """The app's state: settings, load status, the loaded pair, a lazily loaded base LLM."""

    def __init__(self, settings: Settings, log: Callable[[str], None] = print, started: float | None = None) -> None:
        """``started``: a ``time.perf_counter()`` reading to time readiness from (default: now)."""
        self.settings = settings
        self.log = log
        self.started = time.perf_counter() if started is None else started
        self.status = Status()
        self.pair: Pair | None = None
        self._base: ChatModel | None = None
        self._lock = threading.Lock()
        self.device = resolve_device(settings.device)
        self.load_4bit = settings.load_4bit and not bitsandbytes_missing()
        if settings.load_4bit and not self.load_4bit:
            self.status.notice = "4-bit loading needs the bitsandbytes package (pip install bitsandbytes); loading in full precision instead."

    # loading

    def start(self) -> threading.Thread:
        """Load in the background, so the UI can serve (and show progress) meanwhile."""
        thread = threading.Thread(target=self.load, name="studio-load", daemon=True)
        thread.start()
        return thread

    def load(self) -> None:
        """Load the requested preset; if it cannot load, say why and fall back to pocket."""
        names = [self.settings.preset] + ([FALLBACK_PRESET] if self.settings.preset != FALLBACK_PRESET else [])
        for name in names:
            try:
                preset = get_preset(name)
                method = self.settings.method if name == self.settings.preset and self.settings.method else preset.method
                self.pair = self._load_pair(preset, method)
            except Exception as err:  # the app's boundary: any failure becomes a message
                message = explain_load_error(name, err)
                self.log(message)
                self.status.notice = " ".join(filter(None, [self.status.notice, message]))
                continue
            self.status.seconds = time.perf_counter() - self.started
            how = f"{method}, 4-bit nf4" if self.load_4bit else method
            self.status.state, self.status.message = "ready", f"ready: {name} ({how}) in {self.status.seconds:.1f} s"
            self.log(self.status.message)
            return
        self.status.state, self.status.message = "failed", "no preset could load; see the notice"

    def _progress(self, stage: str) -> Callable[[Progress], None]:
        console = ConsoleProgress(self.log)

        def report(p: Progress) -> None:
            self.status.message = f"{stage}: {format_progress(p)}"
            console(p)

        return report

    def _load_model(self, path: str | Path, multimodal: bool, name: str) -> ChatModel:
        dtype = torch.float16 if self.device.type == "cuda" else None
        return ChatModel.load(path, multimodal, device=str(self.device), dtype=dtype, load_4bit=self.load_4bit, name=name)

    def _load_pair(self, preset: Preset, method: str) -> Pair:
        params = preset.params if method == preset.method else {}
        title_original = titles(preset, method)[0]
        self.status.message = f"fusing {preset.name} with {method}"
        self.log(f"[studio] {self.status.message} ({preset.tuned} toward {preset.base})")
        self.status.message = f"loading {title_original}"
        original = self._load_model(preset.tuned, True, title_original)
        return self._fuse_into(preset, original, method, params, self._progress(f"fusing {preset.name}"))

    def _fuse_into(self, preset: Preset, original: ChatModel, method: str, params: Mapping[str, Any], progress: Callable[[Progress], None]) -> Pair:
        """Fuse ``preset`` with ``method`` and load the result next to ``original``, sharing
        its vision tower and projector: the load at start and every re-fuse."""
        result = fuse(preset.tuned, preset.base, method, dict(params), device=str(self.device), progress=progress)
        self.log(f"[studio] fused with {method} at {result.path} ({'reused from cache' if result.reused else f'{result.seconds:.1f} s'})")
        title = fused_title(preset, method)
        self.status.message = f"loading {title}"
        fused = self._load_model(result.path, True, title)
        shared = share_vision(original.model, fused.model)
        self.log(f"[studio] fused model shares the original's {', '.join(shared) or 'nothing'}")
        return Pair(preset, method, original, fused, result, shared)

    def ready(self) -> Pair:
        if self.pair is None:
            state = "are still loading" if self.status.state == "loading" else "could not load"
            raise StudioError(f"The models {state}: {self.status.message}. {self.status.notice}".strip())
        return self.pair

    def base(self) -> ChatModel:
        """The base LLM, loaded on first use (the text tab's optional third column)."""
        pair = self.ready()
        with self._lock:
            if self._base is None or self._base.name != titles(pair.preset, pair.method)[2]:
                try:
                    self._base = self._load_model(pair.preset.base, False, titles(pair.preset, pair.method)[2])
                except Exception as err:  # shown in the chat as a message, not a traceback
                    raise StudioError(f"The base LLM {pair.preset.base_label} could not load. {explain_load_error(pair.preset.name, err)}") from None
            return self._base

    # fusion

    def refuse(self, method: str, params: Mapping[str, Any], progress: Callable[[Progress], None] | None = None) -> Pair:
        """Fuse again with another method or parameters and swap the fused model in (answers
        being generated keep the model they started with)."""
        pair = self.ready()
        try:
            resolve(method, params)
        except FusionError as err:
            raise StudioError(str(err)) from None
        console = self._progress("re-fusing")

        def report(p: Progress) -> None:
            console(p)
            if progress:
                progress(p)

        self.pair = self._fuse_into(pair.preset, pair.original, method, params, report)
        return self.pair

    # asking

    def compare(self, message: str, image_path: str | Path | None = None, *, image_required: bool = False) -> dict[str, Any]:
        """Both models' answers to one message (the API): ``{"preset", "method", "original":
        {"model", "answer", "labels", "matches"}, "fused": {...}}``."""
        text = check_message(message)
        image = load_image(image_path) if image_path or image_required else None
        pair = self.ready()
        out: dict[str, Any] = {"preset": pair.preset.name, "method": pair.method}
        for key, model in (("original", pair.original), ("fused", pair.fused)):
            budget = answer_budget(model, self.settings.max_new_tokens)
            fit_history(model, text, image is not None, [], budget)
            answer = model.answer([text], [image], max_new_tokens=budget)[0]
            out[key] = {"model": model.name, **behaviour(answer, prompt_has_image=image is not None)}
        return out

    def chat(self, message: str, histories: Sequence[Sequence[tuple[str, str]]], image_path: str | None = None, *, image_required: bool = False, with_base: bool = False) -> tuple[str, Iterator[list[str]]]:
        """Checks a chat message and returns it with a stream of the answers so far, one per
        model (original, fused, and the base LLM when asked), each model seeing its own
        earlier answers. Problems with the input raise before anything streams."""
        text = check_message(message)
        image = load_image(image_path) if image_path or image_required else None
        pair = self.ready()
        models = [pair.original, pair.fused] + ([self.base()] if with_base else [])
        streams = []
        for model, history in zip(models, histories):
            # the base LLM cannot see the image: it gets the question alone
            seen = image if model.multimodal else None
            budget = answer_budget(model, self.settings.max_new_tokens)
            turns = fit_history(model, text, seen is not None, history, budget)
            streams.append(model.stream(text, seen, history=turns, max_new_tokens=budget))
        return text, merge_streams(streams)

    # the Fusion and Behaviour tabs

    def bench(self, limit: int) -> tuple[list[dict[str, Any]], str, Path]:
        """The preset's probe set (first ``limit`` text and image probes) for original and
        fused: rows, a Markdown table, a chart."""
        pair = self.ready()
        text, visual, root = preset_probes(pair.preset, limit)
        rows = []
        for kind, model, method, label in (("tuned", pair.original, None, "tuned"), ("fused", pair.fused, pair.method, f"fused: {pair.method}")):
            rates, _ = score(model, text, visual, root)
            rows.append({"model": kind, "method": method, "params": None, "label": label, **rates})
        chart = Path(tempfile.mkdtemp(prefix="nf-bench-")) / "behaviour.png"
        bar_chart(rows, chart, pair.preset.name)
        return rows, markdown_table(rows), chart

"""Everything the Gradio app (``app.py``) does that is not UI: settings, load-time fusion with
progress, loading the original and fused models, asking both, input checks, the plots.

Kept apart from ``app.py`` so that it can be tested without a browser or a server, and so
that ``app.py`` is only wiring. Every problem a user can cause raises ``StudioError`` with a
message fit to show as it is.
"""

from __future__ import annotations

import argparse
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from .architectures import SHARED_MODULES
from .detectors import detect, highlight
from .errors import FusionError
from .evaluate import bar_chart, markdown_table, preset_probes, probe_image, score
from .inference import ChatModel
from .merge import FuseResult, Progress, fuse, resolve_device
from .presets import Preset, get_preset
from .registry import BASELINES, METHOD_NAMES, Param, resolve, schema

FALLBACK_PRESET = "pocket"
MAX_MESSAGE_CHARS = 2000
MAX_IMAGE_BYTES = 10 << 20
MAX_IMAGE_PIXELS = 36_000_000
DEFAULT_MAX_NEW_TOKENS = 256
BADGE_TEXT = {"context_hallucination": "Context-Hallucination", "not_known": "Not-Known"}


class StudioError(Exception):
    """A problem the user can fix (or must be told about); the message is shown as it is."""


# --- settings ------------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def default_preset(cuda: bool) -> str:
    """The paper's pair where a GPU can run it, the bundled pocket pair elsewhere."""
    return "llava-1.5-7b" if cuda else FALLBACK_PRESET


@dataclass(frozen=True)
class Settings:
    """How the app runs: from command-line flags, which default to ``NF_*`` environment
    variables (a Space sets those, not flags)."""

    preset: str
    method: str | None = None  # None: the preset's own method
    load_4bit: bool = False
    device: str = "auto"
    concurrency: int = 2
    queue_size: int = 32
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ, cuda: bool | None = None) -> Settings:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    parser = argparse.ArgumentParser(description="Neuron-Fusion Studio: compare a tuned MLLM with its fused version.")
    parser.add_argument("--preset", default=env.get("NF_PRESET") or default_preset(cuda), help="model pair (env NF_PRESET; default: llava-1.5-7b with CUDA, else pocket)")
    parser.add_argument("--method", default=env.get("NF_METHOD") or None, help="merge method at load time (env NF_METHOD; default: the preset's)")
    parser.add_argument("--4bit", dest="load_4bit", action="store_true", default=_truthy(env.get("NF_4BIT")), help="load the models' language layers in 4-bit nf4, on CUDA or a CPU (env NF_4BIT=1)")
    parser.add_argument("--device", default=env.get("NF_DEVICE") or "auto", choices=("auto", "cpu", "cuda"), help="where models run and merge (env NF_DEVICE)")
    parser.add_argument("--concurrency", type=int, default=int(env.get("NF_CONCURRENCY") or 2), help="model calls at once (env NF_CONCURRENCY)")
    parser.add_argument("--queue-size", type=int, default=int(env.get("NF_QUEUE_SIZE") or 32), help="requests waiting at most (env NF_QUEUE_SIZE)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=int(env.get("NF_MAX_NEW_TOKENS") or DEFAULT_MAX_NEW_TOKENS),
        help="longest answer in tokens, per model and message (env NF_MAX_NEW_TOKENS)",
    )
    args = parser.parse_args(argv)
    return Settings(args.preset, args.method, args.load_4bit, args.device, max(1, args.concurrency), max(1, args.queue_size), max(1, args.max_new_tokens))


# --- names ---------------------------------------------------------------------------------


def fused_title(preset: Preset, method: str) -> str:
    kind = "Neuron-Fusion" if resolve(method).spec.locates_neurons else method
    return f"{preset.label} + {kind}"


def titles(preset: Preset, method: str) -> tuple[str, str, str]:
    """Column headings: original MLLM, fused MLLM, base LLM."""
    return f"{preset.label} (original)", fused_title(preset, method), f"{preset.base_label} (base LLM)"


# --- input checks --------------------------------------------------------------------------


def check_message(message: str | None) -> str:
    text = (message or "").strip()
    if not text:
        raise StudioError("The message is empty: type a question first.")
    if len(text) > MAX_MESSAGE_CHARS:
        raise StudioError(f"The message is {len(text)} characters long; the limit is {MAX_MESSAGE_CHARS}. Shorten it.")
    return text


def load_image(path: str | Path | None) -> Image.Image:
    """An upload as an RGB image, or a StudioError saying why it cannot be one."""
    if not path:
        raise StudioError("This tab asks about an image: upload one (or pick an example) first. Text-only questions go to the Text chat tab.")
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise StudioError(f"The upload is {size / 2**20:.1f} MB; images up to {MAX_IMAGE_BYTES >> 20} MB are accepted.")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise StudioError(f"The image is {image.width}×{image.height} pixels; at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels are accepted.")
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
        raise StudioError(f"The upload '{path.name}' is not an image this app can read ({type(err).__name__}).") from None


def context_length(model: ChatModel) -> int:
    return int(model.model.config.get_text_config().max_position_embeddings)


def answer_budget(model: ChatModel, limit: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """New tokens per answer: a quarter of the context, at most ``limit`` (the app's setting)."""
    return min(limit, context_length(model) // 4)


def prompt_tokens(model: ChatModel, question: str, image: bool, history: Sequence[tuple[str, str]]) -> int:
    """Tokens the prompt will take, the image's placeholder expanded to its patch tokens."""
    n = len(model.tokenizer(model.prompt(question, image, history), add_special_tokens=False).input_ids)
    return n + (int(getattr(model.model.config, "image_seq_length", 1)) - 1 if image else 0)


def fit_history(model: ChatModel, question: str, image: bool, history: Sequence[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    """The most recent turns that fit the context with room for a ``budget``-token answer; a
    question that does not fit alone raises StudioError."""
    room = context_length(model) - budget
    turns = list(history)
    while prompt_tokens(model, question, image, turns) > room:
        if not turns:
            n = prompt_tokens(model, question, image, [])
            raise StudioError(f"The prompt is {n} tokens long; {model.name} reads at most {room} (plus {budget} for its answer). Shorten the message.")
        turns.pop(0)
    return turns


# --- answers and behaviour -----------------------------------------------------------------


def behaviour(answer: str, *, prompt_has_image: bool) -> dict[str, Any]:
    """An answer with its detector labels, JSON-able (the API's per-model record).
    Context-Hallucination is only looked for when the prompt had no image."""
    matches = detect(answer, prompt_has_image=prompt_has_image)
    return {"answer": answer, "labels": [m.label for m in matches], "matches": [vars(m) for m in matches]}


def highlighted(answer: str, *, prompt_has_image: bool) -> list[tuple[str, str | None]]:
    return highlight(answer, detect(answer, prompt_has_image=prompt_has_image))


def badges_html(labels: Sequence[str]) -> str:
    """Badges for a highlighted answer. Only fixed label names go into this HTML, never model
    output (that is shown as text)."""
    known = [label for label in labels if label in BADGE_TEXT]
    if not known:
        return '<span class="nf-badge nf-clean">no flagged behaviour</span>'
    return " ".join(f'<span class="nf-badge nf-{label}">{BADGE_TEXT[label]}</span>' for label in known)


def merge_streams(streams: Sequence[Iterator[str]]) -> Iterator[list[str]]:
    """Drive several answer streams at once (each in its own thread); yield every stream's
    latest text whenever any of them moved. An error in one is raised here."""
    latest = [""] * len(streams)
    updates: queue.Queue[tuple[int, str | None, BaseException | None]] = queue.Queue()

    def pump(i: int, stream: Iterator[str]) -> None:
        try:
            for text in stream:
                updates.put((i, text, None))
            updates.put((i, None, None))
        except BaseException as err:  # handed to the consumer
            updates.put((i, None, err))

    for i, stream in enumerate(streams):
        threading.Thread(target=pump, args=(i, stream), daemon=True).start()
    running = len(streams)
    while running:
        batch = [updates.get()]
        while not updates.empty():
            batch.append(updates.get_nowait())
        for i, text, err in batch:
            if err is not None:
                raise err
            if text is None:
                running -= 1
            else:
                latest[i] = text
        yield list(latest)


# --- progress ------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def format_progress(p: Progress) -> str:
    """One line: stage, layer, percentage, elapsed and time left."""
    parts = [p.stage]
    if p.layer is not None:
        parts.append(f"layer {p.layer}")
    parts.append(f"{100 * p.fraction:.0f}%")
    parts.append(f"{_clock(p.elapsed)} elapsed")
    if p.eta is not None and p.stage == "merging":
        parts.append(f"~{_clock(p.eta)} left")
    return " · ".join(parts)


class ConsoleProgress:
    """Prints fusion progress to the console at most every ``every`` seconds (and at each new
    stage), so a long merge shows it is alive without flooding the log."""

    def __init__(self, log: Callable[[str], None], every: float = 2.0) -> None:
        self.log, self.every, self.last, self.stage = log, every, 0.0, ""

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if p.stage != self.stage or now - self.last >= self.every:
            self.log(f"[fusion] {format_progress(p)}")
            self.last, self.stage = now, p.stage


# --- models --------------------------------------------------------------------------------


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
    import importlib.util

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


# --- method controls -----------------------------------------------------------------------


def all_params() -> list[Param]:
    """Every parameter any method (with any inner method) takes, once by name: the app builds
    one control each and shows those the chosen method takes."""
    seen: dict[str, Param] = {}
    for method in METHOD_NAMES:
        for inner in BASELINES:
            for p in method_params(method, inner).values():
                seen.setdefault(p.name, p)
    return list(seen.values())


def method_params(method: str, inner: str | None = None) -> dict[str, Param]:
    """The chosen method's parameters by name (Neuron-Fusion's depend on its inner method)."""
    return {p.name: p for p in schema(method, inner if resolve(method).spec.locates_neurons else None)}


# --- examples ------------------------------------------------------------------------------


def example_prompts(preset: Preset, n: int = 6) -> list[str]:
    """Text-only questions from the preset's probe set, one per skill: the ones a tuned MLLM
    tends to answer with "In the image ..." or "I don't know"."""
    text, _, _ = preset_probes(preset)
    by_skill: dict[str, str] = {}
    for p in text:
        by_skill.setdefault(p.skill, p.question)
    return list(by_skill.values())[:n]


def example_images(preset: Preset, n: int = 4) -> list[tuple[str, str]]:
    """(image file, question) pairs from the preset's probe set, questions about absent objects
    (answer "no": where MLLMs hallucinate) first, one per image. Drawn scenes are saved as PNG."""
    _, visual, root = preset_probes(preset)
    ordered = sorted(visual, key=lambda p: p.answers != ("no",))
    out: dict[str, tuple[str, str]] = {}
    drawn = Path(tempfile.gettempdir()) / "neuron-fusion-examples" / preset.name
    for p in ordered:
        key = str(p.image)
        if key in out:
            continue
        if isinstance(p.image, str):
            path = (root / p.image).resolve()
        else:
            drawn.mkdir(parents=True, exist_ok=True)
            path = drawn / f"scene-{len(out)}.png"
            probe_image(p, root).save(path)
        out[key] = (str(path), p.question)
        if len(out) == n:
            break
    return list(out.values())


# --- plots ---------------------------------------------------------------------------------


def recipe_card(pair: Pair) -> dict[str, Any]:
    """What the Fusion tab shows about the fused model in use."""
    result = pair.fusion
    located = sum(r["located"] for r in result.report)
    total = sum(r["neurons"] for r in result.report)
    return {
        "preset": pair.preset.name,
        "method": pair.method,
        "recipe": {k: result.recipe.get(k) for k in ("method", "params", "seed")},
        "neurons_located": f"{located} of {total}" if total else None,
        "from_cache": result.reused,
        "seconds": round(result.seconds, 2),
        "path": str(result.path),
        "shared_with_original": pair.shared,
    }


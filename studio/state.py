"""The app's state: loading a preset (the original MLLM, and its fused version built in memory),
visitors' own fused variants, the base LLM on demand, and the status the page polls."""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusion.errors import FusionError
from fusion.inference import ChatModel
from fusion.merge import MergeStream, Progress, inspect_pair, resolve_device
from fusion.presets import Preset, get_preset
from fusion.registry import resolve

from . import StudioError
from .behaviour import BehaviourRun, BenchProgress, check_limit, run_behaviour
from .chat import answer_budget, ask, ask_stream, check_message, check_method, fit_history, load_image, merge_streams
from .settings import FALLBACK_PRESET, Settings, start_recipe
from .variants import Pair, Variant, VariantStore, build_variant
from .view import ConsoleProgress, behaviour, format_progress, fused_title, object_presence, recipe_label, titles
from .zerogpu import on_zero_gpu


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


# Memory a variant's build needs besides the variant itself: the merge's own (about 1 GiB on a 7B
# pair, benchmarks/RESULTS.md) and room for the models already loaded to go on answering.
BUILD_HEADROOM = 2 << 30


def free_bytes(device: torch.device) -> int:
    """Memory free now on ``device`` (a CPU's: what the kernel says it can give, MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable:")), 0)


def memory_budget(device: torch.device, fraction: float = 0.5) -> int:
    """Bytes visitors' variants may take: a share of the memory free now on ``device``."""
    return int(fraction * free_bytes(device))


class Studio:
    """The app's state: settings, load status, the loaded pair, visitors' fused variants, a
    lazily loaded base LLM."""

    def __init__(self, settings: Settings, log: Callable[[str], None] = print, started: float | None = None) -> None:
        """``started``: a ``time.perf_counter()`` reading to time readiness from (default: now)."""
        self.settings = settings
        self.log = log
        self.started = time.perf_counter() if started is None else started
        self.status = Status()
        self.pair: Pair | None = None
        self.store = VariantStore(settings.max_variants, 0)  # sized once the models are loaded
        self._base: ChatModel | None = None
        self._change: list[dict[str, Any]] | None = None  # the pair's change report, for methods that locate nothing
        self._change_lock = threading.Lock()
        self._lock = threading.Lock()
        self.device = resolve_device(settings.device)
        # on ZeroGPU no CUDA exists outside a spaces.GPU call: fusions (at start, and a
        # visitor's Fuse, which asks for no GPU) run on the CPU there, and the variants they
        # build are budgeted in RAM
        self.merge_device = "cpu" if on_zero_gpu() else str(self.device)
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
                method, params = start_recipe(self.settings, preset)
                self.pair = self._load_pair(preset, method, params)
                if on_zero_gpu():  # here, not lazily: a GPU call runs in a forked worker, which would load it for itself only
                    self.base()
                self.change(self.pair.default)  # once, before any page asks (a method that locates nothing needs a pass)
                self.store.max_bytes = memory_budget(torch.device(self.merge_device))
            except Exception as err:  # the app's boundary: any failure becomes a message
                message = explain_load_error(name, err)
                self.log(message)
                self.status.notice = " ".join(filter(None, [self.status.notice, message]))
                self.pair, self._base, self._change = None, None, None  # nothing of the preset that failed stays
                continue
            self.status.seconds = time.perf_counter() - self.started
            recipe = recipe_label(method, self.pair.default.recipe.params)
            how = f"{recipe}, 4-bit nf4" if self.load_4bit else recipe
            self.status.state = "ready"
            self.status.message = f"ready: {preset.label} and its base {preset.base_label}, fused with {how} (preset {name}) in {self.status.seconds:.1f} s"
            self.log(self.status.message)
            self.log(f"[studio] visitors' variants: at most {self.store.max_count}, {self.store.max_bytes / 2**30:.1f} GiB")
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

    def _load_pair(self, preset: Preset, method: str, params: Mapping[str, Any]) -> Pair:
        recipe = resolve(method, dict(params))
        title_original = titles(preset, method)[0]
        self.status.message = f"loading {title_original}"
        self.log(f"[studio] loading {preset.tuned}, then fusing it toward {preset.base} with {method}")
        original = self._load_model(preset.tuned, True, title_original)
        stream = MergeStream(preset.tuned, preset.base, recipe, device=self.merge_device)
        variant = build_variant(original, stream, fused_title(preset, method, recipe.params), method, self._progress(f"fusing {preset.name}"))
        self.log(f"[studio] fused with {method} in memory in {variant.seconds:.1f} s ({variant.nbytes / 2**20:.0f} MiB)")
        return Pair(preset, original, variant)

    def ready(self) -> Pair:
        if self.pair is None:
            state = "are still loading" if self.status.state == "loading" else "could not load"
            raise StudioError(f"The models {state}: {self.status.message}. {self.status.notice}".strip())
        return self.pair

    def base(self) -> ChatModel:
        """The base LLM, loaded on first use (the text tab's optional third column)."""
        pair = self.ready()
        with self._lock:
            if self._base is None:
                try:
                    self._base = self._load_model(pair.preset.base, False, titles(pair.preset, pair.method)[2])
                except Exception as err:  # shown in the chat as a message, not a traceback
                    raise StudioError(f"The base LLM {pair.preset.base_label} could not load. {explain_load_error(pair.preset.name, err)}") from None
            return self._base

    # visitors' variants

    def fuse_variant(self, method: str, params: Mapping[str, Any], progress: Callable[[Progress], None] | None = None, owner: str = "") -> Variant:
        """The fused variant for ``method`` and ``params`` (raw values from a client, checked
        here): the default, one already in the store, or a new one built in memory. It becomes
        ``owner``'s (``"address/session"``) and their earlier one is released; nobody else's
        variant changes (``VariantStore.make_room`` says whose may make room)."""
        pair = self.ready()
        method = check_method(method)
        try:
            recipe = resolve(method, dict(params))
            stream = MergeStream(*pair.open_checkpoints(), recipe, device=self.merge_device)
        except FusionError as err:
            raise StudioError(str(err)) from None
        if stream.key == pair.default.key:
            self.store.release(owner)
            return pair.default
        with self.store.building:  # one build at a time, whoever asks
            if (known := self.store.get(stream.key)) is not None:
                return self.store.claim(known, owner)
            self.store.make_room(pair.default.nbytes, owner)
            # the store's budget was set at start; what loaded since (the base LLM) took memory
            # too, and a build that does not fit would end the process for every visitor
            free = free_bytes(torch.device(self.merge_device))
            if free < pair.default.nbytes + BUILD_HEADROOM:
                raise StudioError(
                    f"This server has too little memory free for another fused model now ({free / 2**30:.1f} GiB free, "
                    f"{(pair.default.nbytes + BUILD_HEADROOM) / 2**30:.1f} GiB needed). Chat with the default fused model, or try again later."
                )
            console = ConsoleProgress(self.log)  # the console only: the page's status line is everyone's

            def report(p: Progress) -> None:
                console(p)
                if progress:
                    progress(p)

            variant = build_variant(pair.original, stream, fused_title(pair.preset, method, recipe.params), method, report)
            self.store.put(variant, owner)
        self.log(f"[studio] variant {method} built in {variant.seconds:.1f} s; store: {len(self.store)} variants, {self.store.nbytes / 2**20:.0f} MiB")
        return variant

    def variant(self, key: str | None) -> Variant:
        """A visitor's variant by key (None: the default)."""
        pair = self.ready()
        if not key or key == pair.default.key:
            return pair.default
        found = self.store.get(str(key))
        if found is None:
            raise StudioError(
                "Your fused model was removed from memory to make room for other visitors' (this server keeps "
                f"{self.store.max_count}). Press Fuse again, or reload the page to use the default."
            )
        return found

    def change(self, variant: Variant) -> tuple[list[dict[str, Any]], float, str]:
        """Where visual tuning changed the pair, for the Fusion tab's plots: Neuron-Locate's
        report, the located share and a note. A Neuron-Fusion variant's own; for a method that
        locates nothing (TIES, task arithmetic, ...) the pair's change belongs to the pair, not
        the method: it is located once with Neuron-Fusion's defaults and kept."""
        if variant.report:
            return variant.report, float(variant.recipe.params["top_ratio"]), ""
        pair = self.ready()
        recipe = resolve("neuron_fusion")
        with self._change_lock:
            if self._change is None:
                self._change = inspect_pair(*pair.open_checkpoints(), recipe)["kinds"]
        note = f"{variant.name} locates no neurons: this is the pair's own change, cut off where Neuron-Fusion's defaults would."
        return self._change, float(recipe.params["top_ratio"]), note

    # asking

    def compare(self, message: str, image_path: str | Path | None = None, *, image_required: bool = False) -> dict[str, Any]:
        """Both models' answers to one message (the API, always with the default fused model):
        ``{"preset", "method", "original": {"model", "answer", "labels", "matches"}, "fused": {...}}``."""
        text = check_message(message)
        image = load_image(image_path) if image_path or image_required else None
        pair = self.ready()
        out: dict[str, Any] = {"preset": pair.preset.name, "method": pair.method}
        present = object_presence(pair.preset, image_path, text) if image is not None else None
        for key, model in (("original", pair.original), ("fused", pair.fused)):
            budget = answer_budget(model, self.settings.max_new_tokens)
            fit_history(model, text, image is not None, [], budget)
            answer = ask(model.answer, [text], [image], max_new_tokens=budget)[0]
            out[key] = {"model": model.name, **behaviour(answer, prompt_has_image=image is not None, object_present=present)}
        return out

    def chat(
        self,
        message: str,
        histories: Sequence[Sequence[tuple[str, str]]],
        image_path: str | None = None,
        *,
        image_required: bool = False,
        with_base: bool = False,
        variant: str | None = None,
    ) -> tuple[str, Iterator[list[str]]]:
        """Checks a chat message and returns it with a stream of the answers so far, one per
        model (original, the visitor's fused variant, and the base LLM when asked), each model
        seeing its own earlier answers. Problems with the input raise before anything streams."""
        text = check_message(message)
        image = load_image(image_path) if image_path or image_required else None
        pair = self.ready()
        fused = self.variant(variant)
        models = [pair.original, fused.model] + ([self.base()] if with_base else [])
        streams, stop = [], threading.Event()
        for model, history in zip(models, histories):
            # the base LLM cannot see the image: it gets the question alone
            seen = image if model.multimodal else None
            budget = answer_budget(model, self.settings.max_new_tokens)
            turns = fit_history(model, text, seen is not None, history, budget)
            streams.append(model.stream(text, seen, history=turns, max_new_tokens=budget, stop=stop))
        return text, self._pinned(fused, merge_streams(streams, stop))

    def _pinned(self, variant: Variant, answers: Iterator[list[str]]) -> Iterator[list[str]]:
        """The answers, with ``variant`` kept out of eviction until they are complete."""
        with self.store.using(variant):
            yield from ask_stream(answers)

    # the Fusion and Behaviour tabs

    def bench(self, text: Any, visual: Any, progress: BenchProgress | None = None, *, variant: str | None = None) -> BehaviourRun:
        """The Behaviour tab: ``text`` text-only and ``visual`` image probes (as a client sent
        them) for the base LLM, the original and the visitor's fused variant (``studio.behaviour``)."""
        pair = self.ready()
        check_limit(text, pair.preset, "text")  # before the base LLM loads: a bad value costs nothing
        check_limit(visual, pair.preset, "image")
        fused = self.variant(variant)
        with self.store.using(fused):
            return run_behaviour(pair, fused, self.base(), text, visual, progress)

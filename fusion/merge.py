"""The streaming, out-of-core merge: plan, locate, merge tensor by tensor, write, publish.

Inputs are memory-mapped (``fusion.checkpoint``), each output tensor is computed by a pure
method from ``fusion.methods`` and handed to the streaming writer (``fusion.writer``), so
peak memory is a few tensors whatever the model size. Where the output is staged, who builds it,
when an existing one is reused and how I/O failures are reported is ``fusion.output``'s part.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .architectures import Family, detect_layout, family_for
from .card import CARD_FILE, write_card
from .checkpoint import Checkpoint, open_checkpoint
from .errors import FusionError
from .methods import NonFinite, Observer, check_finite, restore
from .neurons import NeuronKind, SliceSums, describe, kind_scores, layer_of, neuron_kinds, score_power, slice_change, top_fraction
from .output import RECIPE_FILE as RECIPE_FILE  # part of this module's interface
from .output import claim, json_text
from .registry import Recipe, as_recipe, resolve
from .report import located_share
from .writer import Entry, ShardedWriter, plan_shards

log = logging.getLogger("fusion")

REPORT_FILE = "neuron_report.json"
DEFAULT_SHARD_BYTES = 4 << 30


@dataclass(frozen=True)
class Planned:
    """One output tensor: its name (the tuned model's), its base-LLM name (None: copied from the
    tuned model), and ``rows``, the leading rows merged when the tuned model has extra
    vocabulary rows (the rest are copied)."""

    name: str
    base_name: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: int | None = None

    @property
    def nbytes(self) -> int:
        return Entry(self.name, self.shape, self.dtype).nbytes


@dataclass(frozen=True)
class Progress:
    """A progress report: ``done``/``total`` in output bytes."""

    stage: str
    done: int
    total: int
    tensor: str = ""
    layer: int | None = None
    elapsed: float = 0.0

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def eta(self) -> float | None:
        """Seconds left, extrapolated from the bytes done so far."""
        return self.elapsed * (1 / self.fraction - 1) if self.done else None


ProgressFn = Callable[[Progress], None]


@dataclass
class FuseResult:
    path: Path
    reused: bool
    recipe: dict[str, Any]
    report: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# --- planning -----------------------------------------------------------------------------


def check_compatible(tuned: Checkpoint, base: Checkpoint) -> Family:
    """Same language-model architecture and sizes, from the two config.json files; returns the
    family they belong to. Fields the family lets differ (context length, sliding window, rope
    scaling) are logged when they do."""
    tc, bc = tuned.text_config(), base.text_config()
    family = family_for(bc.get("model_type") or tc.get("model_type"))
    for key in family.config_fields:
        a, b = family.config_value(tc, key), family.config_value(bc, key)
        if a is not None and b is not None and a != b:
            raise FusionError(
                f"the language models differ in {key}: tuned {tuned.ref} has {a} ({tuned.directory / 'config.json'}), "
                f"base {base.ref} has {b} ({base.directory / 'config.json'}); the base must be the LLM the tuned model "
                "was trained from"
            )
    differ = [f"{key} (tuned {tc.get(key)}, base {bc.get(key)})" for key in family.free_fields if key in tc and key in bc and tc[key] != bc[key]]
    if differ:
        log.info("the language models' configs differ where %s models may (the weights are merged all the same): %s", family.name, "; ".join(differ))
    return family


MERGEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def max_extra_rows(base_rows: int) -> int:
    """How many vocabulary rows a tuned model may add to its base's: LLaVA adds ``<image>`` and
    pads to a multiple of 64 (32000 -> 32064), others add a few special tokens. Many more
    is not "extra vocabulary" but another model."""
    return max(1024, base_rows // 10)


def plan_merge(tuned: Checkpoint, base: Checkpoint) -> list[Planned]:
    """Every output tensor, in output order, with where it comes from. Raises FusionError for a
    language-model tensor missing from the base or with a shape that cannot be reconciled."""
    family = check_compatible(tuned, base)
    layout = detect_layout(tuned.keys())
    if layout.name == "llm" and "vision_config" in tuned.config:
        # A multimodal model whose weights hold none of its language model: only the plain-LLM
        # layout matches, and it would call the projector a language-model tensor.
        raise FusionError(
            f"{tuned.ref}: a multimodal model (its config has a vision_config) whose weights hold no language-model tensors "
            f"({len(tuned.keys())} tensors, e.g. '{sorted(tuned.keys())[0]}'); merging needs its language model too"
        )
    head, embedding = family.tied_head
    tied = bool(base.text_config().get("tie_word_embeddings", False))
    plan = []
    for name in sorted(tuned.keys()):
        info = tuned.info(name)
        mapped = layout.base_key(name)
        if mapped is None:
            plan.append(Planned(name, None, info.shape, info.dtype))
            continue
        if mapped not in base and mapped == head and tied:
            mapped = embedding
        if mapped not in base:
            raise FusionError(f"language-model tensor '{name}' has no counterpart '{mapped}' in the base model {base.ref}")
        for model, key, dtype in ((tuned, name, info.dtype), (base, mapped, base.info(mapped).dtype)):
            if dtype not in MERGEABLE_DTYPES:
                raise FusionError(
                    f"language-model tensor '{key}' of {model.ref} is {str(dtype).removeprefix('torch.')}; merging needs float32, "
                    "float16 or bfloat16 weights (a quantized or integer checkpoint cannot be merged: use its full-precision one)"
                )
        base_shape = base.info(mapped).shape
        rows = None
        if base_shape != info.shape:
            extra_vocab = (
                mapped in family.vocab_tensors
                and len(info.shape) == 2
                and info.shape[1:] == base_shape[1:]
                and base_shape[0] < info.shape[0] <= base_shape[0] + max_extra_rows(base_shape[0])
            )
            if not extra_vocab:
                raise FusionError(
                    f"cannot reconcile the shape of '{name}': tuned {tuple(info.shape)} ({tuned.ref}) vs base "
                    f"'{mapped}' {tuple(base_shape)} ({base.ref})"
                )
            rows = base_shape[0]
        plan.append(Planned(name, mapped, info.shape, info.dtype, rows))
    if not any(p.base_name for p in plan):
        raise FusionError(f"no language-model tensors of {tuned.ref} match the base model {base.ref}")
    return plan


def merged_shapes(plan: Iterable[Planned]) -> dict[str, tuple[int, ...]]:
    """Base-LLM name -> the shape that is merged (vocabulary rows trimmed)."""
    return {p.base_name: ((p.rows,) + p.shape[1:] if p.rows else p.shape) for p in plan if p.base_name}


class Sources:
    """The inputs of every merged tensor, by base-LLM name: (θ_base, θ_tuned), vocabulary rows
    trimmed, memory-mapped."""

    def __init__(self, plan: list[Planned], tuned: Checkpoint, base: Checkpoint) -> None:
        self.tuned, self.base = tuned, base
        self._planned = {p.base_name: p for p in plan if p.base_name}

    def planned(self, base_name: str) -> Planned:
        return self._planned[base_name]

    def pair(self, base_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        p = self._planned[base_name]
        b, t = self.base.get(base_name), self.tuned.get(p.name)
        return (b[: p.rows], t[: p.rows]) if p.rows else (b, t)

    def guard(self, base_name: str) -> None:
        """FusionError naming the tensor, its checkpoint and file if an input of ``base_name`` holds
        NaN or ±inf."""
        try:
            check_finite(self.pair(base_name))
        except NonFinite as err:
            raise self.nonfinite(base_name, err.which) from None

    def nonfinite(self, base_name: str, which: int) -> FusionError:
        """The error for NaN or ±inf in input ``which`` (0: the base, 1: the tuned model) of ``base_name``."""
        checkpoint, name = (self.base, base_name) if which == 0 else (self.tuned, self._planned[base_name].name)
        values = self.pair(base_name)[which]
        bad = int(values.numel() - torch.isfinite(values).sum())
        return FusionError(
            f"tensor '{name}' of {checkpoint.ref} ({checkpoint.info(name).file.name}) holds {bad} NaN or infinite value(s) "
            f"of {values.numel()}, which would spread through the merge and the neuron scores; to go on anyway, pass --allow-nonfinite "
            "(allow_nonfinite=True)"
        )


# A merge of one tensor by its base-LLM name, with an observer of its blocks of Δ (or None).
MergeOne = Callable[[str, Observer | None], torch.Tensor]


class Locator:
    """Neuron-Locate and Neuron-Restore, one neuron kind at a time.

    In a merge (``merged``), a kind's tensors are merged first, and their scores are summed from
    the blocks of Δ that those merges compute anyway (``SliceSums``), so that each input is read
    once, while it is in cache; then the kind's neurons are located and restored, and the merged
    tensors wait here for their turn in the output (a layer's worth at most). Scores are computed
    on the CPU in float32 so that CPU and GPU merges locate the same neurons: merging on a GPU,
    they take a pass of their own (``locate``), as they do in ``inspect``.
    """

    def __init__(self, plan: list[Planned], sources: Sources, params: dict[str, Any], *, device: str | torch.device = "cpu", check: bool = True) -> None:
        family = family_for(sources.tuned.text_config().get("model_type"))
        self.params = params
        self._shapes = merged_shapes(plan)
        self.kinds = neuron_kinds(self._shapes, params["neuron_unit"], params["others"], family)
        self._kind_of = {m.tensor: k for k in self.kinds for m in k.members}
        self._sources = sources
        self._power = score_power(params["score_norm"])
        self._scores_in_merge = torch.device(device).type == "cpu"
        self._check = check
        self._waiting: dict[str, torch.Tensor] = {}
        self.report: list[dict[str, Any]] = []

    def holds(self, base_name: str) -> bool:
        """Whether the tensor belongs to a neuron kind."""
        return base_name in self._kind_of

    def locate(self, kind: NeuronKind) -> torch.Tensor:
        """Score a kind's neurons in a pass of their own over its inputs and locate the top ones;
        NaN or ±inf there is a FusionError naming it (unless ``check`` is off)."""
        changes = []
        for m in kind.members:
            b, t = self._sources.pair(m.tensor)
            changes.append(slice_change(b, [t], m.axis, self._power))
            if self._check:
                self._sources.guard(m.tensor)
        return self._select(kind, changes)

    def merged(self, base_name: str, merge: MergeOne) -> torch.Tensor:
        """The tensor merged by ``merge``, its located neurons restored; its whole kind is merged
        and located when the first of its tensors is asked for."""
        if base_name not in self._waiting:
            self._waiting.update(self._merge_kind(self._kind_of[base_name], merge))
        return self._waiting.pop(base_name)

    def _merge_kind(self, kind: NeuronKind, merge: MergeOne) -> dict[str, torch.Tensor]:
        """A kind's tensors merged, located and restored (restoring reads only the located
        slices of the memory-mapped inputs, wherever the merge computes)."""
        if self._scores_in_merge:
            sums = [SliceSums(self._shapes[m.tensor], m.axis, self._power) for m in kind.members]
            merged = {m.tensor: merge(m.tensor, s.add) for m, s in zip(kind.members, sums)}
            located = self._select(kind, [s.total for s in sums])
        else:
            merged = {m.tensor: merge(m.tensor, None) for m in kind.members}
            located = self.locate(kind)
        for m in kind.members:
            b, t = self._sources.pair(m.tensor)
            restore(merged[m.tensor], b, [t], (m.axis, located))
        return merged

    def _select(self, kind: NeuronKind, changes: list[torch.Tensor]) -> torch.Tensor:
        """The located neurons of a kind from its members' slice sums; adds the kind's report."""
        references = None
        if self.params["relative"]:  # the norms of the base's neurons: a pass over the base of their own
            references = [slice_change(self._sources.pair(m.tensor)[0], None, m.axis, self._power) for m in kind.members]
        scores = kind_scores(changes, self._power, references)
        located = top_fraction(scores, self.params["top_ratio"])
        self.report.append(describe(kind, scores, located))
        return located


# --- identity, cache key, recipe -----------------------------------------------------------


def recipe_record(recipe: Recipe, tuned: Checkpoint, base: Checkpoint) -> dict[str, Any]:
    """What the output records about how it was made (also in every shard's metadata).
    Deterministic: no timestamps, so the same inputs and seed give the same bytes."""
    return {
        "library": "neuron-fusion-studio",
        "version": __version__,
        **recipe.as_dict(),
        "tuned": tuned.ref,
        "base": base.ref,
    }


def cache_key(record: dict[str, Any], tuned: Checkpoint, base: Checkpoint) -> str:
    """Hash of the recipe and of the inputs' file names, sizes and modification times."""
    payload = {"recipe": record, "tuned": [str(tuned.directory.resolve()), tuned.fingerprint()], "base": [str(base.directory.resolve()), base.fingerprint()]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def seed_for(seed: int, name: str) -> int:
    """A per-tensor seed, so a tensor's random mask does not depend on merge order or device."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FusionError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise FusionError(f"device must be auto, cpu or cuda; got {device!r}")
    return torch.device(device)


# --- the merge ----------------------------------------------------------------------------


# Memory for an output tensor, by its name (ShardedWriter.buffer).
Buffers = Callable[[str], torch.Tensor]


def _merge_one(
    base_name: str, observe: Observer | None, *, sources: Sources, recipe: Recipe, device: torch.device, check: bool, buffers: Buffers | None
) -> torch.Tensor:
    """The output tensor of one merged tensor: merged by the recipe's method (Neuron-Fusion: the
    inner method only) on ``device``, in memory from ``buffers`` (else fresh), with the tuned
    model's extra vocabulary rows copied after the merged ones. ``check``: NaN or ±inf in an
    input is a FusionError naming it."""
    p = sources.planned(base_name)
    out = buffers(p.name) if buffers else torch.empty(p.shape, dtype=p.dtype, device=device)
    b, t = (x.to(device) for x in sources.pair(base_name))
    generator = torch.Generator().manual_seed(seed_for(recipe.seed, p.name)) if recipe.random else None
    try:
        recipe.merge(b, [t], generator, check=check, observe=observe, out=out[: p.rows] if p.rows else out)
    except NonFinite as err:
        raise sources.nonfinite(base_name, err.which) from None
    if p.rows:
        out[p.rows :] = sources.tuned.get(p.name)[p.rows :]
    return out


def _merge_tensor(
    p: Planned, sources: Sources, recipe: Recipe, locator: Locator | None, device: torch.device, check: bool, buffers: Buffers | None = None
) -> torch.Tensor:
    """One output tensor: copied, or merged by the recipe's method (for Neuron-Fusion, with the
    rest of its neuron kind, located and restored)."""
    if p.base_name is None:
        return sources.tuned.get(p.name)
    merge = functools.partial(_merge_one, sources=sources, recipe=recipe, device=device, check=check, buffers=buffers)
    return locator.merged(p.base_name, merge) if locator and locator.holds(p.base_name) else merge(p.base_name, None)


class MergeStream:
    """One merge as a stream of output tensors, computed one at a time in output order.

    ``fuse`` writes the stream to a checkpoint; the app loads it straight into an in-memory
    copy of the original model, so a visitor's variant needs no disk. Opening checks the inputs
    (architecture, shapes, recipe) before any tensor is computed. NaN or ±inf in a merged input
    is a FusionError naming it, unless ``allow_nonfinite``.
    """

    def __init__(
        self,
        tuned: str | Checkpoint,
        base: str | Checkpoint,
        recipe: Recipe,
        *,
        device: str = "auto",
        allow_pickle: bool = True,
        allow_nonfinite: bool = False,
    ) -> None:
        """``tuned``/``base``: references (path or hub id) or checkpoints already open, which a
        caller merging the same pair many times (the app) opens once."""
        self.recipe = recipe
        self.device = resolve_device(device)
        self.check = not allow_nonfinite
        self.tuned = tuned if isinstance(tuned, Checkpoint) else open_checkpoint(tuned, allow_pickle=allow_pickle)
        self.base = base if isinstance(base, Checkpoint) else open_checkpoint(base, allow_pickle=allow_pickle)
        self.plan = plan_merge(self.tuned, self.base)
        self.sources = Sources(self.plan, self.tuned, self.base)
        self.locator = Locator(self.plan, self.sources, recipe.params, device=self.device, check=self.check) if recipe.spec.locates_neurons else None
        self.record = recipe_record(recipe, self.tuned, self.base)
        self.key = cache_key(self.record, self.tuned, self.base)
        self.layout = detect_layout(self.tuned.keys())

    @property
    def report(self) -> list[dict[str, Any]]:
        """What Neuron-Locate found, per layer and kind (complete once the stream is consumed)."""
        return self.locator.report if self.locator else []

    def tensors(
        self, progress: ProgressFn | None = None, *, merged_only: bool = False, started: float | None = None, buffers: Buffers | None = None
    ) -> Iterator[tuple[Planned, torch.Tensor]]:
        """(planned output, tensor) in output order; ``merged_only`` skips the tensors copied
        unchanged from the tuned model (vision tower, projector). ``buffers`` gives the CPU memory
        each merged tensor is computed in, merging on the CPU (the writer's recycled buffers:
        the consumer must be done with a tensor before that memory is handed out again)."""
        buffers = buffers if self.device.type == "cpu" else None
        start = time.perf_counter() if started is None else started
        plan = [p for p in self.plan if p.base_name or not merged_only]
        total, done = sum(p.nbytes for p in plan), 0
        for p in plan:
            if progress:
                progress(Progress("merging", done, total, p.name, layer_of(p.base_name or ""), time.perf_counter() - start))
            yield p, _merge_tensor(p, self.sources, self.recipe, self.locator, self.device, self.check, buffers)
            done += p.nbytes


def fuse(
    tuned_ref: str,
    base_ref: str,
    method: str | Recipe,
    params: dict[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    seed: int = 0,
    device: str = "auto",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    allow_pickle: bool = True,
    cache_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    allow_nonfinite: bool = False,
) -> FuseResult:
    """Merge ``tuned_ref`` toward ``base_ref`` with ``method`` and write a checkpoint that
    ``from_pretrained`` loads as it is.

    ``out`` names the output directory; without it the output goes to ``cache_dir`` (default
    ``$NEURON_FUSION_CACHE`` or ``~/.cache/neuron-fusion``) under a key derived from the inputs
    and the recipe, and an earlier identical merge is reused.
    """
    start = time.perf_counter()
    recipe = as_recipe(method, params, seed)  # a method name and raw values are resolved here, once
    stream = MergeStream(tuned_ref, base_ref, recipe, device=device, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    plan, tuned, record, key = stream.plan, stream.tuned, stream.record, stream.key
    cached = out is None
    if out is None:
        root = Path(cache_dir or os.environ.get("NEURON_FUSION_CACHE") or Path.home() / ".cache" / "neuron-fusion")
        out = root / key[:24]
    slot = claim(Path(out), key, cached=cached)  # locked, checked, verified; see fusion.output
    if slot.recipe is not None:
        report_file = slot.out / REPORT_FILE
        report = json.loads(report_file.read_text())["kinds"] if report_file.is_file() else []
        return FuseResult(slot.out, True, slot.recipe, report, time.perf_counter() - start)
    staging = slot.staging
    entries = [Entry(p.name, p.shape, p.dtype) for p in plan]
    metadata = {"format": "pt", "fusion_recipe": json.dumps(record, sort_keys=True)}
    writer = ShardedWriter(staging, plan_shards(entries, shard_bytes), metadata)
    total = sum(p.nbytes for p in plan)
    try:
        for p, tensor in stream.tensors(progress, started=start, buffers=writer.buffer):
            writer.write(p.name, tensor)
        if progress:
            progress(Progress("writing", total, total, elapsed=time.perf_counter() - start))
        writer.close()
        for sidecar in tuned.sidecar_files():
            shutil.copyfile(sidecar, staging / sidecar.name)
        report = stream.report
        if report:
            (staging / REPORT_FILE).write_text(json_text({"recipe": record, "kinds": report}) + "\n")
        # the model card: the license notice (when none could be set) stays in it and is logged
        notice = write_card(staging, record, report, (tuned.directory, stream.base.directory), multimodal=stream.layout.name != "llm", out_name=slot.out.name)
        if notice:
            log.warning("%s: %s", slot.out / CARD_FILE, notice.replace("**", ""))
        recorded = slot.publish({**record, "key": key})
    except BaseException as err:
        writer.abort()
        slot.abandon(err)  # removes the staging directory and raises again, an OSError as one line
    seconds = time.perf_counter() - start
    if progress:
        progress(Progress("done", total, total, elapsed=seconds))
    return FuseResult(slot.out, False, recorded, report, seconds)


def inspect_pair(
    tuned_ref: str | Checkpoint, base_ref: str | Checkpoint, params: dict[str, Any] | Recipe | None = None, *, allow_pickle: bool = True, allow_nonfinite: bool = False
) -> dict[str, Any]:
    """Neuron-Locate over a whole pair without merging: per layer and kind, how many neurons,
    how many located, score quantiles and the sorted score curve (``python -m fusion inspect``).
    NaN or ±inf in an input is a FusionError naming it, unless ``allow_nonfinite``."""
    recipe = params if isinstance(params, Recipe) else resolve("neuron_fusion", params)
    if not recipe.spec.locates_neurons:
        raise FusionError(f"inspect locates neurons: it needs a Neuron-Fusion recipe, not one for '{recipe.method}'")
    locator = MergeStream(tuned_ref, base_ref, recipe, device="cpu", allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite).locator
    assert locator is not None  # a Neuron-Fusion recipe always has one
    for kind in locator.kinds:
        locator.locate(kind)
    kinds = locator.report
    layers = [k for k in kinds if k["layer"] is not None]
    summary = {
        "neurons": sum(k["neurons"] for k in kinds),
        "located": sum(k["located"] for k in kinds),
        "located_share": located_share(kinds),
        # the paper's question: how much of the change inside the decoder layers the located few hold
        "located_share_in_layers": located_share(layers),
    }
    return {"tuned": tuned_ref, "base": base_ref, "params": recipe.params, "summary": summary, "kinds": kinds}

"""The streaming, out-of-core merge: plan, locate, merge tensor by tensor, write, publish.

Inputs are memory-mapped (``fusion.checkpoint``), each output tensor is computed by a pure
method from ``fusion.methods`` and handed to the streaming writer (``fusion.writer``), so
peak memory is a few tensors whatever the model size. The output is assembled in a hidden
sibling directory and renamed into place only when complete; any failure removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .architectures import Family, detect_layout, family_for
from .checkpoint import Checkpoint, open_checkpoint
from .errors import FusionError
from .neurons import NeuronKind, change_scores, describe, layer_of, neuron_kinds, top_fraction
from .registry import Recipe, as_recipe, resolve
from .writer import Entry, ShardedWriter, plan_shards

RECIPE_FILE = "fusion_recipe.json"
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
    family they belong to."""
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
    return family


def plan_merge(tuned: Checkpoint, base: Checkpoint) -> list[Planned]:
    """Every output tensor, in output order, with where it comes from. Raises FusionError for a
    language-model tensor missing from the base or with a shape that cannot be reconciled."""
    family = check_compatible(tuned, base)
    layout = detect_layout(tuned.keys())
    head, embedding = family.tied_head
    tied = bool(base.text_config().get("tie_word_embeddings", False))
    plan = []
    for name in sorted(tuned.keys()):
        info = tuned.info(name)
        mapped = layout.base_key(name)
        if mapped is None or not info.dtype.is_floating_point:
            plan.append(Planned(name, None, info.shape, info.dtype))
            continue
        if mapped not in base and mapped == head and tied:
            mapped = embedding
        if mapped not in base:
            raise FusionError(f"language-model tensor '{name}' has no counterpart '{mapped}' in the base model {base.ref}")
        base_shape = base.info(mapped).shape
        rows = None
        if base_shape != info.shape:
            extra_vocab = (
                mapped in family.vocab_tensors and len(info.shape) == 2 and info.shape[1:] == base_shape[1:] and info.shape[0] > base_shape[0]
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

    def pair(self, base_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        p = self._planned[base_name]
        b, t = self.base.get(base_name), self.tuned.get(p.name)
        return (b[: p.rows], t[: p.rows]) if p.rows else (b, t)


class Locator:
    """Neuron-Locate, lazily: a kind's neurons are scored on first use, on the CPU (so that CPU
    and GPU merges locate the same neurons), and remembered with their report."""

    def __init__(self, plan: list[Planned], sources: Sources, params: dict[str, Any]) -> None:
        family = family_for(sources.tuned.text_config().get("model_type"))
        self.params = params
        self.kinds = neuron_kinds(merged_shapes(plan), params["neuron_unit"], params["others"], family)
        self._by_tensor = {m.tensor: (k, m.axis) for k in self.kinds for m in k.members}
        self._sources = sources
        self._located: dict[NeuronKind, torch.Tensor] = {}
        self.report: list[dict[str, Any]] = []

    def locate(self, kind: NeuronKind) -> torch.Tensor:
        if kind not in self._located:
            pairs = {m.tensor: self._sources.pair(m.tensor) for m in kind.members}
            scores = change_scores(
                kind,
                {n: b for n, (b, _) in pairs.items()},
                {n: [t] for n, (_, t) in pairs.items()},
                self.params["score_norm"],
                self.params["relative"],
            )
            self._located[kind] = top_fraction(scores, self.params["top_ratio"])
            self.report.append(describe(kind, scores, self._located[kind]))
        return self._located[kind]

    def neurons_of(self, base_name: str) -> tuple[int, torch.Tensor] | None:
        """(axis, located indices) of a merged tensor, or None if it holds no neurons."""
        if base_name not in self._by_tensor:
            return None
        kind, axis = self._by_tensor[base_name]
        return axis, self.locate(kind)


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


def _merge_tensor(p: Planned, sources: Sources, recipe: Recipe, locator: Locator | None, device: torch.device) -> torch.Tensor:
    """One output tensor: copied, or merged by the recipe's method (which, for Neuron-Fusion,
    also restores the located neurons), with any extra vocabulary rows appended from the tuned model."""
    if p.base_name is None:
        return sources.tuned.get(p.name)
    b, t = (x.to(device) for x in sources.pair(p.base_name))
    generator = torch.Generator().manual_seed(seed_for(recipe.seed, p.name)) if recipe.random else None
    located = locator.neurons_of(p.base_name) if locator else None
    merged = recipe.merge(b, [t], generator, located)
    if p.rows:
        merged = torch.cat([merged, sources.tuned.get(p.name)[p.rows :].to(device)])
    return merged


class MergeStream:
    """One merge as a stream of output tensors, computed one at a time in output order.

    ``fuse`` writes the stream to a checkpoint; the app loads it straight into an in-memory
    copy of the original model, so a visitor's variant needs no disk. Opening checks the inputs
    (architecture, shapes, recipe) before any tensor is computed.
    """

    def __init__(self, tuned_ref: str, base_ref: str, recipe: Recipe, *, device: str = "auto", allow_pickle: bool = True) -> None:
        self.recipe = recipe
        self.device = resolve_device(device)
        self.tuned = open_checkpoint(tuned_ref, allow_pickle=allow_pickle)
        self.base = open_checkpoint(base_ref, allow_pickle=allow_pickle)
        self.plan = plan_merge(self.tuned, self.base)
        self.sources = Sources(self.plan, self.tuned, self.base)
        self.locator = Locator(self.plan, self.sources, recipe.params) if recipe.spec.locates_neurons else None
        self.record = recipe_record(recipe, self.tuned, self.base)
        self.key = cache_key(self.record, self.tuned, self.base)
        self.layout = detect_layout(self.tuned.keys())

    @property
    def report(self) -> list[dict[str, Any]]:
        """What Neuron-Locate found, per layer and kind (complete once the stream is consumed)."""
        return self.locator.report if self.locator else []

    def tensors(self, progress: ProgressFn | None = None, *, merged_only: bool = False, started: float | None = None) -> Iterator[tuple[Planned, torch.Tensor]]:
        """(planned output, tensor) in output order; ``merged_only`` skips the tensors copied
        unchanged from the tuned model (vision tower, projector)."""
        start = time.perf_counter() if started is None else started
        plan = [p for p in self.plan if p.base_name or not merged_only]
        total, done = sum(p.nbytes for p in plan), 0
        for p in plan:
            if progress:
                progress(Progress("merging", done, total, p.name, layer_of(p.base_name or ""), time.perf_counter() - start))
            yield p, _merge_tensor(p, self.sources, self.recipe, self.locator, self.device)
            done += p.nbytes


def _prepare_out(out: Path, key: str) -> bool:
    """True if ``out`` already holds this exact merge; FusionError if it holds anything else."""
    if not out.exists():
        return False
    recipe_file = out / RECIPE_FILE
    if recipe_file.is_file():
        try:
            if json.loads(recipe_file.read_text()).get("key") == key:
                return True
        except json.JSONDecodeError:
            pass
    if out.is_dir() and not any(out.iterdir()):
        return False
    raise FusionError(f"output directory {out} already exists and holds something else; choose another --out or remove it")


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
) -> FuseResult:
    """Merge ``tuned_ref`` toward ``base_ref`` with ``method`` and write a checkpoint that
    ``from_pretrained`` loads as it is.

    ``out`` names the output directory; without it the output goes to ``cache_dir`` (default
    ``$NEURON_FUSION_CACHE`` or ``~/.cache/neuron-fusion``) under a key derived from the inputs
    and the recipe, and an earlier identical merge is reused.
    """
    start = time.perf_counter()
    recipe = as_recipe(method, params, seed)  # a method name and raw values are resolved here, once
    stream = MergeStream(tuned_ref, base_ref, recipe, device=device, allow_pickle=allow_pickle)
    plan, tuned, record, key = stream.plan, stream.tuned, stream.record, stream.key
    if out is None:
        root = Path(cache_dir or os.environ.get("NEURON_FUSION_CACHE") or Path.home() / ".cache" / "neuron-fusion")
        out = root / key[:24]
    out = Path(out)
    if _prepare_out(out, key):
        recorded = json.loads((out / RECIPE_FILE).read_text())
        report_file = out / REPORT_FILE
        report = json.loads(report_file.read_text())["kinds"] if report_file.is_file() else []
        return FuseResult(out, True, recorded, report, time.perf_counter() - start)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    entries = [Entry(p.name, p.shape, p.dtype) for p in plan]
    metadata = {"format": "pt", "fusion_recipe": json.dumps(record, sort_keys=True)}
    writer = ShardedWriter(staging, plan_shards(entries, shard_bytes), metadata)
    total = sum(p.nbytes for p in plan)
    try:
        for p, tensor in stream.tensors(progress, started=start):
            writer.write(p.name, tensor)
        if progress:
            progress(Progress("writing", total, total, elapsed=time.perf_counter() - start))
        writer.close()
        for sidecar in tuned.sidecar_files():
            shutil.copyfile(sidecar, staging / sidecar.name)
        report = stream.report
        (staging / RECIPE_FILE).write_text(json.dumps({**record, "key": key}, indent=2) + "\n")
        if report:
            (staging / REPORT_FILE).write_text(json.dumps({"recipe": record, "kinds": report}) + "\n")
        if out.exists():
            out.rmdir()  # an empty directory, checked by _prepare_out
        os.rename(staging, out)
    except BaseException:
        writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    if progress:
        progress(Progress("done", total, total, elapsed=seconds))
    return FuseResult(out, False, {**record, "key": key}, report, seconds)


def inspect_pair(tuned_ref: str, base_ref: str, params: dict[str, Any] | Recipe | None = None, *, allow_pickle: bool = True) -> dict[str, Any]:
    """Neuron-Locate over a whole pair without merging: per layer and kind, how many neurons,
    how many located, score quantiles and the sorted score curve (``python -m fusion inspect``)."""
    recipe = params if isinstance(params, Recipe) else resolve("neuron_fusion", params)
    if not recipe.spec.locates_neurons:
        raise FusionError(f"inspect locates neurons: it needs a Neuron-Fusion recipe, not one for '{recipe.method}'")
    tuned = open_checkpoint(tuned_ref, allow_pickle=allow_pickle)
    base = open_checkpoint(base_ref, allow_pickle=allow_pickle)
    plan = plan_merge(tuned, base)
    locator = Locator(plan, Sources(plan, tuned, base), recipe.params)
    for kind in locator.kinds:
        locator.locate(kind)
    kinds = locator.report
    total = sum(k["sum_sq"] for k in kinds)
    summary = {
        "neurons": sum(k["neurons"] for k in kinds),
        "located": sum(k["located"] for k in kinds),
        "located_share": sum(k["located_sum_sq"] for k in kinds) / total if total else 0.0,
    }
    return {"tuned": tuned_ref, "base": base_ref, "params": recipe.params, "summary": summary, "kinds": kinds}

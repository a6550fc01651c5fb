"""Neuron location for the language-model families of ``fusion.architectures`` (Llama/Vicuna,
Mistral, Qwen2).

A *neuron* is a slice of one or more weight matrices that rises and falls together
(spec, "Neuron-Fusion" step 1):

- FFN neuron k: row k of ``gate_proj`` and ``up_proj`` and column k of ``down_proj``;
- attention value neuron j: column j of ``o_proj``, tied with row j of ``v_proj`` when their
  sizes agree (multi-head attention); with grouped-query attention they are kinds of their own;
- query/key neurons: rows of ``q_proj``/``k_proj`` (with their bias entries, as in Qwen2).

Neuron-Locate scores each neuron by the norm of its change and keeps the top fraction within
each layer and kind. Scores are accumulated in row blocks (``SliceSums``), so no float32 copy of
a whole matrix is made: either straight from the (memory-mapped) checkpoint tensors
(``slice_change``), or from the blocks of Δ that a merge computes anyway (``fusion.merge``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .architectures import LLAMA, SUPPORTED_MODEL_TYPES, Family
from .errors import FusionError
from .methods import count_for
from .sparsify import Scratch, row_blocks

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_CURVE_POINTS = 64
QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


@dataclass(frozen=True)
class Member:
    """A tensor taking part in a neuron kind; ``axis`` 0: neurons are rows, 1: columns."""

    tensor: str
    axis: int


@dataclass(frozen=True)
class NeuronKind:
    """The neurons of one kind in one layer (``layer`` None: outside the decoder layers)."""

    layer: int | None
    kind: str
    members: tuple[Member, ...]
    size: int


def layer_of(name: str) -> int | None:
    """Decoder layer index of a base-LLM tensor name, or None."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def _short(name: str) -> str:
    """'model.layers.3.input_layernorm.weight' -> 'input_layernorm'."""
    parts = [p for p in name.split(".") if p not in ("model", "layers", "weight", "bias") and not p.isdigit()]
    return ".".join(parts) + (".bias" if name.endswith(".bias") else "")


def _projection_name(proj: str) -> str:
    """'mlp.gate_proj' -> 'gate': a kind name when each projection is its own kind."""
    return proj.rsplit(".", 1)[-1].removesuffix("_proj")


def _projection_kinds(layer: int, parts: Mapping[str, str], shapes: Mapping[str, Sequence[int]], unit: str, family: Family) -> list[NeuronKind]:
    """Neuron kinds of one decoder layer from its projection tensors (``parts``:
    'self_attn.q_proj.weight' -> full name), grouped as the family says."""

    def rows(proj: str) -> list[Member]:
        return [Member(parts[f"{proj}.{w}"], 0) for w in ("weight", "bias") if f"{proj}.{w}" in parts]

    def cols(proj: str) -> list[Member]:
        return [Member(parts[f"{proj}.weight"], 1)] if f"{proj}.weight" in parts else []

    def size(members: list[Member]) -> int | None:
        return shapes[members[0].tensor][members[0].axis] if members else None

    groups: list[tuple[str, list[Member]]] = []
    for group in family.groups:
        row_members = [m for proj in group.rows for m in rows(proj)]
        col_members = [m for proj in group.cols for m in cols(proj)]
        if unit == "row":  # every projection alone: its rows, or its columns
            groups += [(_projection_name(proj), rows(proj)) for proj in group.rows]
            groups += [(_projection_name(proj), cols(proj)) for proj in group.cols]
        elif group.split and row_members and col_members and size(row_members) != size(col_members):
            groups += [(group.split[0], row_members), (group.split[1], col_members)]
        else:
            groups.append((group.kind, row_members + col_members))
    kinds = []
    for kind, members in groups:
        if not members:
            continue
        sizes = {shapes[m.tensor][m.axis] for m in members}
        if len(sizes) != 1:
            detail = ", ".join(f"{m.tensor} {tuple(shapes[m.tensor])}" for m in members)
            raise FusionError(f"layer {layer}: the {kind} neurons do not line up across {detail}")
        kinds.append(NeuronKind(layer, kind, tuple(members), sizes.pop()))
    return kinds


def neuron_kinds(shapes: Mapping[str, Sequence[int]], unit: str = "tied", others: str = "rows", family: Family = LLAMA) -> list[NeuronKind]:
    """All neuron kinds of a base LLM, from its merged tensors' names and shapes.

    ``others = "rows"`` makes every tensor outside the FFN/attention neurons a kind of its own
    whose rows (elements, for vectors) are located like neurons, so ``top_ratio = 1`` restores
    the whole tuned model; ``"inner"`` leaves them to the inner method alone.
    """
    per_layer: dict[int, dict[str, str]] = {}
    for name in shapes:
        m = family.layer_tensor.match(name)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[f"{m.group(2)}.{m.group(3)}"] = name
    kinds = [k for layer, parts in sorted(per_layer.items()) for k in _projection_kinds(layer, parts, shapes, unit, family)]
    if not kinds:
        raise FusionError(
            "no FFN or attention neurons found (tensors named model.layers.N.mlp.gate_proj.weight, ...): "
            f"neuron location supports {', '.join(SUPPORTED_MODEL_TYPES)} language models"
        )
    if others == "rows":
        claimed = {m.tensor for k in kinds for m in k.members}
        for name, shape in shapes.items():
            if name not in claimed and len(shape) > 0:
                kinds.append(NeuronKind(layer_of(name), _short(name), (Member(name, 0),), shape[0]))
    return kinds


class SliceSums:
    """Σ |x|^power over each slice along ``axis`` (rows for 0, columns for 1) of a tensor of
    ``shape``, accumulated one row block at a time, in float32.

    Blocks must come in the order and partition of ``fusion.sparsify.row_blocks``: column sums
    add up block partials, so the same partition gives the same bits whether the blocks come
    from ``slice_change`` or from a merge that computes them anyway."""

    def __init__(self, shape: Sequence[int], axis: int, power: int, device: torch.device | str = "cpu") -> None:
        self.axis, self.power = axis, power
        self.width = math.prod(shape[1:])
        self.total = torch.zeros(shape[axis] if len(shape) > 1 else shape[0], dtype=torch.float32, device=device)
        self._scratch = Scratch()

    def add(self, rows: slice, block: Tensor) -> None:
        """Add one row block (float32, left unchanged)."""
        x = (torch.abs if self.power == 1 else torch.square)(block, out=self._scratch.like("powers", block)).reshape(-1, self.width)
        if self.axis == 0:
            self.total[rows] += x.sum(1)
        else:
            self.total += x.sum(0)


def slice_change(base: Tensor, tuned: Sequence[Tensor] | None, axis: int, power: int) -> Tensor:
    """Σ |Δ|^power over each slice along ``axis`` (rows for 0, columns for 1) of Δ = Σ_t θ_t − θ_base,
    or of θ_base itself when ``tuned`` is None. float32, walked in row blocks."""
    sums = SliceSums(base.shape, axis, power, base.device)
    for rows in row_blocks(base.shape):
        b = base[rows].float()
        if tuned is None:
            sums.add(rows, b)
            continue
        d = tuned[0][rows].float() - b
        for t in tuned[1:]:
            d += t[rows].float() - b
        sums.add(rows, d)
    return sums.total


def kind_scores(changes: Sequence[Tensor], power: int, references: Sequence[Tensor] | None = None) -> Tensor:
    """A kind's scores from its members' ``slice_change`` sums: the norm of each neuron's Δ
    over all its parameters, divided by the norm of the same base parameters when
    ``references`` (the members' sums of θ_base) are given."""
    total = sum(changes)
    if references is not None:
        total = total / sum(references).clamp_min(1e-12)
    return total.sqrt_() if power == 2 else total


def change_scores(
    kind: NeuronKind,
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Sequence[Tensor]],
    score_norm: str = "l2",
    relative: bool = False,
) -> Tensor:
    """Neuron-Locate's score: the norm of each neuron's Δ over all its parameters, divided by
    the norm of the same base parameters when ``relative``."""
    power = score_power(score_norm)
    changes = [slice_change(base[m.tensor], tuned[m.tensor], m.axis, power) for m in kind.members]
    references = [slice_change(base[m.tensor], None, m.axis, power) for m in kind.members] if relative else None
    return kind_scores(changes, power, references)


def score_power(score_norm: str) -> int:
    """The power of |Δ| that a score norm sums: 2 for l2, 1 for l1."""
    return 2 if score_norm == "l2" else 1


def top_fraction(scores: Tensor, ratio: float) -> Tensor:
    """Indices (ascending) of the ``ratio`` fraction of highest scores, round-half-up count;
    equal scores are taken in index order, so the choice is deterministic."""
    count = count_for(ratio, scores.numel())
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:count].sort().values


def describe(kind: NeuronKind, scores: Tensor, located: Tensor) -> dict[str, Any]:
    """What the app plots and ``inspect`` prints: counts, quantiles, and the sorted score curve
    sampled at log-spaced ranks (the power law shows as a straight line on log-log axes)."""
    s = scores.detach().float().cpu()
    ordered = s.sort(descending=True).values
    n = ordered.numel()
    ranks = sorted({min(n, max(1, round(n ** (i / (_CURVE_POINTS - 1))))) for i in range(_CURVE_POINTS)}) if n else []
    return {
        "layer": kind.layer,
        "kind": kind.kind,
        "neurons": n,
        "located": int(located.numel()),
        "threshold": float(s[located].min()) if located.numel() else None,
        "sum_sq": float(s.square().sum()),
        "located_sum_sq": float(s[located].square().sum()),
        "quantiles": {str(q): float(torch.quantile(s, q)) if n else math.nan for q in QUANTILES},
        "curve": [[r, float(ordered[r - 1])] for r in ranks],
        "tensors": [m.tensor for m in kind.members],
    }

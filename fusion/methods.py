"""The merge maths: every method as a pure function of tensors.

Each method takes the base tensor θ_base, the tuned tensors [θ_1 .. θ_N] of the same shape, its
parameters and a ``torch.Generator`` (used by the random methods only), and returns the merged
tensor in the dtype of the first tuned tensor. Arithmetic is float32 whatever the storage
dtype. Notation and defaults follow ``shared/spec/fusion-methods.md``:

    θ_merge = θ_base + F(Sub(Δ)),    Δ_t = θ_t − θ_base

Nothing here reads files or knows about checkpoints; ``fusion.merge`` streams tensors through
these functions one at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Params = Mapping[str, Any]

# Rows per block when a method walks a large tensor in slices, so that float32 temporaries
# stay a few MB instead of a full copy of the tensor.
_BLOCK_ELEMENTS = 1 << 22


def task_vectors(base: Tensor, tuned: Sequence[Tensor]) -> list[Tensor]:
    """Δ_t = θ_t − θ_base in float32."""
    b = base.float()
    return [t.float() - b for t in tuned]


def apply_delta(base: Tensor, delta: Tensor, dtype: torch.dtype) -> Tensor:
    """θ_base + δ, computed in float32 and stored in ``dtype``."""
    return delta.add_(base.float()).to(dtype)


def _lerp(base: Tensor, tuned: Tensor, weight: float) -> Tensor:
    """θ_base + w·(θ_t − θ_base) in one fused pass.

    ``torch.lerp`` computes in float32 even on bf16/fp16 storage, and returns ``tuned`` exactly
    at w = 1 and ``base`` exactly at w = 0, which the spec's identities require bit for bit.
    """
    if base.dtype != tuned.dtype:
        return torch.lerp(base.float(), tuned.float(), weight).to(tuned.dtype)
    return torch.lerp(base, tuned, weight)


# --- Sub: which parts of a task vector to keep -------------------------------------------


def magnitude_at_rank(x: Tensor, rank: int) -> float:
    """The ``rank``-th largest |x| (1-based), without sorting the whole tensor.

    Non-negative float32 values order like their bit patterns, so a histogram of the top 16
    bits finds the bucket that holds the wanted rank; only that bucket is then sorted. This keeps
    the memory to a few small slices, where ``kthvalue``/``topk`` copy the tensor and add int64
    indices (3x its size): the difference between fitting a 7B embedding in RAM or not.
    """
    flat = x.reshape(-1)
    if not 1 <= rank <= flat.numel():
        raise ValueError(f"rank {rank} is outside 1..{flat.numel()}")
    slices = flat.split(_BLOCK_ELEMENTS)
    buckets = torch.zeros(1 << 15, dtype=torch.int64, device=x.device)
    for part in slices:
        bits = part.abs().float().view(torch.int32)  # a fresh tensor: ``part`` is untouched
        buckets += torch.bincount(bits.bitwise_right_shift_(16), minlength=1 << 15)
    above = buckets.flip(0).cumsum(0)  # number of values in this bucket or a higher one
    top = int(torch.searchsorted(above, torch.tensor(rank, device=x.device)))
    bucket = (1 << 15) - 1 - top
    higher = int(above[top - 1]) if top > 0 else 0
    members = []
    for part in slices:
        mag = part.abs().float()
        members.append(mag[mag.view(torch.int32).bitwise_right_shift(16) == bucket])
    candidates = torch.cat(members)
    # the (rank - higher)-th largest among the candidates
    return float(candidates.kthvalue(candidates.numel() - (rank - higher) + 1).values)


def count_for(fraction: float, n: int) -> int:
    """round(fraction · n), halves rounded up, as an element or neuron count."""
    return min(n, int(fraction * n + 0.5))


def keep_largest(delta: Tensor, density: float) -> Tensor:
    """TIES trim: zero all but the ``density`` fraction of largest-magnitude entries (in place).

    Entries equal to the threshold are all kept, so the result does not depend on the order of
    equal values."""
    keep = count_for(density, delta.numel())
    if keep == 0:
        return delta.zero_()
    if keep < delta.numel():
        threshold = magnitude_at_rank(delta, keep)
        delta.mul_(delta.abs() >= threshold)
    return delta


def keep_band(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the smallest entries so
    that a ``density`` fraction remains (in place)."""
    n = delta.numel()
    top, keep = count_for(gamma, n), count_for(density, n)
    keep = min(keep, n - top)
    if keep == 0:
        return delta.zero_()
    mag = delta.abs()
    mask = mag >= magnitude_at_rank(delta, top + keep) if top + keep < n else torch.ones_like(mag, dtype=torch.bool)
    if top > 0:
        mask &= mag < magnitude_at_rank(delta, top)
    return delta.mul_(mask)


def random_keep(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: drop each entry with probability 1 − density, rescale the kept by 1/density (in
    place). The mask is drawn on the CPU so that CPU and GPU merges give the same bytes."""
    if density >= 1.0:
        return delta
    draw = torch.rand(delta.shape, generator=generator).to(delta.device)
    return delta.mul_(draw < density).div_(density)


def rank_keep(delta: Tensor, density: float, epsilon: float, generator: torch.Generator) -> Tensor:
    """DELLA: per row, drop probability falls linearly with the magnitude rank, from
    1 − density + ε/2 (smallest) to 1 − density − ε/2 (largest); kept entries are rescaled by
    1/(1 − p_i). Rows are processed in blocks (in place)."""
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 0 else delta.reshape(1, 1)
    width = rows.shape[1]
    spread = epsilon if width > 1 else 0.0
    p_low, step = 1.0 - density - spread / 2, spread / max(width - 1, 1)
    block = max(1, _BLOCK_ELEMENTS // width)
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block]
        # rank 0 = largest magnitude in its row
        order = part.abs().argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=part.device).expand_as(order))
        drop_p = rank.to(torch.float32).mul_(step).add_(p_low)
        draw = torch.rand(part.shape, generator=generator).to(part.device)
        part.mul_(draw >= drop_p).div_(1.0 - drop_p)
    return delta


# --- F: how kept task vectors are combined ------------------------------------------------


def disjoint_mean(deltas: Sequence[Tensor]) -> Tensor:
    """TIES sign election: per element, the sign of the sum wins, and the entries that agree
    with it are averaged (zeros do not vote)."""
    if len(deltas) == 1:
        return deltas[0]
    sign = torch.stack(deltas).sum(0).sign()
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for d in deltas:
        agree = (d.sign() == sign) & (d != 0)
        total += d * agree
        count += agree
    return total.div_(count.clamp_(min=1))


def _summed(deltas: Sequence[Tensor]) -> Tensor:
    total = deltas[0]
    for d in deltas[1:]:
        total += d
    return total


# --- the methods ----------------------------------------------------------------------------


def task_arithmetic(base: Tensor, tuned: Sequence[Tensor], params: Params, generator: torch.Generator | None = None) -> Tensor:
    """θ_base + λ · Σ_t Δ_t."""
    lam = params["lambda"]
    if len(tuned) == 1:
        return _lerp(base, tuned[0], lam)
    return apply_delta(base, _summed(task_vectors(base, tuned)).mul_(lam), tuned[0].dtype)


def ties(base: Tensor, tuned: Sequence[Tensor], params: Params, generator: torch.Generator | None = None) -> Tensor:
    """TIES-merging: trim each Δ_t to its top ``density``, elect signs, average the agreeing
    entries, scale by λ."""
    trimmed = [keep_largest(d, params["density"]) for d in task_vectors(base, tuned)]
    return apply_delta(base, disjoint_mean(trimmed).mul_(params["lambda"]), tuned[0].dtype)


def breadcrumbs(base: Tensor, tuned: Sequence[Tensor], params: Params, generator: torch.Generator | None = None) -> Tensor:
    """Model Breadcrumbs: drop outliers and the smallest entries of each Δ_t, then λ · Σ_t."""
    kept = [keep_band(d, params["density"], params["gamma"]) for d in task_vectors(base, tuned)]
    return apply_delta(base, _summed(kept).mul_(params["lambda"]), tuned[0].dtype)


def dare(base: Tensor, tuned: Sequence[Tensor], params: Params, generator: torch.Generator | None = None) -> Tensor:
    """DARE: random drop with rescale of each Δ_t, then λ · Σ_t."""
    assert generator is not None, "dare draws random masks: pass a seeded generator"
    kept = [random_keep(d, params["density"], generator) for d in task_vectors(base, tuned)]
    return apply_delta(base, _summed(kept).mul_(params["lambda"]), tuned[0].dtype)


def della(base: Tensor, tuned: Sequence[Tensor], params: Params, generator: torch.Generator | None = None) -> Tensor:
    """DELLA: magnitude-ranked random drop with rescale, TIES sign election, then λ."""
    assert generator is not None, "della draws random masks: pass a seeded generator"
    kept = [rank_keep(d, params["density"], params["epsilon"], generator) for d in task_vectors(base, tuned)]
    return apply_delta(base, disjoint_mean(kept).mul_(params["lambda"]), tuned[0].dtype)


def full_change(base: Tensor, tuned: Sequence[Tensor]) -> Tensor:
    """θ_base + Σ_t Δ_t: what a located neuron takes back (exactly θ_t when N = 1)."""
    if len(tuned) == 1:
        return tuned[0]
    return apply_delta(base, _summed(task_vectors(base, tuned)), tuned[0].dtype)


def restore(merged: Tensor, full: Tensor, axis: int, index: Tensor) -> Tensor:
    """Neuron-Restore: the slices ``index`` along ``axis`` (rows or columns) take their values
    from ``full`` (in place on ``merged``)."""
    if index.numel():
        merged.index_copy_(axis, index, full.index_select(axis, index))
    return merged

"""Sub: which part of each task vector Δ_t a method keeps, and how the kept part is rescaled.

Every sparsifier has one signature, ``(delta, params, generator) -> delta``, so that a method can
name its sparsifier in the registry and ``fusion.methods`` can pair it with any combiner. They
work in place on a float32 task vector that the caller owns (a fresh tensor from
``fusion.methods.task_vectors``), which keeps a large tensor's temporaries to one copy. ``params``
holds the method's resolved parameters; each sparsifier reads only its own. ``generator`` is used
by the random ones, which draw their masks on the CPU so that CPU and GPU merges give the same
bytes.

Neuron-Fusion's selection is by location rather than by value; it lives with the composition in
``fusion.methods`` (``restore``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

Params = Mapping[str, Any]
Sparsifier = Callable[[Tensor, Params, torch.Generator | None], Tensor]

# Elements per slice when a sparsifier walks a large tensor in pieces, so that float32
# temporaries stay a few MB instead of a full copy of the tensor.
BLOCK_ELEMENTS = 1 << 22


def count_for(fraction: float, n: int) -> int:
    """round(fraction · n), halves rounded up, as an element or neuron count.

    One rounding rule for every "keep this fraction" in the project (TIES, Breadcrumbs and the
    neuron selection), so that the same fraction always means the same count."""
    return min(n, int(fraction * n + 0.5))


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
    slices = flat.split(BLOCK_ELEMENTS)
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


def keep_all(delta: Tensor, params: Params, generator: torch.Generator | None = None) -> Tensor:
    """No Sub (task arithmetic): every entry kept as it is."""
    return delta


def magnitude(delta: Tensor, params: Params, generator: torch.Generator | None = None) -> Tensor:
    """TIES trim: zero all but the ``density`` fraction of largest-magnitude entries.

    Entries equal to the threshold are all kept, so the result does not depend on the order of
    equal values."""
    keep = count_for(params["density"], delta.numel())
    if keep == 0:
        return delta.zero_()
    if keep < delta.numel():
        threshold = magnitude_at_rank(delta, keep)
        delta.mul_(delta.abs() >= threshold)
    return delta


def band(delta: Tensor, params: Params, generator: torch.Generator | None = None) -> Tensor:
    """Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the smallest entries so
    that a ``density`` fraction remains."""
    n = delta.numel()
    top, keep = count_for(params["gamma"], n), count_for(params["density"], n)
    keep = min(keep, n - top)
    if keep == 0:
        return delta.zero_()
    mag = delta.abs()
    mask = mag >= magnitude_at_rank(delta, top + keep) if top + keep < n else torch.ones_like(mag, dtype=torch.bool)
    if top > 0:
        mask &= mag < magnitude_at_rank(delta, top)
    return delta.mul_(mask)


def _draw(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws from the CPU generator, moved to ``device``: the same mask wherever
    the merge runs."""
    assert generator is not None, "this sparsifier draws random masks: pass a seeded generator"
    return torch.rand(shape, generator=generator).to(device)


def random(delta: Tensor, params: Params, generator: torch.Generator | None = None) -> Tensor:
    """DARE: drop each entry with probability 1 − density, rescale the kept by 1/density."""
    density = params["density"]
    if density >= 1.0:
        return delta
    return delta.mul_(_draw(delta.shape, generator, delta.device) < density).div_(density)


def ranked(delta: Tensor, params: Params, generator: torch.Generator | None = None) -> Tensor:
    """DELLA: per row, the drop probability falls linearly with the magnitude rank, from
    1 − density + ε/2 (smallest) to 1 − density − ε/2 (largest); kept entries are rescaled by
    1/(1 − p_i). A vector is one row. Rows are processed in blocks to bound the temporaries."""
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 0 else delta.reshape(1, 1)
    width = rows.shape[1]
    spread = params["epsilon"] if width > 1 else 0.0
    p_low, step = 1.0 - params["density"] - spread / 2, spread / max(width - 1, 1)
    block = max(1, BLOCK_ELEMENTS // width)
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block]
        # rank 0 = largest magnitude in its row
        order = part.abs().argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=part.device).expand_as(order))
        drop_p = rank.to(torch.float32).mul_(step).add_(p_low)
        part.mul_(_draw(part.shape, generator, part.device) >= drop_p).div_(1.0 - drop_p)
    return delta


# The names the registry gives each method's Sub.
SPARSIFIERS: dict[str, Sparsifier] = {"all": keep_all, "magnitude": magnitude, "band": band, "random": random, "ranked": ranked}

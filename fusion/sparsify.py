"""Sub: which part of each task vector Δ_t a method keeps, and how the kept part is rescaled.

A sparsifier is a ``Sub`` in two steps, so that a merge of one tuned model can stream its task
vector block by block instead of holding it (a float32 Δ of a whole tensor is a fresh allocation
whose page faults cost more than computing Δ again): ``prepare`` reads the whole vector for what
the rule needs (TIES' and Breadcrumbs' magnitude thresholds), ``apply`` then changes one row
block in place. Calling a Sub, ``(delta, params, generator) -> delta``, does both over a whole
float32 task vector that the caller owns, in place; that is how several tuned models are merged,
and it lets a method name its sparsifier in the registry and ``fusion.methods`` pair it with any
combiner. ``params`` holds the method's resolved parameters; each sparsifier reads only its own.
``generator`` is used by the random ones, which draw their masks on the CPU so that CPU and GPU
merges give the same bytes.

Everything walks row blocks (``row_blocks``) whose temporaries, a few MB, stay in cache and are
reused by the allocator. Masks are float32 (0 or 1), not bool: multiplying by them gives the same
bytes as by a bool mask (which is promoted to 0.0/1.0), and on the CPU a float comparison and
product cost a fraction of their bool versions.

Neuron-Fusion's selection is by location rather than by value; it lives with the composition in
``fusion.methods`` (``restore``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Params = Mapping[str, Any]
# A fresh pass over a task vector's float32 row blocks, in order (read only).
BlockSource = Callable[[], Iterable[Tensor]]

# Elements per row block: a block's float32 temporaries (a few MB) stay in cache and are reused
# by the allocator. Neuron scores are accumulated over these same blocks (``fusion.neurons``),
# so a merge can score the blocks it computes anyway and get the same sums.
BLOCK_ELEMENTS = 1 << 20
_BUCKETS = 1 << 15  # the top 16 bits of a non-negative float32 (its sign bit is 0)


def count_for(fraction: float, n: int) -> int:
    """round(fraction · n), halves rounded up, as an element or neuron count.

    One rounding rule for every "keep this fraction" in the project (TIES, Breadcrumbs and the
    neuron selection), so that the same fraction always means the same count."""
    return min(n, int(fraction * n + 0.5))


def row_blocks(shape: Sequence[int]) -> Iterator[slice]:
    """Slices of the leading dimension of a tensor of ``shape``, each about BLOCK_ELEMENTS
    elements and at least one row; a vector (or scalar) is one block, so that a block always holds
    whole rows of the last dimension (DELLA ranks within them). Every blocked pass uses this."""
    if len(shape) <= 1:
        return iter([slice(None)])
    rows, width = shape[0], math.prod(shape[1:])
    step = max(1, BLOCK_ELEMENTS // max(width, 1))
    return (slice(start, start + step) for start in range(0, rows, step))


def as_rows(x: Tensor) -> Tensor:
    """``x`` with at least one dimension (a view), so that row blocks cover a scalar too."""
    return x if x.dim() else x.reshape(1)


def blocks(x: Tensor) -> Iterator[Tensor]:
    """``x`` as consecutive row blocks (views): what a blocked pass reads and writes in place."""
    rows = as_rows(x)
    return (rows[r] for r in row_blocks(rows.shape))


class Scratch:
    """Memory for the temporaries of a blocked pass, by role, kept from block to block.

    glibc hands freed multi-MB memory back to the system (it trims its heap), so a fresh
    temporary per block pays a page fault every 4 KiB, which costs more than the arithmetic on
    it (measured: a float32 subtraction of 1M entries, 1.3 ms into fresh memory, 0.15 ms into
    reused memory)."""

    def __init__(self) -> None:
        self._memory: dict[str, Tensor] = {}

    def like(self, role: str, x: Tensor, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """Uninitialised memory of ``x``'s shape for ``role`` (float32 and ``x``'s device unless
        told otherwise), valid until the next request for that role."""
        n, device = x.numel(), torch.device(device or x.device)
        memory = self._memory.get(role)
        if memory is None or memory.numel() < n or memory.dtype != dtype or memory.device != device:
            memory = self._memory[role] = torch.empty(n, dtype=dtype, device=device)
        return memory[:n].view(x.shape)


class TaskVector:
    """Δ = θ_t − θ_base of one tuned model in float32, one row block at a time, computed from the
    inputs each time it is asked for (a pass over a whole Δ held in memory would cost a fresh
    allocation of 4 bytes an entry, and its page faults)."""

    def __init__(self, base: Tensor, tuned: Tensor) -> None:
        self.base, self.tuned = as_rows(base), as_rows(tuned)
        self._scratch = Scratch()

    def rows(self) -> Iterator[slice]:
        return row_blocks(self.base.shape)

    def block(self, rows: slice) -> tuple[Tensor, Tensor]:
        """(Δ, θ_base) of one row block in float32, both overwritten by the next call."""
        b, t = self.base[rows], self.tuned[rows]
        base = self._scratch.like("base", b).copy_(b)
        return self._scratch.like("delta", t).copy_(t).sub_(base), base

    def deltas(self) -> Iterator[Tensor]:
        """A pass over Δ's blocks (a BlockSource); each is overwritten by the next."""
        return (self.block(rows)[0] for rows in self.rows())


def magnitudes_at_ranks(source: BlockSource, n: int, ranks: Sequence[int]) -> list[float]:
    """The ``rank``-th largest |x| (1-based) for each of ``ranks``, among the ``n`` values of
    ``source``'s blocks, without sorting them.

    Non-negative float32 values order like their bit patterns, so one histogram of the top 16
    bits finds the bucket that holds each wanted rank; only those buckets' members are then
    collected and sorted. Two passes over the blocks, and memory for a few of them, where
    ``kthvalue``/``topk`` copy the tensor and add int64 indices (3x its size): the difference
    between fitting a 7B embedding in RAM or not. Several ranks (Breadcrumbs' two thresholds)
    share the two passes.
    """
    for rank in ranks:
        if not 1 <= rank <= n:
            raise ValueError(f"rank {rank} is outside 1..{n}")
    scratch = Scratch()

    def bucketed(part: Tensor) -> tuple[Tensor, Tensor]:
        """|part| and the histogram bucket of each: the top 16 bits of a non-negative float32."""
        mag = torch.abs(part, out=scratch.like("mag", part)).reshape(-1)
        return mag, torch.bitwise_right_shift(mag.view(torch.int32), 16, out=scratch.like("bucket", mag, torch.int32))

    counts: Tensor | None = None
    for part in source():
        found = torch.bincount(bucketed(part)[1], minlength=_BUCKETS)
        counts = found if counts is None else counts.add_(found)
    assert counts is not None
    above = counts.flip(0).cumsum(0)  # number of values in this bucket or a higher one
    wanted = []
    for rank in ranks:
        top = int(torch.searchsorted(above, torch.tensor(rank, device=above.device)))
        wanted.append((_BUCKETS - 1 - top, rank - (int(above[top - 1]) if top > 0 else 0)))
    members: dict[int, list[Tensor]] = {bucket: [] for bucket, _ in wanted}
    for part in source():
        mag, bucket_of = bucketed(part)
        for bucket, chosen in members.items():
            chosen.append(mag[bucket_of == bucket])
    found_in = {bucket: torch.cat(chosen) for bucket, chosen in members.items()}
    # the k-th largest among a bucket's members
    return [float(found_in[bucket].kthvalue(found_in[bucket].numel() - k + 1).values) for bucket, k in wanted]


def magnitude_at_rank(x: Tensor, rank: int) -> float:
    """The ``rank``-th largest |x| (1-based) of a tensor; see ``magnitudes_at_ranks``."""
    return magnitudes_at_ranks(lambda: blocks(x), x.numel(), [rank])[0]


@dataclass(frozen=True)
class Sub:
    """A sparsifier: ``prepare(source, n, params)`` reads the task vector (its ``n`` entries as
    blocks from ``source``) for what its rule needs, ``apply(block, prepared, params, generator,
    scratch)`` changes one row block in place (its temporaries in ``scratch``, one per pass).
    Calling it does both over a whole task vector, in place."""

    prepare: Callable[[BlockSource, int, Params], Any]
    apply: Callable[[Tensor, Any, Params, torch.Generator | None, Scratch], None]

    def __call__(self, delta: Tensor, params: Params, generator: torch.Generator | None = None) -> Tensor:
        prepared, scratch = self.prepare(lambda: blocks(delta), delta.numel(), params), Scratch()
        for part in blocks(delta):
            self.apply(part, prepared, params, generator, scratch)
        return delta


def _nothing(source: BlockSource, n: int, params: Params) -> None:
    """``prepare`` of a Sub that decides entry by entry."""
    return None


@dataclass(frozen=True)
class Band:
    """What TIES and Breadcrumbs keep: the entries with low <= |δ| < high (a bound of None is
    open), or none at all (``empty``). Entries equal to a threshold are kept or dropped together,
    so the result does not depend on the order of equal values."""

    low: float | None = None
    high: float | None = None
    empty: bool = False


def _keep_band(part: Tensor, band: Band, params: Params, generator: torch.Generator | None, scratch: Scratch) -> None:
    """``apply`` of TIES and Breadcrumbs: zero the entries outside ``band``."""
    if band.empty:
        part.zero_()
        return
    mag, mask = torch.abs(part, out=scratch.like("mag", part)), scratch.like("mask", part)
    if band.low is not None:
        part.mul_(torch.ge(mag, band.low, out=mask))
    if band.high is not None:
        part.mul_(torch.lt(mag, band.high, out=mask))


def _top_band(source: BlockSource, n: int, params: Params) -> Band:
    """TIES trim: the ``density`` fraction of largest-magnitude entries."""
    keep = count_for(params["density"], n)
    if keep == 0:
        return Band(empty=True)
    return Band(low=magnitudes_at_ranks(source, n, [keep])[0]) if keep < n else Band()


def _middle_band(source: BlockSource, n: int, params: Params) -> Band:
    """Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the smallest entries so
    that a ``density`` fraction remains."""
    top, keep = count_for(params["gamma"], n), count_for(params["density"], n)
    keep = min(keep, n - top)
    if keep == 0:
        return Band(empty=True)
    low_rank = top + keep if top + keep < n else None  # the smallest kept magnitude, when smaller ones are dropped
    high_rank = top or None  # the smallest outlier dropped
    wanted = [r for r in (low_rank, high_rank) if r is not None]
    found = dict(zip(wanted, magnitudes_at_ranks(source, n, wanted)))
    return Band(found.get(low_rank), found.get(high_rank))


def _draw(like: Tensor, generator: torch.Generator | None, scratch: Scratch) -> Tensor:
    """Uniform [0, 1) draws of ``like``'s shape from the CPU generator, moved to its device: the
    same mask wherever the merge runs. Drawing a tensor block by block gives the same numbers as
    drawing it whole."""
    assert generator is not None, "this sparsifier draws random masks: pass a seeded generator"
    return torch.rand(like.shape, generator=generator, out=scratch.like("draw", like, device="cpu")).to(like.device)


def _drop_at_random(part: Tensor, prepared: None, params: Params, generator: torch.Generator | None, scratch: Scratch) -> None:
    """DARE: drop each entry with probability 1 − density, rescale the kept by 1/density."""
    density = params["density"]
    if density < 1.0:
        draw = _draw(part, generator, scratch)
        part.mul_(torch.lt(draw, density, out=draw)).div_(density)


def _drop_probability(mag: Tensor, p_low: float, step: float, scratch: Scratch) -> Tensor:
    """DELLA's drop probability of each entry, p_low + step · rank, where rank 0 is the largest
    magnitude in its row and equal magnitudes go in index order (a stable descending argsort).

    The order is that of one int64 key per entry, the magnitude's bits (descending) above the
    column index, so that all keys differ and any sort gives it; on the CPU numpy sorts the keys
    in place some 10x faster than torch's argsort, which dominated DELLA's time. Each sorted key
    names the column that takes the probability of its rank."""
    width = mag.shape[1]
    shift = max(1, (width - 1).bit_length())
    descending = torch.bitwise_not(mag.view(torch.int32), out=scratch.like("bits", mag, torch.int32)).bitwise_and_((1 << 31) - 1)
    keys = scratch.like("keys", mag, torch.int64).copy_(descending)
    keys.bitwise_left_shift_(shift).bitwise_or_(torch.arange(width, device=mag.device))
    if keys.device.type == "cpu":
        keys.numpy().sort(axis=1)
    else:
        keys = keys.sort(dim=1).values
    by_rank = torch.arange(width, dtype=torch.float32, device=mag.device).mul_(step).add_(p_low)
    return scratch.like("drop", mag).scatter_(1, keys.bitwise_and_((1 << shift) - 1), by_rank.expand_as(mag))


def _drop_by_rank(part: Tensor, prepared: None, params: Params, generator: torch.Generator | None, scratch: Scratch) -> None:
    """DELLA: per row, the drop probability falls linearly with the magnitude rank, from
    1 − density + ε/2 (smallest) to 1 − density − ε/2 (largest); kept entries are rescaled by
    1/(1 − p_i). A vector is one row."""
    rows = part.reshape(-1, part.shape[-1])
    width = rows.shape[1]
    spread = params["epsilon"] if width > 1 else 0.0
    mag = torch.abs(rows, out=scratch.like("mag", rows))
    drop_p = _drop_probability(mag, 1.0 - params["density"] - spread / 2, spread / max(width - 1, 1), scratch)
    draw = _draw(rows, generator, scratch)
    rows.mul_(torch.ge(draw, drop_p, out=draw)).div_(drop_p.neg_().add_(1.0))  # 1 − p, in place


def _as_is(part: Tensor, prepared: None, params: Params, generator: torch.Generator | None, scratch: Scratch) -> None:
    """Task arithmetic: every entry kept as it is."""


keep_all = Sub(_nothing, _as_is)
magnitude = Sub(_top_band, _keep_band)  # TIES
band = Sub(_middle_band, _keep_band)  # Breadcrumbs
random = Sub(_nothing, _drop_at_random)  # DARE
ranked = Sub(_nothing, _drop_by_rank)  # DELLA

# The names the registry gives each method's Sub.
SPARSIFIERS: dict[str, Sub] = {"all": keep_all, "magnitude": magnitude, "band": band, "random": random, "ranked": ranked}

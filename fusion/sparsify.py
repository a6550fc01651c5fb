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
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

Params = Mapping[str, Any]


class Passes(Protocol):
    """A task vector as ``prepare`` reads it: in passes over its float32 row blocks, or a sample."""

    numel: int

    def blocks(self) -> Iterable[Tensor]:
        """A fresh pass over the row blocks, in order (read only; each may be overwritten by the next)."""
        ...

    def sample(self, count: int) -> Tensor:
        """About ``count`` entries spread over the whole vector (``sample_positions``), float32,
        the caller's to change; all of them when the vector has no more than ``count``."""
        ...


# Elements per row block: a block's float32 temporaries (a few MB) stay in cache and are reused
# by the allocator. Neuron scores are accumulated over these same blocks (``fusion.neurons``),
# so a merge can score the blocks it computes anyway and get the same sums.
BLOCK_ELEMENTS = 1 << 20
_BUCKETS = 1 << 15  # the top 16 bits of a non-negative float32 (its sign bit is 0)
# entries of |Δ| sampled to place the brackets of ``magnitudes_at_ranks`` (all of a smaller vector)
SAMPLE_ENTRIES = 1 << 16
SAMPLE_RUN = 256  # consecutive entries read together by a sample
# most entries a bracket may collect in its pass (a sample gone wrong then costs nothing more)
BRACKET_LIMIT = 1 << 21


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
        self.numel = base.numel()
        self._scratch = Scratch()

    def rows(self) -> Iterator[slice]:
        return row_blocks(self.base.shape)

    def block(self, rows: slice) -> tuple[Tensor, Tensor]:
        """(Δ, θ_base) of one row block in float32, both overwritten by the next call."""
        b, t = self.base[rows], self.tuned[rows]
        base = self._scratch.like("base", b).copy_(b)
        return self._scratch.like("delta", t).copy_(t).sub_(base), base

    def blocks(self) -> Iterator[Tensor]:
        """A pass over Δ's blocks; each is overwritten by the next."""
        return (self.block(rows)[0] for rows in self.rows())

    def sample(self, count: int) -> Tensor:
        at = sample_positions(self.base.shape, count)
        tuned, base = self.tuned.reshape(-1), self.base.reshape(-1)
        if at is None:
            return tuned.to(torch.float32, copy=True).sub_(base.float())
        return tuned[at].float().sub_(base[at].float())


class Held:
    """A float32 task vector held whole (several tuned models), read as ``Passes``."""

    def __init__(self, delta: Tensor) -> None:
        self.delta = as_rows(delta)
        self.numel = delta.numel()

    def blocks(self) -> Iterator[Tensor]:
        return blocks(self.delta)

    def sample(self, count: int) -> Tensor:
        at = sample_positions(self.delta.shape, count)
        flat = self.delta.reshape(-1)
        return flat.clone() if at is None else flat[at]


def sample_positions(shape: Sequence[int], count: int) -> Tensor | None:
    """Where a sample of about ``count`` entries of a tensor of ``shape`` is read (flat
    positions), or None for all of them when it has no more.

    Runs of SAMPLE_RUN consecutive entries, evenly spaced: a run is a few cache lines, where
    single entries spread as widely would each cost one (and a TLB miss). The spacing is made
    prime to the row width so that the runs start at every column, not at a few."""
    n, width = math.prod(shape), math.prod(shape[1:])
    if n <= count:
        return None
    runs = max(1, count // SAMPLE_RUN)
    step = n // runs
    while step > SAMPLE_RUN and math.gcd(step, width) > 1:
        step -= 1
    starts = torch.arange(runs, dtype=torch.int64).mul_(step)
    return starts.unsqueeze(1).add(torch.arange(min(SAMPLE_RUN, n), dtype=torch.int64)).reshape(-1)


def magnitudes_at_ranks(vector: Passes, ranks: Sequence[int]) -> list[float]:
    """The ``rank``-th largest |x| (1-based) for each of ``ranks``, among the entries of
    ``vector``, exactly, without sorting them or copying the vector.

    Usually one pass (``_bracketed``): a sample places, for each rank, a narrow bracket of
    magnitudes that should hold it; the pass counts the entries above each bracket and collects
    the few inside, among which the rank is then found. When a bracket misses (a sample unlike
    the rest of the vector) that rank takes two more passes (``_histogrammed``). ``kthvalue``
    or ``topk`` would copy the tensor and add int64 indices (3x its size): the difference between
    fitting a 7B embedding in RAM or not.
    """
    for rank in ranks:
        if not 1 <= rank <= vector.numel:
            raise ValueError(f"rank {rank} is outside 1..{vector.numel}")
    found = _bracketed(vector, ranks)
    missed = [rank for rank, value in zip(ranks, found) if value is None]
    exact = dict(zip(missed, _histogrammed(vector, missed))) if missed else {}
    return [exact[rank] if value is None else value for rank, value in zip(ranks, found)]


class _Bracket:
    """Where a sample says one rank lies, magnitudes in [low, high] (an end may be open: 0 or
    +inf), and what a pass finds there: how many entries are not below ``low``, and the entries
    inside, collected (or only counted, when the bracket is one value).

    Magnitudes are compared as bit patterns, which order non-negative floats like their values
    and put NaN above +inf, where the histogram puts it too."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self._bits = (_bits(low), _bits(high))
        self.at_least = 0  # entries not below low
        self.above = 0  # entries above high, counted when the bracket is one value
        self.members: list[Tensor] | None = []  # entries inside, or None: too many to hold
        self._held = 0

    def add(self, mag: Tensor, scratch: Scratch) -> None:
        """Count and collect one block's magnitudes (flat float32)."""
        if self.members is None:  # overflowed: the histogram will answer
            return
        low, high = self._bits
        bits = mag.view(torch.int32)
        at_least = torch.ge(bits, low, out=scratch.like("at_least", mag, torch.bool))
        self.at_least += int(torch.count_nonzero(at_least))
        if low == high:  # one value (zeros of a frozen tensor): counts are enough, and cheap
            self.above += int(torch.count_nonzero(torch.gt(bits, high, out=at_least)))
            return
        self.members.append(mag[at_least.logical_and_(torch.le(bits, high, out=scratch.like("at_most", mag, torch.bool)))])
        self._held += self.members[-1].numel()
        if self._held > BRACKET_LIMIT:
            self.members = None

    def find(self, rank: int) -> float | None:
        """The ``rank``-th largest magnitude if the bracket holds it, else None."""
        if self.members is None:
            return None
        if self.low == self.high:
            return self.low if 1 <= rank - self.above <= self.at_least - self.above else None
        values = torch.cat(self.members) if self.members else torch.empty(0)
        k = rank - (self.at_least - values.numel())  # the rank's place among the bracket's entries, largest first
        return float(values.kthvalue(values.numel() - k + 1).values) if 1 <= k <= values.numel() else None


def _bracketed(vector: Passes, ranks: Sequence[int]) -> list[float | None]:
    """Each rank's magnitude found in one pass between brackets that a sample places, or None
    where the bracket does not hold it. A vector no larger than the sample is answered from it."""
    n = vector.numel
    sample = vector.sample(SAMPLE_ENTRIES).abs_()
    s = sample.numel()
    if s == n:
        ordered = sample.sort(descending=True).values
        return [float(ordered[rank - 1]) for rank in ranks]

    def largest(k: int) -> float:  # the sample's k-th largest (0-based), without sorting it
        return float(sample.kthvalue(s - k).values)

    brackets = []
    for rank in ranks:
        at = rank / n * s  # where the rank should fall among the sample's entries, largest first
        # six binomial standard deviations of a sample's rank, and a few entries for small ones
        spread = 6 * math.sqrt(at * (1 - rank / n)) + 8
        first, last = math.floor(at - spread), math.ceil(at + spread)
        top, bottom = largest(max(first, 0)), largest(min(last, s - 1))
        if top == bottom:  # the sample is one value there: count, don't collect
            brackets.append(_Bracket(top, top))
        else:  # a bracket that reaches the sample's largest (smallest) entry is open on that side
            brackets.append(_Bracket(bottom if last < s - 1 else 0.0, top if first > 0 else math.inf))
    scratch = Scratch()
    for part in vector.blocks():
        mag = torch.abs(part, out=scratch.like("mag", part)).reshape(-1)
        for bracket in brackets:
            bracket.add(mag, scratch)
    return [bracket.find(rank) for bracket, rank in zip(brackets, ranks)]


def _bits(value: float) -> int:
    """The bit pattern of a float32 as an int32."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _histogrammed(vector: Passes, ranks: Sequence[int]) -> list[float]:
    """Each rank's magnitude in two passes: non-negative float32 values order like their bit
    patterns, so one histogram of the top 16 bits finds the bucket that holds each wanted rank;
    only those buckets' members are then collected and sorted."""
    scratch = Scratch()

    def bucketed(part: Tensor) -> tuple[Tensor, Tensor]:
        """|part| and the histogram bucket of each: the top 16 bits of a non-negative float32."""
        mag = torch.abs(part, out=scratch.like("mag", part)).reshape(-1)
        return mag, torch.bitwise_right_shift(mag.view(torch.int32), 16, out=scratch.like("bucket", mag, torch.int32))

    counts: Tensor | None = None
    for part in vector.blocks():
        found = torch.bincount(bucketed(part)[1], minlength=_BUCKETS)
        counts = found if counts is None else counts.add_(found)
    assert counts is not None
    above = counts.flip(0).cumsum(0)  # number of values in this bucket or a higher one
    wanted = []
    for rank in ranks:
        top = int(torch.searchsorted(above, torch.tensor(rank, device=above.device)))
        wanted.append((_BUCKETS - 1 - top, rank - (int(above[top - 1]) if top > 0 else 0)))
    members: dict[int, list[Tensor]] = {bucket: [] for bucket, _ in wanted}
    for part in vector.blocks():
        mag, bucket_of = bucketed(part)
        for bucket, chosen in members.items():
            chosen.append(mag[bucket_of == bucket])
    found_in = {bucket: torch.cat(chosen) for bucket, chosen in members.items()}
    # the k-th largest among a bucket's members
    return [float(found_in[bucket].kthvalue(found_in[bucket].numel() - k + 1).values) for bucket, k in wanted]


def magnitude_at_rank(x: Tensor, rank: int) -> float:
    """The ``rank``-th largest |x| (1-based) of a tensor; see ``magnitudes_at_ranks``."""
    return magnitudes_at_ranks(Held(x), [rank])[0]


@dataclass(frozen=True)
class Sub:
    """A sparsifier: ``prepare(vector, params)`` reads the task vector (``Passes``) for what its
    rule needs, ``apply(block, prepared, params, generator, scratch)`` changes one row block in
    place (its temporaries in ``scratch``, one per pass). Calling it does both over a whole task
    vector, in place."""

    prepare: Callable[[Passes, Params], Any]
    apply: Callable[[Tensor, Any, Params, torch.Generator | None, Scratch], None]

    def __call__(self, delta: Tensor, params: Params, generator: torch.Generator | None = None) -> Tensor:
        prepared, scratch = self.prepare(Held(delta), params), Scratch()
        for part in blocks(delta):
            self.apply(part, prepared, params, generator, scratch)
        return delta


def _nothing(vector: Passes, params: Params) -> None:
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


def _top_band(vector: Passes, params: Params) -> Band:
    """TIES trim: the ``density`` fraction of largest-magnitude entries."""
    n = vector.numel
    keep = count_for(params["density"], n)
    if keep == 0:
        return Band(empty=True)
    return Band(low=magnitudes_at_ranks(vector, [keep])[0]) if keep < n else Band()


def _middle_band(vector: Passes, params: Params) -> Band:
    """Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the smallest entries so
    that a ``density`` fraction remains."""
    n = vector.numel
    top, keep = count_for(params["gamma"], n), count_for(params["density"], n)
    keep = min(keep, n - top)
    if keep == 0:
        return Band(empty=True)
    low_rank = top + keep if top + keep < n else None  # the smallest kept magnitude, when smaller ones are dropped
    high_rank = top or None  # the smallest outlier dropped
    wanted = [r for r in (low_rank, high_rank) if r is not None]
    found = dict(zip(wanted, magnitudes_at_ranks(vector, wanted)))
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

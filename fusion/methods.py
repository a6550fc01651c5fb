"""A merge method as a composition: θ_merge = θ_base + λ · F(Sub(Δ)),  Δ_t = θ_t − θ_base.

``fusion.sparsify`` holds the Subs (which part of each task vector is kept, and how it is
rescaled), ``fusion.combine`` the Fs (how the kept vectors of several tuned models become one).
The registry (``fusion.registry``, which must not import torch) names each method's pair; ``bind``
turns those names into functions once per merge, and the resulting ``Merge`` is the one function
``fusion.merge`` calls per tensor. Neuron-Fusion is its inner method's pair at λ = suppress,
followed by Neuron-Restore of the neurons located in that tensor (``restore``).

Arithmetic is float32 whatever the storage dtype; a merged tensor takes the dtype of the first
tuned tensor. The inputs are read in row blocks (``fusion.sparsify.row_blocks``): no float32
copy of a whole input is made, with one tuned model not even of Δ (each pass computes its blocks
again), and what a block needs besides the merge itself, a check that its values are finite
and the task vector for Neuron-Locate's scores (``observe``), is done while it is in cache. The
result can go into memory the caller provides (``out``: the writer recycles its buffers).
Nothing here reads files or knows about checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .combine import COMBINERS, Combiner, summed
from .sparsify import SPARSIFIERS, Params, Scratch, Sub, TaskVector, as_rows, keep_all, row_blocks
from .sparsify import count_for as count_for  # re-exported: fusion.neurons imports it from here

# (axis, indices) of the neurons located in one tensor: rows (axis 0) or columns (axis 1)
Located = tuple[int, Tensor]
# Called with each row block (a slice of the leading dimension) and that block's Σ_t Δ_t in
# float32, in order; the block must not be modified (it may be the merge's own task vector).
Observer = Callable[[slice, Tensor], None]


class NonFinite(ValueError):
    """An input of a merge holds NaN or an infinity: ``which`` is 0 for θ_base and t for θ_t.
    ``fusion.merge`` turns it into an error naming the tensor and its checkpoint."""

    def __init__(self, which: int) -> None:
        super().__init__(f"merge input {which} holds NaN or infinite values")
        self.which = which


def check_finite(inputs: Sequence[Tensor]) -> None:
    """Raise NonFinite for the first of ``inputs`` that holds NaN or ±inf.

    The test is the extremes: NaN propagates into both, ±inf is one of them. On the CPU
    ``aminmax`` of fp16 costs about a tenth of a sum and a twentieth of ``isfinite().all()``,
    and it is exact where a sum is a filter that overflows on large finite values."""
    for which, x in enumerate(inputs):
        if x.element_size() == 1:  # float8 has no aminmax kernel; float16 holds its every value
            x = x.to(torch.float16)
        if x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
            raise NonFinite(which)


def task_vectors(base: Tensor, tuned: Sequence[Tensor], *, check: bool = False, observe: Observer | None = None) -> list[Tensor]:
    """Δ_t = θ_t − θ_base in float32: fresh tensors that Sub and F may overwrite (several tuned
    models), built one row block at a time. ``check``: raise NonFinite if an input holds NaN or
    ±inf; ``observe`` sees each block of Σ_t Δ_t."""
    deltas = [torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in tuned]
    b_rows, t_rows, d_rows = as_rows(base), [as_rows(t) for t in tuned], [as_rows(d) for d in deltas]
    for rows in row_blocks(b_rows.shape):
        b = b_rows[rows].float()
        parts = [torch.sub(t[rows].float(), b, out=d[rows]) for t, d in zip(t_rows, d_rows)]
        if check:
            check_finite([b_rows[rows], *(t[rows] for t in t_rows)])
        if observe:
            observe(rows, functools.reduce(torch.add, parts))
    return deltas


def apply_delta(base: Tensor, delta: Tensor, scale: float, out: Tensor) -> Tensor:
    """θ_base + scale·δ, computed in float32 (into ``delta``), one row block at a time, and stored
    in ``out``."""
    b_rows, d_rows, o_rows = as_rows(base), as_rows(delta), as_rows(out)
    for rows in row_blocks(d_rows.shape):
        o_rows[rows] = d_rows[rows].mul_(scale).add_(b_rows[rows].float())
    return out


def _streamed(base: Tensor, tuned: Tensor, sub: Sub, params: Params, generator: torch.Generator | None, check: bool, observe: Observer | None, out: Tensor) -> Tensor:
    """θ_base + λ·Sub(Δ) for one tuned model, Δ never held whole: ``sub.prepare`` and the final
    pass each compute Δ's blocks from the inputs again (~0.5 ns an entry), where a whole float32
    Δ would cost a fresh allocation, its page faults and 4 bytes an entry of memory."""
    vector, o_rows, scratch = TaskVector(base, tuned), as_rows(out), Scratch()
    prepared = sub.prepare(vector, params)
    for rows in vector.rows():
        delta, b = vector.block(rows)
        if check:
            check_finite([vector.base[rows], vector.tuned[rows]])
        if observe:
            observe(rows, delta)
        sub.apply(delta, prepared, params, generator, scratch)
        o_rows[rows] = delta.mul_(params["lambda"]).add_(b)
    return out


def _lerp(base: Tensor, tuned: Tensor, weight: float, check: bool, observe: Observer | None, out: Tensor) -> Tensor:
    """θ_base + w·(θ_t − θ_base) in one fused pass per row block.

    ``torch.lerp`` computes in float32 even on bf16/fp16 storage, and returns ``tuned`` exactly
    at w = 1 and ``base`` exactly at w = 0, which the identities in docs/methods.md require bit for bit.
    No task vector is needed here: Δ is computed only for ``observe``."""
    vector, o_rows = TaskVector(base, tuned), as_rows(out)
    for rows in vector.rows():
        b, t = vector.base[rows], vector.tuned[rows]
        if check:
            check_finite([b, t])
        if b.dtype == t.dtype:
            torch.lerp(b, t, weight, out=o_rows[rows])
        else:
            o_rows[rows] = torch.lerp(b.float(), t.float(), weight)
        if observe:
            observe(rows, vector.block(rows)[0])
    return out


@dataclass(frozen=True)
class Merge:
    """One method with its functions and parameter values bound: merges one tensor at a time."""

    sparsify: Sub
    combine: Combiner
    params: Params

    def __call__(
        self,
        base: Tensor,
        tuned: Sequence[Tensor],
        generator: torch.Generator | None = None,
        located: Located | None = None,
        *,
        check: bool = False,
        observe: Observer | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """θ_base + λ·F(Sub(Δ)) in ``out`` (the first tuned tensor's shape and dtype), or a new
        tensor (never one of the inputs); then, if ``located`` is given (Neuron-Fusion), those
        neurons take back their full change. ``check``: raise NonFinite if an input holds NaN or
        ±inf; ``observe`` sees each row block of Σ_t Δ_t as it is computed (Neuron-Locate's
        scores, without reading the inputs again)."""
        if out is None:
            out = torch.empty(tuned[0].shape, dtype=tuned[0].dtype, device=tuned[0].device)
        merged = self._compose(base, tuned, generator, check, observe, out)
        return restore(merged, base, tuned, located) if located is not None else merged

    def _compose(self, base: Tensor, tuned: Sequence[Tensor], generator: torch.Generator | None, check: bool, observe: Observer | None, out: Tensor) -> Tensor:
        lam = self.params["lambda"]
        if len(tuned) == 1:  # F hands one model's vector back as it is
            if self.sparsify is keep_all and self.combine is summed:
                return _lerp(base, tuned[0], lam, check, observe, out)  # task arithmetic: exact at λ = 0 and 1
            return _streamed(base, tuned[0], self.sparsify, self.params, generator, check, observe, out)
        kept = [self.sparsify(d, self.params, generator) for d in task_vectors(base, tuned, check=check, observe=observe)]
        return apply_delta(base, self.combine(kept), lam, out)


# θ_base + Σ_t Δ_t: what a located neuron takes back (θ_t itself, bit for bit, for one model)
FULL_CHANGE = Merge(keep_all, summed, {"lambda": 1.0})


def restore(merged: Tensor, base: Tensor, tuned: Sequence[Tensor], located: Located) -> Tensor:
    """Neuron-Restore: the located slices of ``merged`` take their values from the full change
    (in place). Only those slices are read and computed, where the inputs are (the memory-mapped
    checkpoints of a GPU merge stay on the CPU), so restoring costs a few percent of a tensor."""
    axis, index = located
    if index.numel():
        index = index.to(base.device)
        full = FULL_CHANGE(base.index_select(axis, index), [t.index_select(axis, index) for t in tuned])
        merged.index_copy_(axis, index.to(merged.device), full.to(merged.device))
    return merged


def bind(sparsify: str, combine: str, params: Params) -> Merge:
    """The Merge that a registry entry names; the names are looked up here, once per merge."""
    return Merge(SPARSIFIERS[sparsify], COMBINERS[combine], params)

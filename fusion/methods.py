"""A merge method as a composition: θ_merge = θ_base + λ · F(Sub(Δ)),  Δ_t = θ_t − θ_base.

``fusion.sparsify`` holds the Subs (which part of each task vector is kept, and how it is
rescaled), ``fusion.combine`` the Fs (how the kept vectors of several tuned models become one).
The registry (``fusion.registry``, which must not import torch) names each method's pair; ``bind``
turns those names into functions once per merge, and the resulting ``Merge`` is the one function
``fusion.merge`` calls per tensor. Neuron-Fusion is its inner method's pair at λ = suppress,
followed by Neuron-Restore of the neurons located in that tensor (``restore``).

Arithmetic is float32 whatever the storage dtype; a merged tensor takes the dtype of the first
tuned tensor. Nothing here reads files or knows about checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .combine import COMBINERS, Combiner, summed
from .sparsify import SPARSIFIERS, Params, Sparsifier, keep_all
from .sparsify import count_for as count_for  # re-exported: fusion.neurons imports it from here

# (axis, indices) of the neurons located in one tensor: rows (axis 0) or columns (axis 1)
Located = tuple[int, Tensor]


def task_vectors(base: Tensor, tuned: Sequence[Tensor]) -> list[Tensor]:
    """Δ_t = θ_t − θ_base in float32: fresh tensors that Sub and F may overwrite."""
    b = base.float()
    return [t.float() - b for t in tuned]


def apply_delta(base: Tensor, delta: Tensor, dtype: torch.dtype) -> Tensor:
    """θ_base + δ, computed in float32 (into ``delta``) and stored in ``dtype``."""
    return delta.add_(base.float()).to(dtype)


def _lerp(base: Tensor, tuned: Tensor, weight: float) -> Tensor:
    """θ_base + w·(θ_t − θ_base) in one fused pass.

    ``torch.lerp`` computes in float32 even on bf16/fp16 storage, and returns ``tuned`` exactly
    at w = 1 and ``base`` exactly at w = 0, which the identities in docs/methods.md require bit for bit.
    """
    if base.dtype != tuned.dtype:
        return torch.lerp(base.float(), tuned.float(), weight).to(tuned.dtype)
    return torch.lerp(base, tuned, weight)


@dataclass(frozen=True)
class Merge:
    """One method with its functions and parameter values bound: merges one tensor at a time."""

    sparsify: Sparsifier
    combine: Combiner
    params: Params

    def __call__(self, base: Tensor, tuned: Sequence[Tensor], generator: torch.Generator | None = None, located: Located | None = None) -> Tensor:
        """θ_base + λ·F(Sub(Δ)) as a new tensor (never one of the inputs); then, if ``located``
        is given (Neuron-Fusion), those neurons take back their full change."""
        merged = self._compose(base, tuned, generator)
        return restore(merged, base, tuned, located) if located is not None else merged

    def _compose(self, base: Tensor, tuned: Sequence[Tensor], generator: torch.Generator | None) -> Tensor:
        lam = self.params["lambda"]
        if self.sparsify is keep_all and self.combine is summed and len(tuned) == 1:
            return _lerp(base, tuned[0], lam)  # task arithmetic on one model: exact at λ = 0 and 1
        kept = [self.sparsify(d, self.params, generator) for d in task_vectors(base, tuned)]
        return apply_delta(base, self.combine(kept).mul_(lam), tuned[0].dtype)


# θ_base + Σ_t Δ_t: what a located neuron takes back (θ_t itself, bit for bit, for one model)
FULL_CHANGE = Merge(keep_all, summed, {"lambda": 1.0})


def restore(merged: Tensor, base: Tensor, tuned: Sequence[Tensor], located: Located) -> Tensor:
    """Neuron-Restore: the located slices of ``merged`` take their values from the full change
    (in place). Only those slices are computed, so restoring costs a few percent of a tensor."""
    axis, index = located
    if index.numel():
        index = index.to(merged.device)
        full = FULL_CHANGE(base.index_select(axis, index), [t.index_select(axis, index) for t in tuned])
        merged.index_copy_(axis, index, full)
    return merged


def bind(sparsify: str, combine: str, params: Params) -> Merge:
    """The Merge that a registry entry names; the names are looked up here, once per merge."""
    return Merge(SPARSIFIERS[sparsify], COMBINERS[combine], params)

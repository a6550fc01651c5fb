"""F: how the kept task vectors of several tuned models become one.

A combiner takes the sparsified float32 task vectors (which the caller owns and which it may
reuse as output) and returns their combination; ``fusion.methods`` then scales it by λ and adds
it to θ_base. With one tuned model both combiners hand back that model's vector untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Combiner = Callable[[Sequence[Tensor]], Tensor]


def summed(deltas: Sequence[Tensor]) -> Tensor:
    """Σ_t Δ_t, accumulated into the first vector."""
    total = deltas[0]
    for d in deltas[1:]:
        total += d
    return total


def sign_mean(deltas: Sequence[Tensor]) -> Tensor:
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


# The names the registry gives each method's F.
COMBINERS: dict[str, Combiner] = {"sum": summed, "sign_mean": sign_mean}

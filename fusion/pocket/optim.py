"""The optimisation loop every pocket stage shares: AdamW under LLaVA's schedule (linear
warm-up, then cosine decay to zero), a loss curve of means over 100 steps, and a progress
line at each of them. One loop, so that the vision encoder, the base LM and both LLaVA stages
differ only in what they feed it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

Log = Callable[[str], None]


def schedule(steps: int, warmup: float = 0.03) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over the first ``warmup`` of the steps
    (LLaVA's warmup_ratio is 0.03), then cosine decay."""
    warm = max(1, round(warmup * steps))
    return lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def optimise(
    model: torch.nn.Module,
    losses: Iterable[torch.Tensor],
    steps: int,
    params: Sequence[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    log: Log,
    name: str,
    warmup: float = 0.03,
    clip: float | None = 1.0,
) -> list[float]:
    """One AdamW step on ``params`` per loss that ``losses`` yields (it is drawn lazily, so a
    loss may sample its own batch), gradients clipped to norm ``clip`` unless None; returns the
    loss curve (mean every 100 steps) and leaves ``model`` in eval mode."""
    opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, warmup))
    model.train()
    curve, running = [], 0.0
    for step, loss in enumerate(losses, 1):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        running += loss.item()
        if step % 100 == 0:
            curve.append(round(running / 100, 4))
            log(f"  {name} step {step}: loss {running / 100:.3f}")
            running = 0.0
    model.eval()
    return curve

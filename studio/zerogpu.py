"""ZeroGPU Spaces: a GPU is attached only while a function decorated with ``spaces.GPU`` runs,
for the ``duration`` it asks for; shorter requests are scheduled first, and one over the
visitor's quota is refused. So each model call asks for the seconds its own inputs need (the
answer length and the number of models, the probes of a Behaviour run), not the default 60.

Off ZeroGPU (``SPACES_ZERO_GPU`` unset: a laptop, a CPU or a dedicated-GPU Space) ``spaces.GPU``
hands the function back unchanged, and without the ``spaces`` package nothing is wrapped.
The plan, in the README's Space section: the models (the base LLM too) load and the default
variant is fused at start, outside any GPU function, fusions on the CPU; chat, API and
Behaviour calls run inside one, a Behaviour run no longer than one call may be
(``bench_caps``). A call's worker is a fork of the server: what it changes is its own.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# A 7B model in fp16 on a ZeroGPU slice streams ~20 tokens/s; twice that time, for a margin.
SECONDS_PER_TOKEN = 0.1
START_SECONDS = 10  # moving the weights onto the GPU the call is given, tokenizing, the image encoder
LONGEST_SECONDS = 120  # ZeroGPU refuses longer requests from most visitors
BENCH_TOKENS = 24  # the bench's answer length (``fusion.evaluate.score``)
BENCH_BATCH = 16  # answers generated at once (``fusion.evaluate.BATCH``)


def on_zero_gpu(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process runs on a ZeroGPU Space (the variable ``spaces`` itself reads)."""
    return env.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


def _count(value: Any, most: int) -> int:
    """A client's value as a count for the estimate only (the handler checks it properly)."""
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else 1.0
    return int(min(max(number, 1.0), most)) if math.isfinite(number) else 1


def _within(seconds: float) -> int:
    return int(min(LONGEST_SECONDS, math.ceil(seconds)))


def chat_seconds(max_new_tokens: int, models: int) -> int:
    """One message answered by ``models`` models, each up to ``max_new_tokens`` tokens (streamed
    one after another on one GPU)."""
    return _within(START_SECONDS + models * max_new_tokens * SECONDS_PER_TOKEN)


def bench_seconds(texts: Any, images: Any, most: int = 10_000) -> int:
    """A Behaviour run: the base answers the text probes, the original and the fused model the
    text probes and each image probe three times (its own image, a blank, another's), in
    batches of BENCH_BATCH answers of up to BENCH_TOKENS tokens."""
    answers = 3 * _count(texts, most) + 2 * 3 * _count(images, most)
    return _within(START_SECONDS + math.ceil(answers / BENCH_BATCH) * BENCH_TOKENS * SECONDS_PER_TOKEN)


def bench_caps() -> tuple[int, int]:
    """The most text and image probes one Behaviour run may ask on ZeroGPU: the answers that fit
    in LONGEST_SECONDS, half for each kind (a text probe is 3 answers, an image probe 6)."""
    answers = (LONGEST_SECONDS - START_SECONDS) / (BENCH_TOKENS * SECONDS_PER_TOKEN) * BENCH_BATCH
    return int(answers / 2 / 3), int(answers / 2 / 6)


def gpu_task(duration: Callable[..., int] | int) -> Callable[[F], F]:
    """``spaces.GPU(duration=duration)`` where the ``spaces`` package is installed, else the
    function as it is. ``duration``: seconds, or a function of the decorated function's own
    arguments that returns them."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)

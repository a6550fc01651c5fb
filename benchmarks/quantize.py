"""4-bit quantization on this CPU: bitsandbytes' own kernels against ``fusion.quantize``.

    python benchmarks/quantize.py [--repeats 5]

On one weight of each shape a 7 B Llama layer has (4096 x 4096 attention, 11008 x 4096 FFN),
in float16 with random values (the down projection, 4096 x 11008, has an FFN weight's count):
nf4 quantization (bitsandbytes' device-independent kernel, which it uses on a CPU, and this
project's) and the repacking for bitsandbytes' AVX-512 kernel
(bitsandbytes' ``_convert_weight_packed_for_cpu`` and ``fusion.quantize._repack``). Each the
fastest of ``--repeats``, the bytes compared every time; and what a 7 B language model's 224
such weights add up to.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion import quantize  # noqa: E402

SHAPES = {"attention 4096 x 4096": ((4096, 4096), 128), "ffn 11008 x 4096": ((11008, 4096), 96)}  # and how many a 7 B model has


def fastest(repeats: int, run: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest of ``repeats`` runs, seconds, and the last run's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(shape: tuple[int, int], repeats: int) -> tuple[float, float, float, float]:
    """(bitsandbytes' quantization, ours, bitsandbytes' repacking, ours) of one weight, seconds;
    each pair checked to give the same bytes."""
    import bitsandbytes.functional as F

    operator = torch.ops.bitsandbytes.quantize_4bit.default
    own = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.float16)
    theirs_q, want = fastest(repeats, lambda: operator.redispatch(own, weight, 64, "nf4", torch.uint8))
    ours_q, got = fastest(repeats, lambda: quantize.quantize_4bit(weight, 64, "nf4", torch.uint8))
    assert all(torch.equal(a, b) for a, b in zip(want, got)), "not the same bytes"
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs_r, reference = fastest(repeats, lambda: F._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(state))[0])

    def ours() -> torch.Tensor:
        copied = torch.nn.Parameter(packed.clone(), requires_grad=False)
        copied.quant_state = copy.deepcopy(state)
        quantize._repack(copied)
        return copied.data

    ours_r, repacked = fastest(repeats, ours)
    assert torch.equal(reference, repacked), "not the same bytes"
    return theirs_q, ours_q, theirs_r, ours_r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bitsandbytes' own kernels against fusion.quantize")
    print(f"{'weight':<24} {'quantize: bnb s':>16} {'ours s':>8} {'repack: bnb s':>14} {'ours s':>8}")
    totals = [0.0, 0.0, 0.0, 0.0]
    for name, (shape, count) in SHAPES.items():
        seconds = measure(shape, args.repeats)
        print(f"{name:<24} {seconds[0]:>16.3f} {seconds[1]:>8.3f} {seconds[2]:>14.3f} {seconds[3]:>8.3f}")
        totals = [total + s * count for total, s in zip(totals, seconds)]
    print(f"{'a 7 B model (224 weights)':<24} {totals[0]:>16.1f} {totals[1]:>8.1f} {totals[2]:>14.1f} {totals[3]:>8.1f}")


if __name__ == "__main__":
    main()

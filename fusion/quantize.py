"""4-bit quantization on a CPU, byte for byte as bitsandbytes does it, about four times faster.

Why: the app loads a 7 B model in 4-bit and builds each fused variant by quantizing every
merged tensor again. bitsandbytes (0.50) quantizes on a CPU with its device-independent
kernel, which spends ~0.9 s on one 45 M-entry FFN weight (a scale of every block over the whole
tensor, then a binary search per entry); over a 7 B language model that is about two minutes
on two cores, twice (the original, then the fused model), the largest part of the time to ready.

This kernel computes the same bytes (the same float32 scaling, the same count of code
midpoints below each scaled entry) in 1 M-entry chunks that stay in the cache, and replaces the
binary search by one look-up: [-1, 1] is cut into ``CELLS`` equal cells, narrower than the
smallest gap between two midpoints, so that a cell holds at most one midpoint; an entry's code
is the number of midpoints below its cell plus one comparison with the cell's own midpoint.
Cells are widened by ``MARGIN`` on both sides when midpoints are assigned, so the rounding of an
entry's cell index cannot put it on the wrong side of a midpoint. A chunk with a non-finite
scale (a NaN or infinity in a block) takes the reference path, so every input gets
bitsandbytes' own answer. ``install`` makes it the CPU kernel of ``bitsandbytes::quantize_4bit``
(torch's operator registry: the CUDA kernel is untouched), so transformers' 4-bit loading and
``Params4bit`` use it without knowing.

Two more costs of a 4-bit model on a CPU are moved out of the first answer:
``prepare_cpu_layout`` repacks each weight for bitsandbytes' AVX-512 kernel while the model is
built (bitsandbytes does it on a layer's first use: ~3 s per billion weights on two cores, so
a 7 B model's first answer waited ~20 s per model), and ``release_freed_memory`` hands back the
memory its temporaries leave behind (glibc keeps freed pieces under 32 MiB resident: 1.4 GiB
after a 7 B model's repacking, measured as 0.26 GiB per 1.2 B weights, all of it returned).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterable
from functools import cache

import torch

CELLS = 1024  # cells over [-1, 1]; 2/1024 is far narrower than the midpoints' gaps (0.08 for nf4)
MARGIN = 1e-4  # an entry's cell is exact to ~1e-7; a midpoint this close to a cell's edge counts for both cells
CHUNK = 1 << 20  # entries quantized at a time (4 MiB of float32 scratch)


@cache
def _code(quant_type: str) -> torch.Tensor:
    """The 16 code values of ``quant_type`` in bitsandbytes' order (its public table)."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(quant_type, device="cpu").float()


@cache
def _tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(midpoints, order, below, midpoint) where ``below[c]`` counts the midpoints under cell
    ``c`` and ``midpoint[c]`` is the one midpoint inside it (2.0, above every entry, if none).
    One extra cell takes entries of exactly 1.0."""
    code = _code(quant_type)
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    edges = torch.linspace(-1.0, 1.0, CELLS + 1, dtype=torch.float64)
    below = torch.zeros(CELLS + 1, dtype=torch.uint8)
    midpoint = torch.full((CELLS + 1,), 2.0, dtype=torch.float32)
    wide = midpoints.double()
    for cell in range(CELLS + 1):
        low = edges[cell] - MARGIN if cell < CELLS else edges[-1] - MARGIN
        high = edges[cell + 1] + MARGIN if cell < CELLS else edges[-1] + MARGIN
        inside = ((wide >= low) & (wide <= high)).nonzero().flatten()
        if len(inside) > 1:
            raise AssertionError(f"{quant_type}: cells of width {2 / CELLS} hold two midpoints")
        below[cell] = int((wide < low).sum())
        if len(inside):
            midpoint[cell] = midpoints[inside[0]]
    return midpoints, order.to(torch.uint8), below, midpoint


def _reference_codes(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """bitsandbytes' own search: the code index of each scaled entry."""
    midpoints, order, _, _ = _tables(quant_type)
    q = torch.bucketize(scaled, midpoints, out_int32=True)
    return (order[q] if quant_type != "nf4" else q).to(torch.uint8)


def _codes(scaled: torch.Tensor, quant_type: str, cell: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The code index of each entry of ``scaled`` (finite, in [-1, 1]) by the cell look-up."""
    _, order, below, midpoint = _tables(quant_type)
    torch.add(scaled, 1.0, out=scratch).mul_(CELLS / 2)
    cell.copy_(scratch)
    q = torch.index_select(below, 0, cell).add_(torch.gt(scaled, torch.index_select(midpoint, 0, cell)))
    return torch.index_select(order, 0, q.int()) if quant_type != "nf4" else q


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``bitsandbytes::quantize_4bit`` on a CPU: (packed codes, two per byte, shape (n/2, 1) in
    ``quant_storage``; float32 absmax of each block), the same bytes as bitsandbytes' kernel."""
    flat = A.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(-(n // -blocksize), dtype=torch.float32, device=A.device)
    step = max(blocksize, CHUNK // blocksize * blocksize)
    buffer = torch.empty(min(step, full), dtype=torch.float32, device=A.device)
    scratch, cell = torch.empty_like(buffer), torch.empty(buffer.shape, dtype=torch.int32, device=A.device)
    for start in range(0, full, step):
        stop = min(start + step, full)
        size = stop - start
        chunk = buffer[:size]
        chunk.copy_(flat[start:stop])
        blocks = chunk.view(-1, blocksize)
        low, high = torch.aminmax(blocks, dim=-1)
        peak = torch.maximum(high, low.neg_(), out=absmax[start // blocksize : stop // blocksize]).abs_()  # abs_: -0.0 as 0.0
        finite = bool(torch.isfinite(peak).all())
        if not finite:  # NaN's bits as bitsandbytes' reduction leaves them
            peak.copy_(blocks.abs().max(dim=-1)[0])
        blocks.mul_((1.0 / peak.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
        q = _codes(chunk, quant_type, cell[:size], scratch[:size]) if finite else _reference_codes(chunk, quant_type)
        pairs = q.view(-1, 2)
        torch.bitwise_or(pairs[:, 0] << 4, pairs[:, 1], out=packed[start // 2 : stop // 2])
    if full < n:  # the last, shorter block: as bitsandbytes scales it (a division, its absmax clamped)
        tail = flat[full:].float()
        peak = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = peak
        scaled = torch.clamp(tail / peak, -1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = _reference_codes(scaled, quant_type).view(-1, 2)
        packed[full // 2 :] = (q[:, 0] << 4) | q[:, 1]
    packed = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


@cache
def install() -> bool:
    """Make ``quantize_4bit`` bitsandbytes' CPU kernel for this process (once), if it gives this
    bitsandbytes' own bytes on a test tensor of every kind of entry (a bitsandbytes without the
    operator, or whose quantization changed, keeps its own). Every 4-bit model loaded or built
    on a CPU afterwards is quantized by it. True if installed."""
    import bitsandbytes  # noqa: F401  (defines the operator)

    if not hasattr(torch.ops.bitsandbytes, "quantize_4bit"):
        return False
    operator = torch.ops.bitsandbytes.quantize_4bit.default
    own = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    for quant_type in ("nf4", "fp4"):
        midpoints = _tables(quant_type)[0]
        edges = torch.cat([torch.tensor([1.0, -1.0]), midpoints, torch.nextafter(midpoints, torch.tensor(2.0)), torch.nextafter(midpoints, torch.tensor(-2.0))])
        sample = torch.cat([edges, torch.zeros(64 - len(edges) % 64 + 64), torch.randn(4000, generator=torch.Generator().manual_seed(0))])
        want, ours = operator.redispatch(own, sample, 64, quant_type, torch.uint8), quantize_4bit(sample, 64, quant_type, torch.uint8)
        if not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(want, ours)):
            return False
    torch.library.register_kernel("bitsandbytes::quantize_4bit", "cpu")(quantize_4bit)
    return True


def _repacked(data: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """bitsandbytes' AVX-512 layout of a weight's packed 4-bit codes, in bytes: for each group
    of 32 output rows and each pair of input columns, 32 bytes whose low nibbles are the group's
    first 16 rows and high nibbles its last 16. bitsandbytes unpacks every code to int32 to
    build it (0.3-0.45 s for a 45 M-entry weight); shifting the bytes gives the same in 0.1 s."""
    rows, columns = shape
    codes = data.view(torch.uint8).reshape(rows // 32, 2, 16, columns // 2)
    first, last = codes[:, 0], codes[:, 1]  # a byte holds two columns' codes, the even one high
    even = (last & 0xF0) | (first >> 4)
    odd = (last << 4) | (first & 0x0F)
    return torch.stack([even, odd], -1).permute(0, 2, 1, 3).reshape(rows, columns // 2)


def _repack(weight: torch.nn.Parameter) -> None:
    """What bitsandbytes' first CPU forward does to ``weight`` (its data and quant state), with
    the bytes from ``_repacked``; ``_repacking_agrees`` checks it against bitsandbytes first."""
    from bitsandbytes.functional import dequantize_blockwise

    state = weight.quant_state
    if weight.dtype != torch.uint8:
        state.original_storage_type = weight.dtype
    state.original_dtype, state.original_nested, state.original_qshape = state.dtype, state.nested, weight.data.view(torch.uint8).shape
    data = _repacked(weight.data, state.shape)
    if state.nested:
        absmax = dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        state.absmax, state.nested = absmax.float(), False
        del state.state2
    rows, columns = state.shape
    state.absmax = state.absmax.reshape(rows, columns // state.blocksize).T.to(torch.bfloat16).contiguous()
    state.dtype, state.packing_format_for_cpu = torch.bfloat16, True
    weight.data = data


def _layer(in_features: int = 256, out_features: int = 64, seed: int = 0, nested: bool = False) -> torch.nn.Module:
    """A small 4-bit layer of random weights; ``nested``: its absmax quantized too (bitsandbytes'
    compressed statistics; the app's config leaves them off)."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    layer = Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    layer.weight = Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=nested).to("cpu")
    return layer.eval()


@cache
def _repacking_agrees() -> bool:
    """Whether ``_repack`` gives this bitsandbytes' own layout: the weight's bytes and every
    field of its quant state, on a small layer repacked both ways. A bitsandbytes that changed
    its layout (or has none) keeps its own repacking. Both with and without compressed statistics."""
    for nested in (False, True):
        ours, theirs = _layer(nested=nested), _layer(nested=nested)
        if not getattr(theirs, "support_avx512bf16_for_cpu", False):
            return False
        with torch.no_grad():
            theirs(torch.zeros(1, theirs.in_features, dtype=torch.bfloat16))
        _repack(ours.weight)
        mine, want = vars(ours.weight.quant_state), vars(theirs.weight.quant_state)
        if mine.keys() != want.keys() or not torch.equal(ours.weight.data, theirs.weight.data):
            return False
        if not all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in ((mine[k], want[k]) for k in want)):
            return False
    return True


def prepare_cpu_layout(modules: Iterable[torch.nn.Module]) -> None:
    """Repack every 4-bit layer among ``modules`` that will use bitsandbytes' AVX-512 CPU kernel
    now, as its first forward would, so that the first answer does not: with ``_repack`` where
    it agrees with bitsandbytes, else by that forward itself (of a zero row). Layers on another
    device, in training mode or already repacked are left as they are."""
    with torch.no_grad():
        for module in modules:
            weight = getattr(module, "weight", None)
            if not getattr(module, "support_avx512bf16_for_cpu", False) or module.training or weight is None or weight.device.type != "cpu":
                continue
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                continue
            if _repacking_agrees():
                _repack(weight)
            else:
                module(torch.zeros(1, module.in_features, dtype=module.compute_dtype or torch.bfloat16))


def plain_cpu_kernel_where_needed(model: torch.nn.Module) -> None:
    """bitsandbytes (0.50.2 on) repacks a 4-bit weight for its AVX-512 CPU kernel on first use,
    which needs a layer's outputs in multiples of 32 and its inputs in multiples of the
    quantization block (64); a layer of another width (the pocket pair's 160) would fail to
    answer, so it keeps the plain kernel. Every real model's widths fit."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            block = getattr(module.weight, "blocksize", 64)
            if module.out_features % 32 or module.in_features % block:
                module.support_avx512bf16_for_cpu = False


def ready_for_cpu(model: torch.nn.Module) -> None:
    """A 4-bit model just loaded on a CPU, made ready to answer: each layer on the kernel it can
    use, repacked for it now, and the memory the repacking freed handed back."""
    plain_cpu_kernel_where_needed(model)
    prepare_cpu_layout(model.modules())
    release_freed_memory()


@cache
def _trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a C library without it (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the memory that freed temporaries left resident back to the system (glibc's
    ``malloc_trim``; nothing elsewhere). Called once a model is loaded or built."""
    trim = _trim()
    if trim is not None:
        trim(0)

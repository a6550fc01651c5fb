"""The CPU 4-bit kernel gives bitsandbytes' own bytes: codes and absmax, for every quant type,
storage, block size and the entries where a look-up could go wrong (exactly on a midpoint,
one float either side of it, zeros of both signs, NaN and infinity, a last short block)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from fusion import quantize  # noqa: E402

OP = torch.ops.bitsandbytes.quantize_4bit.default
REFERENCE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def reference(A: torch.Tensor, blocksize: int, quant_type: str, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' device-independent kernel, whatever is registered for the CPU."""
    return OP.redispatch(REFERENCE, A, blocksize, quant_type, storage)


def assert_same_bytes(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", storage: torch.dtype = torch.uint8) -> None:
    want_codes, want_absmax = reference(A, blocksize, quant_type, storage)
    codes, absmax = quantize.quantize_4bit(A, blocksize, quant_type, storage)
    assert codes.shape == want_codes.shape and codes.dtype == want_codes.dtype
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    assert torch.equal(absmax.view(torch.int32), want_absmax.view(torch.int32))  # bits: -0.0 is not 0.0, NaN is compared


def on_the_edges(quant_type: str) -> torch.Tensor:
    """Blocks of 64 whose absmax is 1 (an entry of ±1 each), filled with every midpoint of the
    code and its float32 neighbours, scaled by powers of two so the scaling stays exact."""
    code = quantize._code(quant_type)
    ordered = code.sort().values
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    up = torch.nextafter(midpoints, torch.tensor(2.0))
    down = torch.nextafter(midpoints, torch.tensor(-2.0))
    values = torch.cat([midpoints, up, down, -midpoints, ordered, torch.zeros(3)])
    blocks = []
    for start in range(0, len(values), 62):
        part = values[start : start + 62]
        blocks.append(torch.cat([torch.tensor([1.0, -1.0]), part, torch.zeros(62 - len(part))]))
    edges = torch.stack(blocks)
    return torch.cat([edges * scale for scale in (1.0, 0.25, 8.0)]).reshape(-1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_entries_on_and_beside_every_midpoint(quant_type: str) -> None:
    assert_same_bytes(on_the_edges(quant_type), quant_type=quant_type)
    assert_same_bytes(on_the_edges(quant_type).to(torch.bfloat16), quant_type=quant_type)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_random_weights_over_many_chunks_with_a_short_last_block(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, quant_type: str) -> None:
    monkeypatch.setattr(quantize, "CHUNK", 4096)  # 27 chunks and a last, partial one
    generator = torch.Generator().manual_seed(7)
    weight = (torch.randn(333, 331, generator=generator) * 0.02).to(dtype)  # 110,223 entries: the last block has 15
    assert_same_bytes(weight, quant_type=quant_type)
    assert_same_bytes(weight[:, :330], quant_type=quant_type)  # not contiguous; even count
    assert_same_bytes(weight, blocksize=128, quant_type=quant_type, storage=torch.bfloat16)


def test_zeros_of_both_signs_and_nonfinite_blocks() -> None:
    weight = torch.randn(16, 64) * 0.02
    weight[1] = 0.0
    weight[2] = -0.0
    weight[3, 5] = float("nan")
    weight[4, 9] = float("inf")
    weight[5, 0] = float("-inf")
    weight[6] = 1e-30  # a scale near float32's smallest
    for storage in (torch.uint8, torch.float32):
        assert_same_bytes(weight, storage=storage)
        assert_same_bytes(weight.reshape(-1)[:1000 - 1])  # odd count: a padded last code


def test_installed_it_quantizes_every_cpu_4bit_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitsandbytes.nn import Params4bit

    assert quantize.install()  # it agrees with this bitsandbytes on its test tensor
    calls = []
    looked_up = quantize._codes
    monkeypatch.setattr(quantize, "_codes", lambda *args: calls.append(args[0].numel()) or looked_up(*args))
    weight = torch.randn(96, 256, dtype=torch.float16)
    quantized = Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
    assert calls == [weight.numel()]  # the look-up ran: the dispatcher routed the CPU weight here
    assert torch.equal(quantized.data, reference(weight, 64, "nf4", torch.uint8)[0])


def test_layers_are_repacked_before_their_first_answer_which_stays_the_same() -> None:
    prepared, untouched, training = quantize._layer(128, 64, 1), quantize._layer(128, 64, 1), quantize._layer(128, 64, 1).train()
    if not prepared.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX-512 bf16: bitsandbytes keeps its plain kernel, nothing to repack")
    assert quantize._repacking_agrees()  # so the repacking tested here is this project's
    quantize.prepare_cpu_layout([prepared, training, torch.nn.ReLU()])
    assert prepared.weight.quant_state.packing_format_for_cpu
    assert not getattr(training.weight.quant_state, "packing_format_for_cpu", False)
    assert not getattr(untouched.weight.quant_state, "packing_format_for_cpu", False)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(prepared(x), untouched(x))  # the untouched one repacks itself now
    assert untouched.weight.quant_state.packing_format_for_cpu
    assert torch.equal(prepared.weight.data, untouched.weight.data)
    assert torch.equal(prepared.weight.quant_state.absmax, untouched.weight.quant_state.absmax)
    quantize.prepare_cpu_layout([prepared])  # once is enough: a repacked layer is left alone
    with torch.no_grad():
        assert torch.equal(prepared(x), untouched(x))
    quantize.release_freed_memory()


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(96, 320), (4096, 128)])
def test_repacked_bytes_are_bitsandbytes_own(shape: tuple[int, int], nested: bool) -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    rows, columns = shape
    ours, theirs = quantize._layer(columns, rows, 3, nested).weight, quantize._layer(columns, rows, 3, nested).weight
    want, _ = _convert_weight_packed_for_cpu(theirs.data, theirs.quant_state)
    quantize._repack(ours)
    assert torch.equal(ours.data, want) and ours.data.shape == (rows, columns // 2)
    assert torch.equal(ours.quant_state.absmax, theirs.quant_state.absmax) and ours.quant_state.absmax.dtype == torch.bfloat16

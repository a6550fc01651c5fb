"""The merge walks its inputs in row blocks and streams Δ instead of holding it; these tests pin
that to whole-tensor formulations of the same arithmetic, bit for bit, on tensors of several
blocks (the recorded hashes of test_identical.py cover tensors of one block), and check the two
things that ride along: neuron scores summed during the merge, and the writer's recycled
buffers."""

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from fusion import writer as writer_module
from fusion.methods import NonFinite
from fusion.neurons import SliceSums, slice_change
from fusion.registry import resolve
from fusion.sparsify import BLOCK_ELEMENTS, count_for, row_blocks
from fusion.writer import Entry, ShardedWriter, plan_shards

SHAPE = (2 * BLOCK_ELEMENTS // 700 + 5, 700)  # three row blocks, the last one short, an odd width


def inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(SHAPE, generator=g)
    change = 0.01 * torch.randn(SHAPE, generator=g) * torch.rand(SHAPE, generator=g).pow(4)
    return base.to(dtype), (base + change).to(dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


def kth_largest(mag: torch.Tensor, rank: int) -> float:
    flat = mag.flatten()
    return float(flat.kthvalue(flat.numel() - rank + 1).values)


def whole(method: str, base: torch.Tensor, tuned: torch.Tensor, seed: int) -> torch.Tensor:
    """The method at its defaults, on whole tensors: Δ in float32, masked in place, scaled, added."""
    p = resolve(method).params
    d, n = tuned.float() - base.float(), base.numel()
    if method == "ties":
        d.mul_(d.abs() >= kth_largest(d.abs(), count_for(p["density"], n)))
    elif method == "breadcrumbs":
        top, keep = count_for(p["gamma"], n), count_for(p["density"], n)
        d.mul_((d.abs() >= kth_largest(d.abs(), top + keep)) & (d.abs() < kth_largest(d.abs(), top)))
    elif method == "dare":
        d.mul_(torch.rand(d.shape, generator=torch.Generator().manual_seed(seed)) < p["density"]).div_(p["density"])
    elif method == "della":
        width = d.shape[1]
        order = d.abs().argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(width).expand_as(order))
        drop = rank.float().mul_(p["epsilon"] / (width - 1)).add_(1 - p["density"] - p["epsilon"] / 2)
        d.mul_(torch.rand(d.shape, generator=torch.Generator().manual_seed(seed)) >= drop).div_(1.0 - drop)
    return d.mul_(p["lambda"]).add_(base.float()).to(tuned.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare", "della"])
def test_streamed_merge_equals_the_whole_tensor_arithmetic(method, dtype):
    assert len(list(row_blocks(SHAPE))) == 3
    base, tuned = inputs(dtype)
    got = resolve(method).merge(base, [tuned], torch.Generator().manual_seed(4), check=True)
    assert same_bytes(got, whole(method, base, tuned, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocked_lerp_equals_one_lerp(dtype):
    base, tuned = inputs(dtype)
    got = resolve("task_arithmetic", {"lambda": 0.3}).merge(base, [tuned], check=True)
    assert same_bytes(got, torch.lerp(base, tuned, 0.3))


@pytest.mark.parametrize("inner", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("axis", [0, 1])
def test_scores_summed_during_the_merge_equal_a_scoring_pass(inner, axis):
    base, tuned = inputs(torch.bfloat16)
    for power in (1, 2):
        sums = SliceSums(SHAPE, axis, power)
        resolve("neuron_fusion", {"inner": inner}).merge(base, [tuned], observe=sums.add)
        assert torch.equal(sums.total, slice_change(base, [tuned], axis, power))


def test_a_nonfinite_entry_in_the_last_block_is_found():
    base, tuned = inputs(torch.float16)
    tuned[-1, -1] = float("nan")
    for method in ("task_arithmetic", "ties", "della"):
        with pytest.raises(NonFinite):
            resolve(method).merge(base, [tuned], torch.Generator().manual_seed(0), check=True)


def test_writer_recycles_written_buffers(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "WRITE_AHEAD", 0)  # each write waits for the one before
    entries = [Entry(f"t{i}", (300, 500), torch.float16) for i in range(6)] + [Entry("odd", (7,), torch.float32)]
    writer = ShardedWriter(tmp_path, plan_shards(entries, 1 << 30), {"format": "pt"})
    seen, expected = set(), {}
    for i, entry in enumerate(entries):
        buffer = writer.buffer(entry.name)
        assert buffer.shape == entry.shape and buffer.dtype == entry.dtype
        seen.add(buffer.data_ptr())
        expected[entry.name] = buffer.fill_(i).clone()
        writer.write(entry.name, buffer)
    writer.close()
    assert len(seen) <= 3  # written buffers came back for later tensors (two of one size in flight, and "odd")
    written = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(written[name], value) for name, value in expected.items())


def test_the_merge_waits_once_write_ahead_bytes_are_waiting(tmp_path, monkeypatch):
    """Merged tensors queue up to WRITE_AHEAD bytes while the disk is slow, then the merge waits."""
    entries = [Entry(f"t{i}", (256, 256), torch.float32) for i in range(4)]
    monkeypatch.setattr(writer_module, "WRITE_AHEAD", 2 * entries[0].nbytes)
    disk = threading.Event()  # the disk is stuck until set
    real_write = writer_module.ShardFile.write
    monkeypatch.setattr(writer_module.ShardFile, "write", lambda self, data: disk.wait() and real_write(self, data))
    writer = ShardedWriter(tmp_path, plan_shards(entries, 1 << 30), {"format": "pt"})
    returned = []

    def merge() -> None:
        for i, entry in enumerate(entries):
            writer.write(entry.name, torch.full(entry.shape, float(i)))
            returned.append(entry.name)

    merging = threading.Thread(target=merge, daemon=True)
    merging.start()
    try:
        deadline = time.monotonic() + 30
        while len(returned) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        merging.join(timeout=0.3)  # time enough to return a third time, were there room
        # t0 is in the writer's hands (stuck on the disk) and t1 waits with it: the third waits for room
        assert merging.is_alive() and returned == ["t0", "t1"]
    finally:
        disk.set()
    merging.join(timeout=10)
    writer.close()
    assert returned == ["t0", "t1", "t2", "t3"]
    written = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(written[f"t{i}"], torch.full((256, 256), float(i))) for i in range(4))

"""A streaming safetensors writer: tensors go to disk one by one as they are merged.

``safetensors.torch.save_file`` needs every tensor of a shard in memory at once; a merge must
not hold more than a few. Since every output tensor's name, shape and dtype are known before
merging starts, each shard's header can be written first and the data appended in order. Writes
run on a background thread so that disk I/O overlaps the next tensor's arithmetic, and the
memory of a written tensor can be handed out again (``buffer``) for a later one to be computed in.

Each shard reaches the disk while it is written (``ShardFile``), not all at once at the end.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class Entry:
    """One output tensor as planned: the writer checks the merged tensor against it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Split entries, in order, into shards of at most ``max_shard_bytes`` (a larger single
    tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(entries: Sequence[Entry], metadata: Mapping[str, str]) -> bytes:
    table: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for e in entries:
        table[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


# bytes written between two waits for the disk: small enough that the page cache holding a
# shard's unwritten bytes stays small, large enough that the waits are few
WRITEBACK_WINDOW = 32 << 20
# bytes of merged tensors that may wait for the writer: a 7B model's FFN kind alone is three
# 45 M-entry tensors (270 MB in fp16), and with room for three such kinds the merge goes on while
# the disk catches up (Neuron-Fusion on LLaVA-1.5-7B, cold: 44.0-44.5 s with 256 MiB, 41.0 s with
# 768 MiB, the same peak anonymous memory: the waiting tensors are buffers the merge holds anyway)
WRITE_AHEAD = 768 << 20
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class ShardFile:
    """One shard file, written in order and synced to disk window by window as it grows.

    A merge's output is not read again by the merge, and publishing it must not make a later
    crash leave files that are named but not on the disk. So every ``WRITEBACK_WINDOW`` bytes the
    window is synced and its pages dropped from the page cache (on systems that can drop them):
    the output then stays durable as it is written, it never evicts the inputs still to be read,
    and its next window is written into the pages just dropped. On a virtual machine whose host
    takes back memory that stays free, fresh page-cache pages cost a fault each: writing 2 GiB
    took 5.3 s into fresh pages and 1.1 s window by window, syncs included."""

    def __init__(self, path: Path, header: bytes) -> None:
        self._handle: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._synced = 0  # bytes on the disk and dropped from the cache
        self._written = 0
        try:
            self.write(memoryview(header))
        except BaseException:
            self._handle.close()
            raise

    def write(self, data: memoryview) -> None:
        """Append ``data``, syncing each full window behind it."""
        for start in range(0, len(data), WRITEBACK_WINDOW):
            chunk = data[start : start + WRITEBACK_WINDOW]
            self._handle.write(chunk)
            self._written += len(chunk)
            if self._written - self._synced >= WRITEBACK_WINDOW:
                self._sync()

    def close(self, *, keep: bool = True) -> None:
        """Sync what is left, then close: the file is whole on the disk when this returns. A file
        that is not kept (the merge failed) is closed without waiting for the disk."""
        try:
            if keep:
                self._sync()
        finally:
            self._handle.close()

    def _sync(self) -> None:
        self._handle.flush()
        fd = self._handle.fileno()
        _datasync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, self._synced, self._written - self._synced, os.POSIX_FADV_DONTNEED)
        self._synced = self._written


class ShardedWriter:
    """Writes planned entries, in plan order, into ``directory`` as sharded safetensors with an
    index (``model.safetensors.index.json``) when there is more than one shard."""

    def __init__(self, directory: Path, shards: list[list[Entry]], metadata: Mapping[str, str]) -> None:
        self.directory = directory
        self.shards = shards
        self.metadata = dict(metadata)
        self.names = shard_names(len(shards))
        self._order = [(i, e) for i, shard in enumerate(shards) for e in shard]
        self._entries = {e.name: e for _, e in self._order}
        self._next = 0
        # tensors waiting to be written, and their bytes: up to WRITE_AHEAD, so that the merge
        # goes on while the disk catches up (a Neuron-Fusion kind's tensors come all at once)
        # and waiting tensors stay a bounded part of peak memory
        self._queue: queue.Queue[tuple[int, torch.Tensor] | None] = queue.Queue()
        self._waiting = 0
        self._room = threading.Condition()
        self._lock = threading.Lock()
        self._lent: set[int] = set()  # data pointers of the buffers handed out and not yet written
        self._free: dict[int, list[torch.Tensor]] = {}  # written buffers by size in bytes, as uint8
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="safetensors-writer", daemon=True)
        self._thread.start()

    def buffer(self, name: str) -> torch.Tensor:
        """Uninitialised CPU memory, in the planned shape and dtype of entry ``name``, for that
        tensor to be computed in and then passed to ``write`` (after which it is the writer's).

        It is the memory of an earlier tensor of the same size once that one is written, when
        there is one: a tensor in fresh memory pays a page fault per 4 KiB (several µs each on a
        virtual machine: seconds over a model), and the allocator hands a large tensor's memory
        back to the system as soon as it is freed."""
        entry = self._entries[name]
        with self._lock:
            free = self._free.get(entry.nbytes)
            raw = free.pop() if free else torch.empty(entry.nbytes, dtype=torch.uint8)
            self._lent.add(raw.data_ptr())
        return raw.view(entry.dtype).view(entry.shape)

    def _recycle(self, tensor: torch.Tensor) -> None:
        """Take back the memory of a written tensor if it is a buffer this writer lent."""
        with self._lock:
            if tensor.data_ptr() in self._lent:
                self._lent.discard(tensor.data_ptr())
                self._free.setdefault(tensor.nbytes, []).append(tensor.reshape(-1).view(torch.uint8))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue the next tensor; it must be the next planned entry, with its shape and dtype."""
        if self._error:
            raise self._error
        shard, entry = self._order[self._next]
        if name != entry.name or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise RuntimeError(
                f"writer expected {entry.name} {entry.shape} {entry.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        self._next += 1
        tensor = tensor.detach().to("cpu").contiguous()  # no copy for a contiguous CPU tensor
        with self._room:
            self._room.wait_for(lambda: not self._waiting or self._waiting + tensor.nbytes <= WRITE_AHEAD or self._error)
            self._waiting += tensor.nbytes
        if self._error:
            raise self._error
        self._queue.put((shard, tensor))

    def close(self) -> None:
        """Wait for the writes to finish, check that every entry was written, write the index."""
        self._queue.put(None)
        self._thread.join()
        if self._error:
            raise self._error
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if len(self.shards) > 1:
            index = {
                "metadata": {**self.metadata, "total_size": sum(e.nbytes for _, e in self._order)},
                "weight_map": {e.name: self.names[i] for i, e in self._order},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Stop the writer thread after a failure elsewhere (files are left for the caller); the
        tensors still waiting are not written."""
        with self._room:
            self._error = self._error or RuntimeError("aborted")
            self._room.notify()
        self._queue.put(None)
        self._thread.join()

    def _drain(self) -> None:
        handle: ShardFile | None = None
        current = -1
        try:
            while (item := self._queue.get()) is not None:
                shard, tensor = item
                if self._error:
                    continue
                if shard != current:
                    if handle:
                        done, handle = handle, None  # closed once, even if closing fails
                        done.close()
                    current = shard
                    handle = ShardFile(self.directory / self.names[shard], _header(self.shards[shard], self.metadata))
                handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                self._recycle(tensor)
                with self._room:
                    self._waiting -= tensor.nbytes
                    self._room.notify()
        except BaseException as err:  # reported to the producer on its next call
            with self._room:
                self._error = err
                self._room.notify()
            while self._queue.get() is not None:
                pass
        finally:
            if handle:
                try:
                    handle.close(keep=self._error is None)
                except OSError as err:  # a full disk may refuse the last buffered bytes only now
                    self._error = self._error or err

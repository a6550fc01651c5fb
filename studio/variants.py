"""Fused variants in memory, the loaded pair they belong to (``Pair``), and the bounded store
that holds the ones visitors built.

A Space is one process that strangers share: one visitor's Fuse must not change what another
sees, and no visitor may grow the server's memory without bound. So a variant is built for the
visitor who asked (and shared with anyone who asks for the same recipe), kept in a store bounded
by count and by bytes. Each visitor owns one variant at a time; room is made from variants nobody
owns any more and from those of visitors gone for a while, never from one that is answering, and
when nothing can make room the visitor is told so.

Variants are built **in memory**: a copy of the loaded original model's language model (the
vision tower and projector are shared, not copied) receives the merged tensors as the library
streams them (``fusion.merge.MergeStream``). Nothing is written to disk to serve a chat.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from fusion.architectures import IN_MEMORY, SHARED_MODULES, layout_named
from fusion.checkpoint import Checkpoint, open_checkpoint
from fusion.inference import ChatModel, compute_dtype
from fusion.merge import MergeStream, Progress
from fusion.presets import Preset
from fusion.quantize import prepare_cpu_layout, release_freed_memory
from fusion.registry import Recipe

from . import StudioError


@dataclass
class Variant:
    """A fused model and how it was made: ``name`` is the method as the visitor chose it
    (e.g. 'neu-p-taska'), ``recipe`` what it resolved to. ``users``: answers being generated
    with it now."""

    key: str
    name: str
    recipe: Recipe
    record: dict[str, Any]
    model: ChatModel
    report: list[dict[str, Any]]
    seconds: float
    nbytes: int
    users: int = field(default=0, compare=False)
    owners: set[str] = field(default_factory=set, compare=False)  # the visitors (sessions) whose fused model it is now
    last_used: float = field(default_factory=time.monotonic, compare=False)


@dataclass
class Pair:
    """The loaded models of one preset: the original MLLM and the preset's fused variant,
    fixed for the life of the process (visitors' own variants live in the store)."""

    preset: Preset
    original: ChatModel
    default: Variant
    def open_checkpoints(self) -> tuple[Checkpoint, Checkpoint]:
        """The preset's (tuned, base), opened for one merge. They are not kept open between merges: a merge
        reads every page of both, and while their files stay mapped those pages count as the
        app's resident memory (5.5 GiB of a 7 B pair's, measured, on top of the three models);
        dropped, they are only the page cache's. Opening reads the headers again: 0.03-0.28 s for
        that pair (pickle shards included)."""
        return open_checkpoint(self.preset.tuned), open_checkpoint(self.preset.base)

    @property
    def method(self) -> str:
        """The preset's method as it was asked for (e.g. 'neu-p-taska')."""
        return self.default.name

    @property
    def fused(self) -> ChatModel:
        return self.default.model

    @property
    def shared(self) -> list[str]:
        """The modules the fused model borrows from the original (one copy in memory)."""
        mine, theirs = self.original.model.model, self.fused.model.model
        return [name for name in SHARED_MODULES if getattr(theirs, name, None) is not None and getattr(theirs, name) is getattr(mine, name, None)]


def language_model_bytes(model: torch.nn.Module) -> int:
    """Bytes a variant adds: every parameter and buffer outside the shared vision modules."""
    shared = {id(t) for name in SHARED_MODULES if (m := getattr(model.model, name, None)) is not None for t in (*m.parameters(), *m.buffers())}
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in shared}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _shallow_copy(original: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``original`` whose vision tower and projector are the original's own
    modules (the merge copies them unchanged, so one copy in memory serves both)."""
    shared = [getattr(original.model, name) for name in SHARED_MODULES if getattr(original.model, name, None) is not None]
    return copy.deepcopy(original, {id(module): module for module in shared})


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put a merged tensor into the parameter ``name``; a 4-bit layer's weight is quantized
    again from it with the layer's own settings."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, attr)
    if type(current).__name__ == "Params4bit":
        from bitsandbytes.nn import Params4bit

        device = current.device
        fresh = Params4bit(
            tensor.to(compute_dtype(device)).cpu(),
            requires_grad=False,
            quant_type=current.quant_type,
            compress_statistics=current.compress_statistics,
            quant_storage=current.quant_storage,
        )
        setattr(module, attr, fresh.to(device))
        prepare_cpu_layout([module])
    else:
        with torch.no_grad():
            current.copy_(tensor)


def build_variant(original: ChatModel, stream: MergeStream, title: str, name: str, progress: Callable[[Progress], None] | None = None) -> Variant:
    """The fused model of ``stream``'s recipe, built in memory next to ``original``."""
    start = time.perf_counter()
    model = _shallow_copy(original.model)
    in_memory = layout_named(IN_MEMORY)
    for planned, tensor in stream.tensors(progress, merged_only=True, started=start):
        _assign(model, in_memory.tuned_key(stream.layout.base_key(planned.name)), tensor)
    release_freed_memory()
    fused = ChatModel(model.eval(), original.processor, True, title)
    record = {**stream.record, "key": stream.key}
    return Variant(stream.key, name, stream.recipe, record, fused, stream.report, time.perf_counter() - start, language_model_bytes(model))


PER_ADDRESS = 2  # variants one network address may own before its oldest are the first to go


def _address(owner: str) -> str:
    return owner.split("/", 1)[0]


class VariantStore:
    """Variants by recipe key, within ``max_count`` variants and ``max_bytes`` bytes. Each
    visitor owns one at a time (the one their fused columns use): fusing again releases their
    previous one, so one visitor's many Fuse clicks replace their own variant, not everyone
    else's. Room is made from variants that nobody owns, then from the least recently used of
    those idle for ``idle_seconds`` (a visitor who left); one that is answering is never evicted.
    One variant is built at a time (``building``)."""

    def __init__(self, max_count: int, max_bytes: int, idle_seconds: float = 900.0) -> None:
        self.max_count, self.max_bytes, self.idle_seconds = max_count, max_bytes, idle_seconds
        self._variants: OrderedDict[str, Variant] = OrderedDict()
        self._lock = threading.Lock()
        self.building = threading.Lock()

    def __len__(self) -> int:
        return len(self._variants)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self._variants.values())

    def get(self, key: str) -> Variant | None:
        with self._lock:
            variant = self._variants.get(key)
            if variant is not None:
                self._variants.move_to_end(key)
                variant.last_used = time.monotonic()
            return variant

    def release(self, owner: str) -> None:
        """``owner`` no longer uses any of the stored variants (they went back to the default)."""
        with self._lock:
            for variant in self._variants.values():
                variant.owners.discard(owner)

    def claim(self, variant: Variant, owner: str) -> Variant:
        """``variant`` is now ``owner``'s fused model, and none of their earlier ones is."""
        self.release(owner)
        with self._lock:
            variant.owners.add(owner)
            variant.last_used = time.monotonic()
        return variant

    def make_room(self, nbytes: int, owner: str) -> None:
        """Evict until one more variant of ``nbytes`` fits, in this order: the idle ones nobody
        owns or only ``owner`` does (the one the new variant replaces), those of an address
        that owns more than ``PER_ADDRESS`` (sessions cost a client nothing to invent; owners
        are ``"address/session"``), then, oldest use first, the idle ones unused for
        ``idle_seconds``. StudioError when that leaves no room: every variant belongs to a
        visitor still using it. The owner's own variant is kept if no room can be made."""
        if nbytes > self.max_bytes or self.max_count < 1:
            raise StudioError(
                f"This server has no room for another fused model ({nbytes / 2**20:.0f} MiB; it keeps at most "
                f"{self.max_bytes / 2**20:.0f} MiB of them). Chat with the default fused model, or run the app yourself."
            )
        with self._lock:
            stale = time.monotonic() - self.idle_seconds
            idle = [v for v in self._variants.values() if v.users == 0]
            held_by: dict[str, list[Variant]] = {}
            for v in sorted(self._variants.values(), key=lambda v: v.last_used):
                for address in {_address(o) for o in v.owners}:
                    held_by.setdefault(address, []).append(v)
            hoarded = {id(v) for vs in held_by.values() if len(vs) > PER_ADDRESS for v in vs[: len(vs) - PER_ADDRESS]}
            order = [v for v in idle if v.owners <= {owner}]
            order += [v for v in idle if id(v) in hoarded and v not in order]
            order += sorted((v for v in idle if v.owners and v.last_used < stale and v not in order), key=lambda v: v.last_used)
            for v in order:
                if len(self._variants) < self.max_count and self.nbytes + nbytes <= self.max_bytes:
                    break
                del self._variants[v.key]
            if len(self._variants) >= self.max_count or self.nbytes + nbytes > self.max_bytes:
                raise StudioError(
                    f"The server holds as many fused models as it can ({self.max_count}), each in use by a visitor. "
                    "Chat with the default fused model, or try again in a few minutes."
                )

    def put(self, variant: Variant, owner: str) -> None:
        with self._lock:
            self._variants[variant.key] = variant
        self.claim(variant, owner)

    @contextmanager
    def using(self, variant: Variant) -> Iterator[Variant]:
        """Mark ``variant`` as answering, so that it is not evicted meanwhile."""
        with self._lock:
            variant.users += 1
            variant.last_used = time.monotonic()
        try:
            yield variant
        finally:
            with self._lock:
                variant.users -= 1

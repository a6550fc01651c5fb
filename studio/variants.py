"""Fused variants in memory, and the bounded store that holds the ones visitors built.

A Space is one process that strangers share: one visitor's Fuse must not change what another
sees, and no visitor may grow the server's memory without bound. So a variant is built for the
visitor who asked (and shared with anyone who asks for the same recipe), kept in a store bounded
by count and by bytes, and evicted least-recently-used when room is needed; a variant that is
answering a question at that moment is never evicted, and when nothing can make room the visitor
is told the server is busy.

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

from fusion.architectures import LLAVA_IN_MEMORY, SHARED_MODULES, layout_named
from fusion.inference import ChatModel, compute_dtype
from fusion.merge import MergeStream, Progress
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
    else:
        with torch.no_grad():
            current.copy_(tensor)


def build_variant(original: ChatModel, stream: MergeStream, title: str, name: str, progress: Callable[[Progress], None] | None = None) -> Variant:
    """The fused model of ``stream``'s recipe, built in memory next to ``original``."""
    start = time.perf_counter()
    model = _shallow_copy(original.model)
    in_memory = layout_named(LLAVA_IN_MEMORY)
    for planned, tensor in stream.tensors(progress, merged_only=True, started=start):
        base_name = stream.layout.base_key(planned.name)
        _assign(model, in_memory.tuned_key(base_name), tensor)
    fused = ChatModel(model.eval(), original.processor, True, title)
    record = {**stream.record, "key": stream.key}
    return Variant(stream.key, name, stream.recipe, record, fused, stream.report, time.perf_counter() - start, language_model_bytes(model))


class VariantStore:
    """Variants by recipe key: least recently used first out, within ``max_count`` variants and
    ``max_bytes`` bytes. One variant is built at a time (``building``)."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
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
            return variant

    def make_room(self, nbytes: int) -> None:
        """Evict idle variants, oldest use first, until one more of ``nbytes`` fits; StudioError
        ('busy') when the variants in use leave no room."""
        if nbytes > self.max_bytes or self.max_count < 1:
            raise StudioError(
                f"This server has no room for another fused model ({nbytes / 2**20:.0f} MiB; it keeps at most "
                f"{self.max_bytes / 2**20:.0f} MiB of them). Chat with the default fused model, or run the app yourself."
            )
        with self._lock:
            for key in [k for k, v in self._variants.items() if v.users == 0]:
                if len(self._variants) < self.max_count and self.nbytes + nbytes <= self.max_bytes:
                    break
                del self._variants[key]
            if len(self._variants) >= self.max_count or self.nbytes + nbytes > self.max_bytes:
                raise StudioError("The server is busy: every fused model it can hold is answering someone right now. Try again in a minute.")

    def put(self, variant: Variant) -> None:
        with self._lock:
            self._variants[variant.key] = variant

    @contextmanager
    def using(self, variant: Variant) -> Iterator[Variant]:
        """Mark ``variant`` as answering, so that it is not evicted meanwhile."""
        with self._lock:
            variant.users += 1
        try:
            yield variant
        finally:
            with self._lock:
                variant.users -= 1

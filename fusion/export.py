"""The language model of a tuned or fused MLLM, as a plain causal-LM checkpoint of its base's
architecture (``neuron-fusion export-lm``): what text-only benchmark harnesses load
(``lm-eval --model hf``), where they cannot load a LLaVA.

Its tensors are the MLLM's language-model tensors under the base's names (``fusion.merge``'s
plan maps them), the vocabulary rows the MLLM added beyond the base's (the image and padding
tokens) dropped; its config, tokenizer and generation config are the base's, and its chat
template the base's, or the MLLM's where the base has none. Written like a merge: streamed
tensor by tensor, staged, published whole, reused when it is there (``fusion.output``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import Checkpoint, open_checkpoint
from .errors import FusionError
from .merge import cache_key, plan_merge
from .output import claim, read_recipe
from .writer import Entry, ShardedWriter, plan_shards

TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    reused: bool
    record: dict[str, Any]
    seconds: float


def chat_template(model: Checkpoint, base: Checkpoint) -> str | None:
    """The chat template the exported model gets: the base's own (it is the base's tokenizer),
    else the MLLM's (``chat_template.jinja``, or ``chat_template.json``'s), else None."""
    for checkpoint in (base, model):
        directory = checkpoint.directory
        config = directory / "tokenizer_config.json"
        if checkpoint is base and config.is_file() and json.loads(config.read_text()).get("chat_template"):
            return None  # the base's tokenizer config carries it, and is copied
        if (directory / TEMPLATE_FILE).is_file():
            return (directory / TEMPLATE_FILE).read_text()
        if (directory / "chat_template.json").is_file():
            template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def export_language_model(model_ref: str, out: str | Path, *, base_ref: str | None = None, shard_bytes: int = 4 << 30, allow_pickle: bool = True) -> ExportResult:
    """Write ``model_ref``'s language model to ``out`` as a checkpoint of its base's
    architecture. ``base_ref``: the base LLM (its config and tokenizer); by default the one a
    fused model's recipe names."""
    start = time.perf_counter()
    model = open_checkpoint(model_ref, allow_pickle=allow_pickle)
    if base_ref is None:
        recorded = read_recipe(model.directory) or {}
        base_ref = recorded.get("base")
        if not isinstance(base_ref, str):
            raise FusionError(f"{model.ref}: name its base LLM with --base (only a fused model's recipe says which it is)")
    base = open_checkpoint(base_ref, allow_pickle=allow_pickle)
    plan = [p for p in plan_merge(model, base) if p.base_name is not None]  # the language model's tensors only
    if not plan:
        raise FusionError(f"{model.ref}: no language-model tensors to export")
    names: dict[str, Any] = {}
    for p in plan:  # a head the base ties maps onto its embedding: written once, from the MLLM's embedding
        if p.base_name not in names or p.name.endswith(p.base_name):
            names[p.base_name] = p
    record = {"library": "neuron-fusion-studio", "version": __version__, "export": "language-model", "model": model.ref, "base": base.ref}
    key = cache_key(record, model, base)
    slot = claim(Path(out), key, cached=False)
    if slot.recipe is not None:
        return ExportResult(slot.out, True, slot.recipe, time.perf_counter() - start)
    staging = slot.staging
    entries = [Entry(name, (p.rows or p.shape[0], *p.shape[1:]), p.dtype) for name, p in names.items()]
    writer = ShardedWriter(staging, plan_shards(entries, shard_bytes), {"format": "pt", "fusion_export": json.dumps(record, sort_keys=True)})
    try:
        for name, p in names.items():
            tensor = model.get(p.name)
            writer.write(name, tensor[: p.rows] if p.rows else tensor)  # the base's vocabulary: added rows dropped
        writer.close()
        for sidecar in base.sidecar_files():
            shutil.copyfile(sidecar, staging / sidecar.name)
        template = chat_template(model, base)
        if template is not None and not (staging / TEMPLATE_FILE).exists():
            (staging / TEMPLATE_FILE).write_text(template)
        published = slot.publish({**record, "key": key})
    except BaseException as err:
        writer.abort()
        slot.abandon(err)
    return ExportResult(slot.out, False, published, time.perf_counter() - start)

"""How the app runs: command-line flags, which default to ``NF_*`` environment variables (a
Space sets those, not flags)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fusion.cli import parse_sets
from fusion.presets import Preset

FALLBACK_PRESET = "pocket"
DEFAULT_MAX_NEW_TOKENS = 256


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def default_preset(cuda: bool) -> str:
    """The paper's pair where a GPU can run it, the bundled pocket pair elsewhere."""
    return "llava-1.5-7b" if cuda else FALLBACK_PRESET


@dataclass(frozen=True)
class Settings:
    """How the app runs: from command-line flags, which default to ``NF_*`` environment
    variables (a Space sets those, not flags)."""

    preset: str
    method: str | None = None  # None: the preset's own method
    load_4bit: bool = False
    device: str = "auto"
    concurrency: int = 2
    queue_size: int = 32
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_variants: int = 4
    params: Mapping[str, str] = field(default_factory=dict)  # --set: the start recipe's parameters (empty: the preset's)


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ, cuda: bool | None = None) -> Settings:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    parser = argparse.ArgumentParser(description="Neuron-Fusion Studio: compare a tuned MLLM with its fused version.")
    parser.add_argument("--preset", default=env.get("NF_PRESET") or default_preset(cuda), help="model pair (env NF_PRESET; default: llava-1.5-7b with CUDA, else pocket)")
    parser.add_argument("--method", default=env.get("NF_METHOD") or None, help="merge method at load time (env NF_METHOD; default: the preset's)")
    parser.add_argument("--4bit", dest="load_4bit", action="store_true", default=_truthy(env.get("NF_4BIT")), help="load the models' language layers in 4-bit nf4, on CUDA or a CPU (env NF_4BIT=1)")
    parser.add_argument("--device", default=env.get("NF_DEVICE") or "auto", choices=("auto", "cpu", "cuda"), help="where models run and merge (env NF_DEVICE)")
    parser.add_argument("--concurrency", type=int, default=int(env.get("NF_CONCURRENCY") or 2), help="model calls at once (env NF_CONCURRENCY)")
    parser.add_argument("--queue-size", type=int, default=int(env.get("NF_QUEUE_SIZE") or 32), help="requests waiting at most (env NF_QUEUE_SIZE)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=int(env.get("NF_MAX_NEW_TOKENS") or DEFAULT_MAX_NEW_TOKENS),
        help="longest answer in tokens, per model and message (env NF_MAX_NEW_TOKENS)",
    )
    parser.add_argument(
        "--max-variants",
        type=int,
        default=int(env.get("NF_MAX_VARIANTS") or 4),
        help="visitors' fused variants kept in memory at most, besides the default (env NF_MAX_VARIANTS); 0: no Fuse",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="a parameter of the method the app fuses with at start (repeatable; env NF_SET='suppress=0.3 top_ratio=0.1', which flags replace); visitors start from this recipe",
    )
    args = parser.parse_args(argv)
    return Settings(
        args.preset,
        args.method,
        args.load_4bit,
        args.device,
        max(1, args.concurrency),
        max(1, args.queue_size),
        max(1, args.max_new_tokens),
        max(0, args.max_variants),
        parse_sets(args.sets if args.sets is not None else (env.get("NF_SET") or "").split()),
    )


def start_recipe(settings: Settings, preset: Preset) -> tuple[str, dict[str, Any]]:
    """The method and parameters the app fuses ``preset`` with at start: the flags' where they
    name this preset, else the preset's own (a fallback preset runs its own recipe)."""
    asked = preset.name == settings.preset
    method = settings.method if asked and settings.method else preset.method
    params = dict(settings.params) if asked and settings.params else (dict(preset.params) if method == preset.method else {})
    return method, params

"""Model presets: a tuned MLLM, the base LLM it was tuned from, a default method, a probe set.

One registry for the CLI (``--preset``), the behaviour bench and the app. Hub pairs keep real
hub ids (their bases checked against the model cards); ``pocket`` is the bundled pair, offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FusionError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class Preset:
    name: str
    tuned: str
    base: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    probes: str = "llava-1.5.json"
    note: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "llava-1.5-7b",
            "llava-hf/llava-1.5-7b-hf",
            "lmsys/vicuna-7b-v1.5",
            "neu-p-taska",
            note="The paper's pair: LLaVA-1.5-7B and the Vicuna-7B-v1.5 it was tuned from (GPU recommended).",
        ),
        Preset(
            "pocket",
            str(ASSETS / "pocket" / "llava"),
            str(ASSETS / "pocket" / "base"),
            "neu-p-taska",
            probes="pocket.json",
            note="A bundled tiny Vicuna/LLaVA pair trained on a synthetic world; runs offline on a CPU in seconds.",
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise FusionError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def probe_path(preset: Preset) -> Path:
    return ASSETS / "probes" / preset.probes

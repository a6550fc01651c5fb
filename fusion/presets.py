"""Model presets: a tuned MLLM, the base LLM it was tuned from, a default method, a probe set.

One registry for the CLI (``--preset``), the behaviour bench and the app. Hub pairs keep real
hub ids (their bases checked against the model cards); ``pocket`` is the bundled pair, offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FusionError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class Preset:
    """A pair to fuse. ``label`` and ``base_label`` name the models in the UI; ``gpu`` says a
    CUDA GPU is recommended (the app then offers 4-bit loading)."""

    name: str
    tuned: str
    base: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    probes: str = "llava-1.5.json"
    sweep: str = ""  # a sweep's rows under assets (``python -m fusion eval --sweep``), for the app's trade-off plot
    note: str = ""
    label: str = "LLaVA-1.5"
    base_label: str = "Vicuna"
    gpu: bool = True


# Each hub pair's base is the one its model card names as the language model it was tuned from.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "llava-1.5-7b",
            "llava-hf/llava-1.5-7b-hf",
            "lmsys/vicuna-7b-v1.5",
            "neu-p-taska",
            note="The paper's pair: LLaVA-1.5-7B and the Vicuna-7B-v1.5 it was tuned from (~14 GB each in fp16; GPU recommended, 4-bit fits a T4).",
            base_label="Vicuna-7B-v1.5",
        ),
        Preset(
            "llava-1.5-13b",
            "llava-hf/llava-1.5-13b-hf",
            "lmsys/vicuna-13b-v1.5",
            "neu-p-taska",
            note="LLaVA-1.5-13B and Vicuna-13B-v1.5 (~26 GB each in fp16; a 24 GB GPU with 4-bit, or device_map='auto').",
            label="LLaVA-1.5-13B",
            base_label="Vicuna-13B-v1.5",
        ),
        Preset(
            "llava-llama-3-8b",
            "xtuner/llava-llama-3-8b-v1_1-transformers",
            "meta-llama/Meta-Llama-3-8B-Instruct",
            "neu-p-taska",
            note="XTuner's LLaVA-Llama-3-8B v1.1 (full LLM fine-tuning) and its Llama-3-8B-Instruct base (gated on the hub: log in first).",
            label="LLaVA-Llama-3-8B",
            base_label="Llama-3-8B-Instruct",
        ),
        Preset(
            "llava-v1.6-mistral-7b",
            "llava-hf/llava-v1.6-mistral-7b-hf",
            "mistralai/Mistral-7B-Instruct-v0.2",
            "neu-p-taska",
            note="LLaVA-NeXT (1.6) on Mistral-7B-Instruct-v0.2, the base its config names (gated on the hub: accept its terms and log in first); ~15 GB in fp16, images in up to five 336-px tiles.",
            label="LLaVA-NeXT-Mistral-7B",
            base_label="Mistral-7B-Instruct-v0.2",
        ),
        Preset(
            "llava-v1.6-vicuna-7b",
            "llava-hf/llava-v1.6-vicuna-7b-hf",
            "lmsys/vicuna-7b-v1.5",
            "neu-p-taska",
            note="LLaVA-NeXT (1.6) on Vicuna-7B-v1.5, the base of LLaVA-1.5-7B too; ~14 GB in fp16, images in up to five 336-px tiles.",
            label="LLaVA-NeXT-Vicuna-7B",
            base_label="Vicuna-7B-v1.5",
        ),
        Preset(
            "llava-onevision-qwen2-7b",
            "llava-hf/llava-onevision-qwen2-7b-ov-hf",
            "Qwen/Qwen2-7B-Instruct",
            "neu-p-taska",
            note="LLaVA-OneVision-7B and Qwen2-7B-Instruct, the base its config names; ~16 GB in fp16, SigLIP images in up to ten 384-px tiles.",
            label="LLaVA-OneVision-7B",
            base_label="Qwen2-7B-Instruct",
        ),
        Preset(
            "qwen2.5-vl-7b",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "Qwen/Qwen2.5-7B",
            "neu-p-taska",
            note="Qwen2.5-VL-7B-Instruct and Qwen2.5-7B, the LLM its report says it starts from (the report names no repo; this is the matching size); ~17 GB in fp16, images at most 1,280 tokens here.",
            label="Qwen2.5-VL-7B",
            base_label="Qwen2.5-7B",
        ),
        Preset(
            "tiny-llava-1.4b",
            "bczhou/tiny-llava-v1-hf",
            "PY007/TinyLlama-1.1B-Chat-v0.3",
            "neu-p-taska",
            note="TinyLLaVA-1.4B, tuned from TinyLlama-1.1B-Chat-v0.3 on LLaVA-1.5's data: small enough for a CPU Space.",
            label="TinyLLaVA-1.4B",
            base_label="TinyLlama-1.1B-Chat",
            gpu=False,
        ),
        Preset(
            "pocket",
            str(ASSETS / "pocket" / "llava"),
            str(ASSETS / "pocket" / "base"),
            "neu-p-taska",
            probes="pocket.json",
            sweep="pocket/sweep.json",
            note="A bundled tiny Vicuna/LLaVA pair trained on a made-up world (assets/pocket); runs offline on a CPU in seconds. It knows the capitals and languages of 40 invented countries (Zolbisia, Kerisia, ...), opposites, one-digit sums and differences, plurals, past tenses, animal sounds, the colours of things and which day or month comes next; its pictures are coloured circles, squares and triangles on a 3x3 grid. A question from outside that world gets an answer from inside it.",
            label="Pocket-LLaVA",
            base_label="Pocket-Vicuna",
            gpu=False,
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise FusionError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def probe_path(preset: Preset) -> Path:
    return ASSETS / "probes" / preset.probes


def preset_sweep(preset: Preset) -> list[dict[str, Any]] | None:
    """The rows of the sweep the preset ships (None if it ships none): each method along its
    strength knob, with the base and the tuned model, on the whole probe set."""
    if not preset.sweep:
        return None
    path = ASSETS / preset.sweep
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FusionError(f"{path}: not a readable sweep ({type(err).__name__}: {err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise FusionError(f"{path}: not a sweep (a JSON list of bench rows)")
    return rows

"""The behaviour bench: how much language a tuned MLLM forgot, and how much fusion gives back.

    python -m fusion eval --preset pocket [--methods neu-p-taska,ties,...] --out DIR
    python -m fusion eval --preset pocket --sweep --out DIR

For a base LLM, its tuned MLLM and fused models, it asks a probe set's text-only questions
(and, for the MLLMs, its image questions) and reports per model: language accuracy, visual
accuracy, and on text-only probes the Context-Hallucination and Not-Known rates. Writes
``results.json`` (a list of rows), ``results.md`` (a table), ``results.png`` (a chart) and
``replies.jsonl`` (every answer, for reading). ``--sweep`` instead walks each method's strength
parameter and draws the language-vs-visual trade-off of every method on one plot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .detectors import context_hallucination, not_known
from .errors import FusionError
from .inference import ChatModel
from .merge import fuse
from .presets import Preset, probe_path
from .registry import resolve

DEFAULT_METHODS = ("task_arithmetic", "ties", "breadcrumbs", "dare", "della", "neuron_fusion")
# The knobs --sweep walks per method, each from "all base" toward "all tuned". Neuron-Fusion
# has two: how many neurons keep their change (top_ratio) and how much of it the rest keep
# (suppress).
SWEEPS: dict[str, tuple[tuple[str, tuple[float, ...]], ...]] = {
    "task_arithmetic": (("lambda", (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)),),
    "ties": (("lambda", (0.1, 0.3, 0.5, 0.7, 1.0)),),
    "breadcrumbs": (("lambda", (0.1, 0.3, 0.5, 0.7, 1.0)),),
    "dare": (("lambda", (0.1, 0.3, 0.5, 0.7, 1.0)),),
    "della": (("lambda", (0.1, 0.3, 0.5, 0.7, 1.0)),),
    "neuron_fusion": (("top_ratio", (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)), ("suppress", (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0))),
}


@dataclass(frozen=True)
class Probe:
    """One question. ``answers``: accepted answer words (a reply is right if it contains one as
    a whole word); empty means the honest reply is a decline. ``image``: None for text-only,
    a file name relative to the probe file, or a pocket-world scene (a dict)."""

    question: str
    answers: tuple[str, ...]
    skill: str
    image: str | dict | None = None


def load_probes(path: Path) -> tuple[list[Probe], list[Probe]]:
    """(text-only probes, image probes) from a probe-set JSON file."""
    try:
        data = json.loads(path.read_text())
        text = [Probe(p["question"], tuple(p["answers"]), p.get("skill", "")) for p in data["text"]]
        visual = [Probe(p["question"], tuple(p["answers"]), p.get("skill", ""), p["image"]) for p in data.get("visual", [])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise FusionError(f"{path}: not a readable probe set ({type(err).__name__}: {err})") from None
    return text, visual


def preset_probes(preset: Preset, limit: int | None = None) -> tuple[list[Probe], list[Probe], Path]:
    """A preset's probe set: the first ``limit`` text and image probes (all by default), and
    the folder its image files are relative to."""
    path = probe_path(preset)
    text, visual = load_probes(path)
    return text[:limit], visual[:limit], path.parent


def probe_image(probe: Probe, root: Path) -> Image.Image:
    if isinstance(probe.image, dict):
        from .pocket.world import draw, scene_from_json

        return draw(scene_from_json(probe.image))
    return Image.open(root / str(probe.image)).convert("RGB")


def is_correct(reply: str, probe: Probe) -> bool:
    if not probe.answers:
        return not_known(reply) is not None
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.IGNORECASE) for a in probe.answers)


def score(model: ChatModel, text: Sequence[Probe], visual: Sequence[Probe], root: Path, max_new_tokens: int = 24) -> tuple[dict[str, float | None], list[dict]]:
    """The four rates for one model, and its replies."""
    text_replies = model.answer([p.question for p in text], max_new_tokens=max_new_tokens)
    rates: dict[str, float | None] = {
        "language_accuracy": _mean(is_correct(r, p) for r, p in zip(text_replies, text)),
        "visual_accuracy": None,
        "context_hallucination_rate": _mean(context_hallucination(r) is not None for r in text_replies),
        "not_known_rate": _mean(not_known(r) is not None for r in text_replies),
    }
    replies = [{"question": p.question, "image": None, "reply": r, "correct": is_correct(r, p)} for p, r in zip(text, text_replies)]
    if model.multimodal and visual:
        images = [probe_image(p, root) for p in visual]
        visual_replies = model.answer([p.question for p in visual], images, max_new_tokens=max_new_tokens)
        rates["visual_accuracy"] = _mean(is_correct(r, p) for r, p in zip(visual_replies, visual))
        replies += [
            {"question": p.question, "image": p.image, "reply": r, "correct": is_correct(r, p)} for p, r in zip(visual, visual_replies)
        ]
    return rates, replies


def _mean(flags: Any) -> float:
    values = list(flags)
    return sum(values) / len(values) if values else float("nan")


def run_bench(
    preset: Preset,
    methods: Sequence[tuple[str, dict[str, Any]]],
    out: Path,
    *,
    include_base: bool = True,
    include_tuned: bool = True,
    device: str = "cpu",
    seed: int = 0,
    limit: int | None = None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Score base, tuned and each fused model; returns the rows also written to ``out``.
    ``limit`` keeps the first N text and N image probes (a quick look)."""
    text, visual, root = preset_probes(preset, limit)
    rows, all_replies = [], []

    def add(kind: str, model: ChatModel, method: str | None = None, params: dict | None = None, label: str | None = None) -> None:
        rates, replies = score(model, text, visual, root)
        label = label or kind
        rows.append({"model": kind, "method": method, "params": params, "label": label, **rates})
        all_replies.extend({"model": kind, "method": method, "label": label, **r} for r in replies)
        log(f"{label:<40} " + "  ".join(f"{k} {_fmt(v)}" for k, v in rates.items()))

    if include_base:
        add("base", ChatModel.load(preset.base, multimodal=False, device=device))
    if include_tuned:
        add("tuned", ChatModel.load(preset.tuned, multimodal=True, device=device))
    for method, params in methods:
        recipe = resolve(method, params, seed)
        result = fuse(preset.tuned, preset.base, recipe, device=device, progress=None)
        settings = ", ".join(f"{k}={recipe.params[k]}" for k in params)
        label = f"fused: {method}" + (f" ({settings})" if settings else "")
        add("fused", ChatModel.load(result.path, multimodal=True, device=device), method, recipe.params, label)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(rows))
    (out / "replies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_replies))
    bar_chart(rows, out / "results.png", preset.name)
    return rows


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"




def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| model | language accuracy | visual accuracy | Context-Hallucination | Not-Known |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {_fmt(r['language_accuracy'])} | {_fmt(r['visual_accuracy'])} | "
            f"{_fmt(r['context_hallucination_rate'])} | {_fmt(r['not_known_rate'])} |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["language_accuracy", "visual_accuracy", "context_hallucination_rate", "not_known_rate"]
    names = ["language acc.", "visual acc.", "Context-Halluc.", "Not-Known"]
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        values = [100 * (r[m] or 0) for m in metrics]
        ax.bar([x + i * width for x in range(len(metrics))], values, width, label=r["label"])
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(metrics))], names)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"Behaviour bench: {title}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_sweep(preset: Preset, methods: Sequence[str], out: Path, *, device: str = "cpu", seed: int = 0, limit: int | None = None, log: Any = print) -> list[dict[str, Any]]:
    """Each method along its strength knob (SWEEPS); one trade-off plot of all of them."""
    rows = run_bench(preset, [], out, device=device, seed=seed, limit=limit, log=log)
    for method in methods:
        for knob, values in SWEEPS[resolve(method).method]:
            points = [(method, {knob: v}) for v in values]
            where = out / f"sweep-{method}-{knob}"
            for row in run_bench(preset, points, where, include_base=False, include_tuned=False, device=device, seed=seed, limit=limit, log=log):
                rows.append({**row, "knob": knob, "value": row["params"][knob]})
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    tradeoff_plot(rows, out / "sweep.png", preset.name)
    return rows


def tradeoff_plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5), dpi=110)
    for method, knob in dict.fromkeys((r["method"], r["knob"]) for r in rows if r["model"] == "fused"):
        pts = sorted((r for r in rows if r["method"] == method and r["knob"] == knob), key=lambda r: r["value"])
        ax.plot([100 * r["visual_accuracy"] for r in pts], [100 * r["language_accuracy"] for r in pts], "o-", label=f"{method} ({knob})", markersize=4)
    for r in rows:
        if r["model"] == "tuned":
            ax.plot(100 * r["visual_accuracy"], 100 * r["language_accuracy"], "k*", markersize=12, label="tuned")
        if r["model"] == "base":
            ax.axhline(100 * r["language_accuracy"], color="grey", ls="--", lw=1, label="base language accuracy")
    ax.set_xlabel("visual accuracy (%)")
    ax.set_ylabel("language accuracy (%)")
    ax.set_title(f"Language vs visual trade-off: {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_methods(text: str) -> list[tuple[str, dict[str, Any]]]:
    """'neu-p-taska,ties' -> [(name, {}), ...]; 'neu-p-taska:suppress=0.5:top_ratio=0.1' sets
    parameters (checked by the registry). An unknown name or a bad value raises FusionError."""
    out = []
    for item in (m.strip() for m in text.split(",")):
        if not item:
            continue
        name, *settings = item.split(":")
        params: dict[str, Any] = {}
        for setting in settings:
            key, eq, value = setting.partition("=")
            if not eq:
                raise FusionError(f"'{setting}' in --methods: expected NAME=VALUE after the method name")
            params[key.strip()] = value.strip()
        resolve(name.strip(), params)
        out.append((name.strip(), params))
    return out

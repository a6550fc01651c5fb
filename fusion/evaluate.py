"""The behaviour bench: how much language a tuned MLLM forgot, and how much fusion gives back.

    python -m fusion eval --preset pocket [--methods neu-p-taska,ties,...] --out DIR
    python -m fusion eval --preset pocket --sweep --out DIR

For a base LLM, its tuned MLLM and fused models, it asks a probe set's text-only questions
(and, for the MLLMs, its image questions) and reports per model: language accuracy, visual
accuracy, on text-only probes the Context-Hallucination and Not-Known rates, and on yes/no
questions about objects that are not in the image the Object-Hallucination rate. Writes
``results.json`` (a list of rows), ``results.md`` (a table), ``results.png`` (a chart) and
``replies.jsonl`` (every answer with its labels, for reading). ``--sweep`` instead walks each
method's strength parameter and draws the language-vs-visual trade-off of every method on one
plot. This module measures; ``fusion.report`` and ``fusion.plots`` show.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .detectors import detect, not_known
from .errors import FusionError
from .inference import ChatModel
from .merge import fuse
from .plots import bench_figure, tradeoff_figure
from .presets import Preset, probe_path
from .registry import resolve
from .report import RATES, jsonl, markdown_table, percent

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
# Probes asked at once. ChatModel.answer batches by 16 too, so reporting progress per batch
# asks the same batches, and gets the same greedy replies, as asking a whole set at once.
BATCH = 16

Progress = Callable[[int, int], None]  # (probes answered, probes to answer) for one model


@dataclass(frozen=True)
class Probe:
    """One question. ``answers``: accepted answer words (a reply is right if it contains one as
    a whole word); empty means the honest reply is a decline. ``image``: None for text-only,
    a file name relative to the probe file, or a pocket-world scene (a dict)."""

    question: str
    answers: tuple[str, ...]
    skill: str
    image: str | dict | None = None

    @property
    def object_present(self) -> bool | None:
        """For an image question answered exactly "yes" or "no" (is there an X?), whether the
        object is in the image; None for every other probe. Probe sets ask these only about
        objects whose presence is known, which is what Object-Hallucination needs."""
        if self.image is None or self.answers not in (("yes",), ("no",)):
            return None
        return self.answers == ("yes",)


Probes = tuple[list[Probe], list[Probe], Path]  # text-only probes, image probes, the folder image files are relative to


def load_probes(path: Path) -> tuple[list[Probe], list[Probe]]:
    """(text-only probes, image probes) from a probe-set JSON file."""
    try:
        data = json.loads(path.read_text())
        text = [Probe(p["question"], tuple(p["answers"]), p.get("skill", "")) for p in data["text"]]
        visual = [Probe(p["question"], tuple(p["answers"]), p.get("skill", ""), p["image"]) for p in data.get("visual", [])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise FusionError(f"{path}: not a readable probe set ({type(err).__name__}: {err})") from None
    return text, visual


def preset_probes(preset: Preset, limit: int | None = None) -> Probes:
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


def probe_record(probe: Probe, probe_id: str, reply: str) -> dict[str, Any]:
    """One reply as the bench keeps it: the probe, the reply, whether it is right, and its
    labels. An image prompt is never Context-Hallucination; a yes/no object question tells
    ``detect`` whether the object is there, so that a "yes" to an absent one is labelled."""
    labels = [m.label for m in detect(reply, prompt_has_image=probe.image is not None, object_present=probe.object_present)]
    return {
        "probe": probe_id,
        "question": probe.question,
        "image": probe.image,
        "answers": list(probe.answers),
        "object_present": probe.object_present,
        "reply": reply,
        "correct": is_correct(reply, probe),
        "labels": labels,
    }


def rates(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The bench's rates over one model's records (fractions; None where no probe applies):
    accuracy per kind of probe, Context-Hallucination and Not-Known over text-only replies,
    Object-Hallucination over replies to questions about absent objects."""
    text = [r for r in records if r["image"] is None]
    visual = [r for r in records if r["image"] is not None]
    absent = [r for r in visual if r["object_present"] is False]
    return {
        "language_accuracy": _mean(r["correct"] for r in text),
        "visual_accuracy": _mean(r["correct"] for r in visual),
        "context_hallucination_rate": _mean("context_hallucination" in r["labels"] for r in text),
        "not_known_rate": _mean("not_known" in r["labels"] for r in text),
        "object_hallucination_rate": _mean("object_hallucination" in r["labels"] for r in absent),
    }


def _mean(flags: Any) -> float | None:
    values = list(flags)
    return sum(values) / len(values) if values else None


def score(model: ChatModel, probes: Probes, max_new_tokens: int = 24, progress: Progress | None = None) -> tuple[dict[str, float | None], list[dict]]:
    """The rates for one model, and its records. A text-only model gets the text probes only.
    ``progress`` hears after each batch, so a caller can show a long run moving."""
    text, visual, root = probes
    sets = [("text", text)] + ([("image", visual)] if model.multimodal else [])
    total, records = sum(len(s) for _, s in sets), []
    for kind, probe_set in sets:
        for start in range(0, len(probe_set), BATCH):
            batch = probe_set[start : start + BATCH]
            images = [probe_image(p, root) for p in batch] if kind == "image" else None
            replies = model.answer([p.question for p in batch], images, max_new_tokens=max_new_tokens)
            records += [probe_record(p, f"{kind}-{start + i}", r) for i, (p, r) in enumerate(zip(batch, replies))]
            if progress:
                progress(len(records), total)
    return rates(records), records


def bench_model(
    model: ChatModel, kind: str, label: str, probes: Probes, *, method: str | None = None, params: dict | None = None, progress: Progress | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One model's row of the bench (``kind``: base, tuned or fused) and its records, each
    tagged with the model, so that rows and replies of several models can go in one file."""
    model_rates, records = score(model, probes, progress=progress)
    tag = {"model": kind, "method": method, "label": label}
    return {**tag, "params": params, **model_rates}, [{**tag, **r} for r in records]


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
    probes = preset_probes(preset, limit)
    rows, records = [], []

    def add(kind: str, model: ChatModel, method: str | None = None, params: dict | None = None, label: str | None = None) -> None:
        row, replies = bench_model(model, kind, label or kind, probes, method=method, params=params)
        rows.append(row)
        records.extend(replies)
        log(f"{row['label']:<40} " + "  ".join(f"{k} {percent(row[k])}" for k in RATES))

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
    (out / "replies.jsonl").write_text(jsonl(records))
    bench_figure(rows, preset.name).savefig(out / "results.png")
    return rows


def spread(values: Sequence[float], points: int | None) -> Sequence[float]:
    """``points`` of a knob's ``values``, evenly spaced from the first to the last (both kept);
    all of them when ``points`` is None or not fewer."""
    if points is None or points >= len(values):
        return values
    if points < 2:
        raise FusionError(f"a sweep walks at least 2 points of each knob (its two ends), not {points}")
    return [values[round(i * (len(values) - 1) / (points - 1))] for i in range(points)]


def run_sweep(
    preset: Preset,
    methods: Sequence[str],
    out: Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    limit: int | None = None,
    points: int | None = None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Each method along its strength knob (SWEEPS); one trade-off plot of all of them.
    ``points`` walks only that many of each knob's values (see ``spread``): a quick look, since
    every point is a merge and a bench."""
    # every method and ``points`` checked before the minutes of scoring
    walks = [(method, knob, spread(values, points)) for method in methods for knob, values in SWEEPS[resolve(method).method]]
    rows = run_bench(preset, [], out, device=device, seed=seed, limit=limit, log=log)
    for method, knob, values in walks:
        walked = [(method, {knob: v}) for v in values]
        where = out / f"sweep-{method}-{knob}"
        for row in run_bench(preset, walked, where, include_base=False, include_tuned=False, device=device, seed=seed, limit=limit, log=log):
            rows.append({**row, "knob": knob, "value": row["params"][knob]})
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    tradeoff_figure(rows, preset.name).savefig(out / "sweep.png")
    return rows


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

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .controls import READS_IMAGES, blank_like, blind_guess, grounded, other_index
from .detectors import detect
from .errors import FusionError
from .inference import ChatModel
from .merge import fuse
from .output import write_whole
from .plots import bench_figure, save_figure, tradeoff_figure
from .presets import Preset
from .probes import Probe, Probes, is_correct, preset_probes, probe_image
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

Progress = Callable[[int, int], None]  # (replies given, replies to give) for one model


def probe_record(probe: Probe, probe_id: str, reply: str) -> dict[str, Any]:
    """One reply as the bench keeps it: the probe, the reply, whether it is right, and its
    labels. An image prompt is never Context-Hallucination; a yes/no object question tells
    ``detect`` whether the object is there, so that a "yes" to an absent one is labelled."""
    labels = [m.label for m in detect(reply, prompt_has_image=probe.image is not None, object_present=probe.object_present)]
    return {
        "probe": probe_id,
        "question": probe.question,
        "skill": probe.skill,
        "image": probe.image,
        "answers": list(probe.answers),
        "object_present": probe.object_present,
        "reply": reply,
        "correct": is_correct(reply, probe),
        "labels": labels,
    }


def with_controls(record: dict[str, Any], probe: Probe, blank: str, other: str | None, other_image: Any) -> dict[str, Any]:
    """An image probe's record with the replies to the same question over a blank image and
    over another probe's image, each scored against this probe's answers, and whether its
    answer is image-grounded (``fusion.controls.grounded``)."""
    record["blank"] = {"reply": blank, "correct": is_correct(blank, probe)}
    record["other"] = None if other is None else {"image": other_image, "reply": other, "correct": is_correct(other, probe)}
    record["grounded"] = grounded(record)
    return record


def rates(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The bench's rates over one model's records (fractions; None where no probe applies):
    accuracy per kind of probe and per image control, image-grounded accuracy,
    Context-Hallucination and Not-Known over text-only replies, Object-Hallucination over
    replies to questions about absent objects; the same per skill; and whether the model reads
    its images at all (None for a text-only model)."""
    text = [r for r in records if r["image"] is None]
    visual = [r for r in records if r["image"] is not None]
    absent = [r for r in visual if r["object_present"] is False]
    visual_rates = _visual_rates(visual)
    grounded_share = visual_rates["grounded_accuracy"]
    return {
        "language_accuracy": _mean(r["correct"] for r in text),
        **visual_rates,
        "context_hallucination_rate": _mean("context_hallucination" in r["labels"] for r in text),
        "not_known_rate": _mean("not_known" in r["labels"] for r in text),
        "object_hallucination_rate": _mean("object_hallucination" in r["labels"] for r in absent),
        "reads_images": None if grounded_share is None else grounded_share >= READS_IMAGES,
        "skills": {
            "language": {skill: _mean(r["correct"] for r in text if r["skill"] == skill) for skill in _skills(text)},
            "visual": {skill: _visual_rates([r for r in visual if r["skill"] == skill]) for skill in _skills(visual)},
        },
    }


def _visual_rates(visual: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    return {
        "visual_accuracy": _mean(r["correct"] for r in visual),
        "visual_blind_guess": blind_guess([(r["skill"], tuple(r["answers"])) for r in visual]) if visual else None,
        "visual_blank_accuracy": _mean(r["blank"]["correct"] for r in visual),
        "visual_other_accuracy": _mean(r["other"]["correct"] for r in visual if r["other"] is not None),
        "grounded_accuracy": _mean(r["grounded"] for r in visual),
    }


def _skills(records: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["skill"] for r in records))


def _mean(flags: Any) -> float | None:
    values = list(flags)
    return sum(values) / len(values) if values else None


def _ask(model: ChatModel, questions: Sequence[str], images: Sequence[Image.Image] | None, max_new_tokens: int, tick: Callable[[int], None]) -> list[str]:
    """The replies to ``questions`` (with ``images[i]``, or text only), in batches of BATCH."""
    said: list[str] = []
    for start in range(0, len(questions), BATCH):
        chunk = list(questions[start : start + BATCH])
        said += model.answer(chunk, None if images is None else list(images[start : start + BATCH]), max_new_tokens=max_new_tokens)
        tick(len(chunk))
    return said


def answer_count(probes: Probes, multimodal: bool) -> int:
    """How many replies ``score`` asks a model for: every text probe, and for an MLLM every
    image probe with its image, a blank one, and another probe's where there is one."""
    text, visual, _ = probes
    if not multimodal:
        return len(text)
    return len(text) + 2 * len(visual) + sum(other_index(visual, i) is not None for i in range(len(visual)))


def score(model: ChatModel, probes: Probes, max_new_tokens: int = 24, progress: Progress | None = None) -> tuple[dict[str, Any], list[dict]]:
    """The rates for one model, and its records. A text-only model gets the text probes only;
    an MLLM gets each image probe with its image, then with a blank one, then with another
    probe's (``fusion.controls``). ``progress`` hears after each batch, so a caller can show a
    long run moving."""
    text, visual, root = probes
    visual = visual if model.multimodal else []
    images = [probe_image(p, root) for p in visual]  # each image decoded once, shown three times
    others = [other_index(visual, i) for i in range(len(visual))]
    swapped = [i for i, j in enumerate(others) if j is not None]
    total, done = answer_count(probes, model.multimodal), 0

    def tick(count: int) -> None:
        nonlocal done
        done += count
        if progress:
            progress(done, total)

    said = _ask(model, [p.question for p in text], None, max_new_tokens, tick)
    records = [probe_record(p, f"text-{i}", r) for i, (p, r) in enumerate(zip(text, said))]
    if visual:
        questions = [p.question for p in visual]
        real = _ask(model, questions, images, max_new_tokens, tick)
        blank = _ask(model, questions, [blank_like(im) for im in images], max_new_tokens, tick)
        other = dict(zip(swapped, _ask(model, [questions[i] for i in swapped], [images[others[i]] for i in swapped], max_new_tokens, tick)))
        for i, p in enumerate(visual):
            j = others[i]
            records.append(with_controls(probe_record(p, f"image-{i}", real[i]), p, blank[i], other.get(i), None if j is None else visual[j].image))
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
    ``limit`` asks N text and N image probes drawn across the skills (a quick look that still
    covers every skill; ``fusion.probes.stratified``)."""
    probes = preset_probes(preset, limit, limit)
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
    write_whole(out / "results.json", json.dumps(rows, indent=2) + "\n")
    write_whole(out / "results.md", markdown_table(rows))
    write_whole(out / "replies.jsonl", jsonl(records))
    save_figure(bench_figure(rows, preset.name), out / "results.png")
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
    write_whole(out / "sweep.json", json.dumps(rows, indent=2) + "\n")
    save_figure(tradeoff_figure(rows, preset.name), out / "sweep.png")
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

"""The library's figures, drawn on matplotlib's object-oriented ``Figure`` (no pyplot, no
global state: safe in a server's threads). Where visual tuning changed the language model,
from a Neuron-Locate report (``fuse(...).report`` or ``inspect_pair(...)["kinds"]``): the app's
Fusion tab and ``python -m fusion inspect --plot`` draw the same ones. The behaviour bench's
rates and a sweep's trade-off, from ``fusion.evaluate``'s rows: ``python -m fusion eval`` and
the app's Behaviour tab."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .output import write_whole
from .report import RATES


def save_figure(figure: Figure, path: str | Path) -> None:
    """``figure`` written whole to ``path`` in the format its suffix names (``write_whole``)."""
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip(".").lower() or "png")
    write_whole(path, buffer.getvalue())

def _empty(message: str) -> Figure:
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.subplots()
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    return fig


def curve_figure(report: Sequence[dict[str, Any]]) -> Figure:
    """Each layer and neuron kind's change scores, sorted, on log-log axes: a power law shows
    as a straight line, and the located few are the steep head."""
    if not report:
        return _empty("This method does not locate neurons: no change scores to show.")
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    kinds = list(dict.fromkeys(r["kind"] for r in report))
    colours = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    for r in report:
        points = [(rank, s) for rank, s in r["curve"] if s > 0]
        if points:
            ax.plot(*zip(*points), color=colours[r["kind"]], alpha=0.6, lw=1)
    for k in kinds:
        ax.plot([], [], color=colours[k], label=k)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("neuron rank (by change)")
    ax.set_ylabel("change score")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def located_figure(report: Sequence[dict[str, Any]]) -> Figure:
    """Per layer, how many neurons of each kind were located (kept at their tuned values);
    kinds outside the layers (embeddings, final norm, lm_head) stand at the right."""
    if not report:
        return _empty("This method does not locate neurons.")
    layers = sorted({r["layer"] for r in report if r["layer"] is not None})
    slots = [str(layer) for layer in layers] + (["other"] if any(r["layer"] is None for r in report) else [])
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    bottom = [0] * len(slots)
    for kind in dict.fromkeys(r["kind"] for r in report):
        heights = [0] * len(slots)
        for r in report:
            if r["kind"] == kind:
                heights[slots.index("other" if r["layer"] is None else str(r["layer"]))] += r["located"]
        ax.bar(slots, heights, bottom=bottom, label=kind)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons located")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _stacked(name: str) -> str:
    """A rate's name one word a line (hyphenated words split after the hyphen), so that eight
    names fit under their bar groups without running into each other."""
    return name.replace("-", "-\n").replace(" ", "\n")


def bench_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """The behaviour bench's rates, one group of bars per rate and one bar per model, each with
    its value. A rate that does not apply to a model (None) gets no bar, rather than a bar at
    zero. Over the visual groups a dotted line marks what a blind guess scores, the level a
    model that does not look reaches with any image."""
    fig = Figure(figsize=(12, 4.4), dpi=110)
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        shown = [(x, 100 * row[key]) for x, key in enumerate(RATES) if row[key] is not None]
        bars = ax.bar([x + i * width for x, _ in shown], [v for _, v in shown], width, label=row["label"])
        ax.bar_label(bars, fmt="%.0f", fontsize=6)  # so that a rate of 0 reads as 0, not as missing
    guess = next((r["visual_blind_guess"] for r in rows if r.get("visual_blind_guess") is not None), None)
    if guess is not None:
        keys = list(RATES)
        lo, hi = keys.index("visual_accuracy") - 0.1, keys.index("visual_other_accuracy") + 0.9
        ax.plot([lo, hi], [100 * guess] * 2, ":", color="black", lw=1.2, label="blind guess")
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(RATES))], [_stacked(name) for name in RATES.values()], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 112)  # room for the labels of bars at 100
    ax.set_title(f"Behaviour bench: {title}")
    ax.legend(fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def tradeoff_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """A sweep's language accuracy against image-grounded accuracy (the visual skill that
    needs the picture; ``fusion.controls``): one line per method and knob, the tuned model as
    a star, the base's language accuracy as a dashed line (what fusion aims back at)."""
    fig = Figure(figsize=(7, 5.2), dpi=110)
    ax = fig.subplots()
    for method, knob in dict.fromkeys((r["method"], r["knob"]) for r in rows if r["model"] == "fused"):
        pts = sorted((r for r in rows if r["method"] == method and r["knob"] == knob), key=lambda r: r["value"])
        ax.plot([100 * r["grounded_accuracy"] for r in pts], [100 * r["language_accuracy"] for r in pts], "o-", label=f"{method} ({knob})", markersize=4)
    for r in rows:
        if r["model"] == "tuned":
            ax.plot(100 * r["grounded_accuracy"], 100 * r["language_accuracy"], "k*", markersize=12, label="tuned")
        if r["model"] == "base":
            ax.axhline(100 * r["language_accuracy"], color="grey", ls="--", lw=1, label="base language accuracy")
    ax.set_xlabel("image-grounded visual accuracy (%)")
    ax.set_ylabel("language accuracy (%)")
    ax.set_ylim(-3, 105)
    ax.set_title(f"Language vs visual trade-off: {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

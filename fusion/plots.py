"""Figures of where visual tuning changed the language model, from a Neuron-Locate report
(``fuse(...).report`` or ``inspect_pair(...)["kinds"]``): the app's Fusion tab and
``python -m fusion inspect --plot`` draw the same ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure


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

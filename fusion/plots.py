"""The library's figures, drawn on matplotlib's object-oriented ``Figure`` (no pyplot, no
global state: safe in a server's threads). Where visual tuning changed the language model,
from a Neuron-Locate report (``fuse(...).report`` or ``inspect_pair(...)["kinds"]``): the app's
Fusion tab and ``python -m fusion inspect --plot`` draw the same ones. The behaviour bench's
rates and a sweep's trade-off, from ``fusion.evaluate``'s rows: ``python -m fusion eval`` and
the app's Behaviour tab."""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .output import write_whole
from .report import RATES, located_share


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


# One colour per neuron kind, the same in every figure (app and CLI); a kind not named here
# (another family's) gets one from the palette by its name, so it too keeps it everywhere.
KIND_COLOURS = {
    "ffn": "#d62728",
    "attn_q": "#1f77b4",
    "attn_k": "#17becf",
    "attn_v": "#9467bd",
    "attn_o": "#8c564b",
    "input_layernorm": "#2ca02c",
    "post_attention_layernorm": "#bcbd22",
    "embed_tokens": "#ff7f0e",
    "lm_head": "#e377c2",
    "norm": "#7f7f7f",
}
_PALETTE = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")


def kind_colour(kind: str) -> str:
    return KIND_COLOURS.get(kind) or _PALETTE[zlib.crc32(kind.encode()) % len(_PALETTE)]


def _share_line(report: Sequence[dict[str, Any]]) -> str:
    layers = [r for r in report if r["layer"] is not None]
    inside = f"{100 * located_share(layers):.1f}% of the squared change inside the layers, " if layers else ""
    return f"the located neurons hold {inside}{100 * located_share(report):.1f}% overall"


def curve_figure(report: Sequence[dict[str, Any]], top_ratio: float | None = None, note: str = "") -> Figure:
    """Each layer and kind's change scores, sorted, against the rank as a share of the kind's
    neurons, on log-log axes: a power law shows as a straight line, and ``top_ratio`` (the
    located share, marked) cuts off the steep head in every curve at once. The title says how
    much of the change the located neurons hold: the heavy tail the method relies on; ``note``
    goes above it."""
    if not report:
        return _empty("No neurons to show: the pair's change report is empty.")
    fig = Figure(figsize=(8.6, 4.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    for r in report:
        points = [(rank / r["neurons"], s) for rank, s in r["curve"] if s > 0]
        if points:
            ax.plot(*zip(*points), color=kind_colour(r["kind"]), alpha=0.6, lw=1)
    for kind in dict.fromkeys(r["kind"] for r in report):
        ax.plot([], [], color=kind_colour(kind), label=kind)
    if top_ratio:
        ax.axvline(top_ratio, color="black", ls="--", lw=1.2, label=f"cut-off: top {100 * top_ratio:g}% located")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("neuron rank by change, as a share of its layer and kind")
    ax.set_ylabel("change score")
    lines = ["Where tuning changed the language model: each layer and kind's neurons, sorted by change", note, _share_line(report).capitalize()]
    ax.set_title("\n".join(filter(None, lines)), fontsize=9)
    fig.legend(fontsize=7, loc="outside right upper")  # beside the axes, never over the curves; the layout makes room
    return fig


def share_figure(report: Sequence[dict[str, Any]]) -> Figure:
    """Where the located neurons matter: per layer (columns) and kind (rows), the share of
    that cell's squared change its located neurons hold, as a heat map with the value in each
    cell. Kinds outside the layers (embeddings, final norm, lm_head) stand in the last column.
    A cell where the kind has no neurons is left blank."""
    if not report:
        return _empty("No neurons to show: the pair's change report is empty.")
    layers = sorted({r["layer"] for r in report if r["layer"] is not None})
    columns = [str(layer) for layer in layers] + (["outside"] if any(r["layer"] is None for r in report) else [])
    kinds = list(dict.fromkeys(r["kind"] for r in report))
    grid = np.full((len(kinds), len(columns)), np.nan)
    for r in report:
        column = columns.index("outside" if r["layer"] is None else str(r["layer"]))
        if r["sum_sq"] > 0:
            grid[kinds.index(r["kind"]), column] = r["located_sum_sq"] / r["sum_sq"]
    fig = Figure(figsize=(8.6, 1.4 + 0.36 * len(kinds)), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (row, column), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    for label in ax.get_yticklabels():
        label.set_color(kind_colour(label.get_text()))
    ax.set_xlabel("layer")
    ax.set_title("Share (%) of each layer and kind's squared change held by its located neurons", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.01, format=PercentFormatter(1.0))
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


def tradeoff_figure(rows: Sequence[dict[str, Any]], title: str, marked: Sequence[dict[str, Any]] = ()) -> Figure:
    """A sweep's language accuracy against image-grounded accuracy (the visual skill that
    needs the picture; ``fusion.controls``): one line per method and knob, the tuned model as
    a star, the base's language accuracy as a dashed line (what fusion aims back at).
    ``marked``: bench rows drawn over it as large points with their labels (the app's
    Behaviour run: the tuned model and the visitor's variant as this run measured them)."""
    fig = Figure(figsize=(9.5, 5.2), dpi=110, layout="constrained")
    ax = fig.subplots()
    for method, knob in dict.fromkeys((r["method"], r["knob"]) for r in rows if r["model"] == "fused"):
        pts = sorted((r for r in rows if r["method"] == method and r["knob"] == knob), key=lambda r: r["value"])
        ax.plot([100 * r["grounded_accuracy"] for r in pts], [100 * r["language_accuracy"] for r in pts], "o-", label=f"{method} ({knob})", markersize=4)
    for r in rows:
        if r["model"] == "tuned":
            ax.plot(100 * r["grounded_accuracy"], 100 * r["language_accuracy"], "k*", markersize=12, label="tuned")
        if r["model"] == "base":
            ax.axhline(100 * r["language_accuracy"], color="grey", ls="--", lw=1, label="base language accuracy")
    for row, marker in zip(marked, ("^", "D", "s", "P")):
        if row.get("grounded_accuracy") is not None:
            ax.plot(100 * row["grounded_accuracy"], 100 * row["language_accuracy"], marker, markersize=11, mec="black", label=row["label"])
    ax.set_xlabel("image-grounded visual accuracy (%)")
    ax.set_ylabel("language accuracy (%)")
    ax.set_ylim(-3, 105)
    ax.set_title(f"Language vs image-grounded accuracy: {title}", fontsize=10)
    fig.legend(fontsize=7, loc="outside right upper")  # beside the axes, never over the points; the layout makes room
    return fig


def benchmark_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """The harnesses' scores: language mean against visual mean, a point per model, where both
    are there (the paper's trade-off), the base LLM's language mean as a dashed line; else the
    language mean of each model as a bar."""
    fig = Figure(figsize=(8, 4.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    both = [r for r in rows if r.get("language_mean") is not None and r.get("visual_mean") is not None]
    if both:
        for r in both:
            ax.plot(100 * r["visual_mean"], 100 * r["language_mean"], "o", markersize=8, label=r["label"])
        for r in rows:  # a text-only model (the base LLM): its language mean, as a line to aim back at
            if r.get("language_mean") is not None and r.get("visual_mean") is None:
                ax.axhline(100 * r["language_mean"], color="grey", ls="--", lw=1, label=f"{r['label']} (language only)")
        ax.set_xlabel("visual mean (%)")
        ax.set_ylabel("language mean (%)")
        fig.legend(fontsize=7, loc="outside right upper")
    else:
        shown = [r for r in rows if r.get("language_mean") is not None]
        bars = ax.bar([r["label"] for r in shown], [100 * r["language_mean"] for r in shown], color=[f"C{i}" for i in range(len(shown))])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_ylabel("language mean (%)")
        ax.set_ylim(0, 108)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    ax.set_title(f"Standard benchmarks: {title}", fontsize=10)
    return fig

"""The Behaviour tab's logic: the preset's probe set asked to the base LLM, the original MLLM and
its fused model, with progress a visitor can watch, the rates as a table and a chart, every
probe with the three replies side by side, and those replies as a file to download.

The scoring is the library's bench (``fusion.evaluate``), so the tab and ``python -m fusion
eval`` measure the same thing the same way.
"""

from __future__ import annotations

import math
import numbers
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from fusion.evaluate import answer_count, bench_model
from fusion.inference import ChatModel
from fusion.plots import bench_figure, tradeoff_figure
from fusion.presets import Preset, preset_sweep
from fusion.probes import preset_probes
from fusion.report import jsonl, markdown_table, per_probe_table

from . import StudioError
from .view import titles
from .zerogpu import bench_caps, on_zero_gpu

if TYPE_CHECKING:
    from .variants import Pair, Variant

BenchProgress = Callable[[float, str], None]  # (share of the whole run done, a line saying where it is)
REPLIES_DIR = Path(tempfile.gettempdir()) / "nf-behaviour"  # the runs' reply files, one folder each
KEPT_RUNS = 32


@dataclass(frozen=True)
class BehaviourRun:
    """What one run of the tab shows."""

    rows: list[dict[str, Any]]  # the rates, one row per model: base, tuned, fused
    records: list[dict[str, Any]]  # one per model and probe: the reply, whether it is right, its labels
    table: str  # the rates as Markdown
    probes: dict[str, list]  # the per-probe table, {"headers", "data"}
    chart: Figure
    tradeoff: Figure  # language vs image-grounded accuracy, among the preset's sweep
    replies: Path  # the records as JSON lines, to download


def probe_counts(preset: Preset) -> tuple[int, int]:
    """The most text and image probes one run may ask: all the preset has, or on ZeroGPU as
    many as fit in one GPU call (``studio.zerogpu.bench_caps``)."""
    text, visual, _ = preset_probes(preset)
    if on_zero_gpu():
        most_text, most_visual = bench_caps()
        return min(len(text), most_text), min(len(visual), most_visual)
    return len(text), len(visual)


def check_limit(value: Any, preset: Preset, kind: str) -> int:
    """``value`` as the number of ``kind`` ("text" or "image") probes to ask, or a
    StudioError naming it. It comes from a client, which may send anything: a string, NaN,
    1e9, a fraction."""
    most = dict(zip(("text", "image"), probe_counts(preset)))[kind]
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    if not (math.isfinite(number) and number.is_integer() and 1 <= number <= most):
        raise StudioError(f"The number of {kind} probes must be a whole number from 1 to {most}, not {str(value)[:40]!r}.")
    return int(number)


def _share(progress: BenchProgress, start: int, whole: int, label: str) -> Callable[[int, int], None]:
    """One model's progress (probes it answered, of its own) as a share of the whole run, with a
    line naming it: "replies 12/40 · LLaVA-1.5 (original)"."""

    def report(done: int, total: int) -> None:
        progress((start + done) / whole, f"replies {done}/{total} · {label}")

    return report


def reply_file(name: str) -> Path:
    """A new path ``name`` for one run's replies (the page offers it for download; Gradio
    copies it into its own cache, which it cleans), in a folder of its own under
    ``REPLIES_DIR``. Only the newest ``KEPT_RUNS`` folders are kept, so runs do not fill the
    disk, and a crashed process's leftovers go with the next runs."""
    REPLIES_DIR.mkdir(parents=True, exist_ok=True)
    folders = []
    for folder in REPLIES_DIR.iterdir():
        try:
            folders.append((folder.stat().st_mtime_ns, folder))
        except FileNotFoundError:  # removed by a run in another thread
            continue
    for _, old in sorted(folders)[: max(0, len(folders) - KEPT_RUNS + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=REPLIES_DIR)) / name


def run_behaviour(pair: Pair, variant: Variant, base: ChatModel, text: Any, visual: Any, progress: BenchProgress | None = None) -> BehaviourRun:
    """``text`` text-only and ``visual`` image probes of the pair's preset, drawn across the
    skills with a fixed seed (the same probes every run), asked to ``base`` (text only: it
    cannot see images), the original MLLM and the visitor's fused ``variant``."""
    probes = preset_probes(pair.preset, check_limit(text, pair.preset, "text"), check_limit(visual, pair.preset, "image"))
    original_title, fused_title, base_title = titles(pair.preset, variant.name, variant.record.get("params"))
    models = [
        ("base", base, None, None, base_title),
        ("tuned", pair.original, None, None, original_title),
        ("fused", variant.model, variant.name, variant.record.get("params"), fused_title),
    ]
    sizes = [answer_count(probes, model.multimodal) for _, model, *_ in models]
    rows, records = [], []
    for (kind, model, method, params, label), start in zip(models, accumulate([0, *sizes])):
        report = _share(progress, start, sum(sizes), label) if progress else None
        row, replies = bench_model(model, kind, label, probes, method=method, params=params, progress=report)
        rows.append(row)
        records += replies
    path = reply_file(f"behaviour-{pair.preset.name}.jsonl")
    path.with_suffix(".part").write_text(jsonl(records))
    path.with_suffix(".part").replace(path)  # whole or not at all
    counts = f"{len(probes[0])} text and {len(probes[1])} image probes"
    return BehaviourRun(
        rows, records, markdown_table(rows), per_probe_table(records), bench_figure(rows, pair.preset.name), tradeoff(pair.preset, rows[1:], counts), path
    )


def tradeoff(preset: Preset, measured: list[dict[str, Any]], counts: str) -> Figure:
    """Language against image-grounded accuracy: the tuned model and the visitor's variant as
    measured in this run, among the preset's shipped sweep (the base, the tuned model and
    each method along its strength knob, on the whole probe set: ``python -m fusion eval
    --sweep``), or alone where the preset ships none."""
    sweep = preset_sweep(preset)
    title = preset.name if sweep else f"{preset.name} (no sweep shipped: python -m fusion eval --preset {preset.name} --sweep)"
    return tradeoff_figure(sweep or [], title, marked=[{**row, "label": f"{row['label']} (this run: {counts})"} for row in measured])

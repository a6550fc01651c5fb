"""Standard benchmarks through the field's own harnesses (``neuron-fusion benchmark``): the base
LLM, the tuned MLLM and each fused variant; the language tasks through lm-evaluation-harness
(``lm-eval``) on each model's language model (``fusion.export``), the visual ones through
lmms-eval on the MLLMs (the base LLM sees no images); every score collected into one table
like the paper's.

Each harness runs as its own process (``python -m lm_eval``, ``python -m lmms_eval``, or under
``accelerate launch`` for several GPUs), so that its output is kept as it wrote it
(``raw/<harness>/<model>/``), a failure of one model is one line naming it, and lmms-eval may
live in an environment of its own (it pins its own torch): ``--lmms-python``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FusionError
from .output import write_whole
from .presets import Preset

SUITES = Path(__file__).resolve().parent / "suites"
# The metric a task reports, in order of preference (lm-eval's "name,filter" keys).
METRICS = ("acc,none", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match,none", "mc2,none", "acc_norm,none")


@dataclass(frozen=True)
class Suite:
    """Tasks to run: ``language`` through lm-eval, ``visual`` through lmms-eval; ``include``: a
    folder of task files of the user's own (lm-eval's ``--include_path``)."""

    language: tuple[str, ...]
    visual: tuple[str, ...] = ()
    include: Path | None = None


def load_suite(name: str) -> Suite:
    """A suite by name (a file in ``fusion/suites``: ``paper``) or by the path of a JSON file
    ``{"language": [...], "visual": [...], "include": "folder"}``."""
    path = SUITES / f"{name}.json" if (SUITES / f"{name}.json").is_file() else Path(name)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        known = ", ".join(sorted(p.stem for p in SUITES.glob("*.json")))
        raise FusionError(f"--suite {name}: not a suite name ({known}) nor a readable JSON file ({type(err).__name__})") from None
    lists = {key: data.get(key, []) for key in ("language", "visual")}
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(t, str) for t in v) for v in lists.values()):
        raise FusionError(f"{path}: a suite is a JSON object with 'language' and 'visual' lists of task names")
    include = data.get("include")
    return Suite(tuple(lists["language"]), tuple(lists["visual"]), (path.parent / include).resolve() if isinstance(include, str) else None)


def check_language_tasks(tasks: tuple[str, ...], include: Path | None) -> None:
    """lm-eval installed, and every task one it knows: checked before any model is made."""
    if importlib.util.find_spec("lm_eval") is None:
        raise FusionError("the language tasks need lm-evaluation-harness, which is not installed: pip install '.[eval]' (or pip install lm-eval)")
    from lm_eval import __version__ as version
    from lm_eval.tasks import TaskManager

    known = set(TaskManager(include_path=str(include) if include else None).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise FusionError(f"lm-eval {version} knows no task {', '.join(map(repr, unknown))}; see `lm_eval --tasks list`, or add a folder of task files with 'include'")


def primary_score(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """The metric a task's results are read by (``METRICS``), and its value."""
    for key in (*METRICS, *sorted(k for k in metrics if "stderr" not in k)):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return key.split(",")[0], float(value)
    return None


def _harness(command: list[str], raw: Path, harness: str, model: Path | str) -> dict[str, Any]:
    """Run one harness process, keep its log in ``raw``, and return the ``results`` of the
    newest results file it wrote there; a failure is one line naming the model."""
    raw.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, capture_output=True, text=True)
    write_whole(raw / "log.txt", f"$ {' '.join(command)}\n\n{done.stdout}\n{done.stderr}")
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    # the harness's own words: its last error line (lmms-eval may exit 0 after one), else its last line
    said = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no message")[:300]
    if done.returncode != 0:
        raise FusionError(f"{harness} could not evaluate {model}: {said} (the whole log: {raw / 'log.txt'})")
    results = sorted((p for p in raw.rglob("*results*.json") if p.is_file()), key=lambda p: p.stat().st_mtime)
    if not results:
        raise FusionError(f"{harness} wrote no results for {model}: {said} (the whole log: {raw / 'log.txt'})")
    return json.loads(results[-1].read_text())["results"]


def _scores(results: dict[str, Any], tasks: tuple[str, ...]) -> dict[str, tuple[str, float]]:
    return {task: found for task in tasks if (found := primary_score(results.get(task, {}))) is not None}


def _launch(python: str, launcher: str) -> list[str]:
    """How a harness module is started: by ``python``, under ``accelerate launch`` (one process
    per GPU) when asked."""
    return [python, "-m", "accelerate.commands.launch"] if launcher == "accelerate" else [python]


def run_lm_eval(
    model: Path, tasks: tuple[str, ...], raw: Path, *, include: Path | None, limit: int | None, device: str, batch_size: str, launcher: str, backend: str
) -> dict[str, tuple[str, float]]:
    """One model's language tasks in lm-eval's own process; its output stays in ``raw``.
    Returns each task's primary metric and score."""
    command = [*_launch(sys.executable, launcher), "-m", "lm_eval", "--model", backend, "--model_args", f"pretrained={model}", "--tasks", ",".join(tasks)]
    command += ["--device", device, "--batch_size", batch_size, "--output_path", str(raw)]
    command += ["--limit", str(limit)] if limit else []
    command += ["--include_path", str(include)] if include else []
    return _scores(_harness(command, raw, "lm-eval", model), tasks)


# lmms-eval's model for each MLLM type (its ``llava_hf`` loads the transformers LLaVA classes;
# Qwen2.5-VL has one of its own).
LMMS_MODELS = {"llava": "llava_hf", "llava_next": "llava_hf", "llava_onevision": "llava_hf", "qwen2_5_vl": "qwen2_5_vl"}


def lmms_model(model_type: str | None) -> str:
    """lmms-eval's model name for an MLLM's config ``model_type``."""
    if model_type not in LMMS_MODELS:
        raise FusionError(f"lmms-eval runs {', '.join(sorted(LMMS_MODELS))} models here, not '{model_type}'")
    return LMMS_MODELS[model_type]


def run_lmms_eval(
    python: str, model: Path | str, tasks: tuple[str, ...], raw: Path, *, include: Path | None, limit: int | None, device: str, launcher: str, kind: str = "llava_hf"
) -> dict[str, tuple[str, float]]:
    """One MLLM's visual tasks in lmms-eval's own process (``python``: the interpreter of the
    environment lmms-eval is installed in), through its model ``kind`` (``lmms_model``)."""
    # device_map named too: transformers 5 refuses the empty one lmms-eval passes by default
    command = [*_launch(python, launcher), "-m", "lmms_eval", "--model", kind, "--model_args", f"pretrained={model},device={device},device_map={device}"]
    command += ["--tasks", ",".join(tasks), "--batch_size", "1", "--output_path", str(raw), "--log_samples"]  # llava_hf takes batches of 1 only
    command += ["--limit", str(limit)] if limit else []
    command += ["--include_path", str(include)] if include else []
    return _scores(_harness(command, raw, "lmms-eval", model), tasks)


def check_visual_harness(python: str) -> None:
    """lmms-eval importable by ``python``: checked before any model is made."""
    try:
        found = subprocess.run([python, "-c", "import lmms_eval"], capture_output=True, text=True).returncode == 0
    except OSError:  # no such interpreter
        found = False
    if not found:
        raise FusionError(
            f"the visual tasks need lmms-eval, which {python} cannot import. It pins its own torch, so give it an environment: "
            "python -m venv ~/.venvs/lmms && ~/.venvs/lmms/bin/pip install torch==<this torch> lmms-eval, then --lmms-python ~/.venvs/lmms/bin/python"
        )


def table(rows: list[dict[str, Any]], suite: Suite) -> str:
    """The paper's kind of table: a row per model, a column per task, the language and visual
    means and the overall mean; "—" where there is no score (the base LLM's visual ones)."""
    tasks = [*suite.language, *suite.visual]
    lines = ["| model | " + " | ".join(tasks) + " | language mean | visual mean | overall |", "|---|" + "---:|" * (len(tasks) + 3)]
    for row in rows:
        cells = [f"{100 * row['scores'][t]:.1f}" if t in row["scores"] else "—" for t in tasks]
        means = [row[k] for k in ("language_mean", "visual_mean", "overall")]
        lines.append(f"| {row['label']} | " + " | ".join([*cells, *("—" if m is None else f"{100 * m:.1f}" for m in means)]) + " |")
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_benchmark(
    preset: Preset,
    methods: list[tuple[str, dict[str, Any]]],
    out: Path,
    suite: Suite,
    *,
    limit: int | None = None,
    device: str = "cpu",
    batch_size: str = "auto",
    launcher: str = "python",
    backend: str = "hf",
    lmms_python: str | None = None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """The base, the tuned model and each fused variant (merged into the cache unless there),
    each language model exported once (``out/models``), then lm-eval on each; writes
    ``results.json``, ``results.md`` and ``results.png`` under ``out``."""
    from .checkpoint import open_checkpoint
    from .export import export_language_model
    from .merge import fuse
    from .plots import benchmark_figure, save_figure

    if suite.language:
        check_language_tasks(suite.language, suite.include)
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise FusionError("--backend vllm: vLLM is not installed here (pip install vllm, on a CUDA machine)")
    lmms = lmms_python or sys.executable
    if suite.visual:
        check_visual_harness(lmms)
    base = open_checkpoint(preset.base).directory
    tuned = open_checkpoint(preset.tuned)  # once: its directory for every run, its config for lmms-eval's model
    visual_model = lmms_model(tuned.config.get("model_type")) if suite.visual else ""
    models = [("base", None, {}, base), ("tuned", None, {}, None)] + [("fused", m, p, None) for m, p in methods]
    rows = []
    common = {"include": suite.include, "limit": limit, "device": device, "launcher": launcher}
    for kind, method, params, path in models:
        label = kind if method is None else f"{method}" + "".join(f" {k}={v}" for k, v in params.items())
        name = label.replace(" ", "_").replace("=", "-")
        mllm = None
        if path is None:
            where = "cuda" if device.startswith("cuda") else "cpu"  # lm-eval's cuda:0 is the merge's cuda
            mllm = tuned.directory if method is None else fuse(preset.tuned, preset.base, method, params, device=where).path
            path = export_language_model(str(mllm), out / "models" / f"{name}-lm", base_ref=preset.base).path
        scores: dict[str, tuple[str, float]] = {}
        if suite.language:
            log(f"[benchmark] {label}: lm-eval on {', '.join(suite.language)}")
            scores |= run_lm_eval(path, suite.language, out / "raw" / "lm-eval" / name, batch_size=batch_size, backend=backend, **common)
        if suite.visual and mllm is not None:  # the base LLM sees no images
            log(f"[benchmark] {label}: lmms-eval on {', '.join(suite.visual)}")
            scores |= run_lmms_eval(lmms, mllm, suite.visual, out / "raw" / "lmms-eval" / name, kind=visual_model, **common)
        language = _mean([s for t, (_, s) in scores.items() if t in suite.language])
        visual = _mean([s for t, (_, s) in scores.items() if t in suite.visual])
        rows.append(
            {
                "model": kind,
                "method": method,
                "params": params,
                "label": label,
                "scores": {t: s for t, (_, s) in scores.items()},
                "metrics": {t: m for t, (m, _) in scores.items()},
                "language_mean": language,
                "visual_mean": visual,
                "overall": _mean([s for _, s in scores.values()]),
            }
        )
    write_whole(out / "results.json", json.dumps(rows, indent=2) + "\n")
    write_whole(out / "results.md", table(rows, suite))
    save_figure(benchmark_figure(rows, preset.name), out / "results.png")
    return rows

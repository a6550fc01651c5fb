"""benchmarks/gpu.sh, the one script a lent GPU machine runs, in its dry run: every step (its own
full-size-shaped replica, merges on the CPU and the GPU, fp16 and 4-bit loads with an in-memory
variant, generation) at a small size, on whatever this machine has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT


def test_gpu_script_dry_run_runs_every_step_and_renders_its_json(tmp_path: Path) -> None:
    run = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["dry_run"] and result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result["size"]["layers"] == 2 and result["merge_cpu_s"] > 0 and result["merge_gpu_s"] > 0
    for key in ("fp16", "4bit"):
        assert result[key]["load_s"] > 0 and result[key]["variant_build_s"] > 0 and result[key]["tokens_per_s"] > 0
    assert not (tmp_path / "work").exists(), "the replica is removed after the run"
    rendered = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--render", str(tmp_path / "gpu.json")], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert rendered in run.stdout and "| merge on the CPU (neu-p-taska, written to disk) |" in rendered and "4-bit nf4: generation" in rendered

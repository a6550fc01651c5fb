"""Resident memory of the running app, with and without ``--4bit``.

    python benchmarks/app_memory.py [--preset pocket] [--runs 3]

Starts ``python app.py`` (as the tests do: loopback port, fresh fusion cache), waits until both
models are loaded, asks one text question so that generation buffers exist, and reads the
process's VmRSS (all resident memory) and RssAnon (memory not backed by files: what 4-bit can
shrink) from /proc. Prints the median of ``--runs`` starts per setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import running_app  # noqa: E402


def resident_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def measure(preset: str, args: list[str]) -> dict[str, float]:
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as tmp, running_app(Path(tmp), preset, args) as app:
        Client(app.url, verbose=False).predict("What is the capital of France?", api_name="/compare_text")
        return {**resident_mib(app.pid), "ready_s": app.ready_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pocket")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"| {args.preset} | VmRSS MiB | RssAnon MiB | ready s |\n|---|---:|---:|---:|")
    for label, flags in (("full precision", []), ("--4bit (nf4)", ["--4bit"])):
        runs = [measure(args.preset, flags) for _ in range(args.runs)]
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {label} | {median['VmRSS']:.0f} | {median['RssAnon']:.0f} | {median['ready_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

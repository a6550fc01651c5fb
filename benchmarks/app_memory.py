"""Resident memory of the running app, with and without ``--4bit``.

    python benchmarks/app_memory.py [--preset pocket] [--runs 3]
    python benchmarks/app_memory.py --model DIR        # one MLLM alone, e.g. a larger generated one

Starts ``python app.py`` (as the tests do: loopback port, fresh fusion cache), waits until both
models are loaded, asks one text question so that generation buffers exist, and reads the
process's VmRSS (all resident memory) and RssAnon (memory not backed by files: what 4-bit can
shrink) from /proc. Prints the median of ``--runs`` starts per setting. ``--model DIR`` loads one
LLaVA-style model in a fresh process instead (``fusion.inference.ChatModel``) and has it answer
once (memory-mapped weights count once touched), where the weights are large enough for 4-bit
to show (pocket's are 7 MB).
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


LOAD_ONE = """
import json, sys
sys.path.insert(0, {root!r})
from fusion.inference import ChatModel
model = ChatModel.load({model!r}, True, load_4bit={four!r})
model.answer(["What is the capital of France?"], max_new_tokens=2)  # every weight is touched, as in use
print(json.dumps({{k: v for k, v in __import__("benchmarks.app_memory", fromlist=["x"]).resident_mib(__import__("os").getpid()).items()}}))
"""


def measure_model(model: Path, four: bool) -> dict[str, float]:
    import json
    import subprocess

    code = LOAD_ONE.format(root=str(ROOT), model=str(model), four=four)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "ready_s": float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pocket")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", type=Path, help="measure loading this one MLLM directory instead of the app")
    args = parser.parse_args(argv)
    print(f"| {args.model.name if args.model else args.preset} | VmRSS MiB | RssAnon MiB | ready s |\n|---|---:|---:|---:|")
    for label, flags in (("full precision", []), ("--4bit (nf4)", ["--4bit"])):
        if args.model:
            runs = [measure_model(args.model, bool(flags)) for _ in range(args.runs)]
        else:
            runs = [measure(args.preset, flags) for _ in range(args.runs)]
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {label} | {median['VmRSS']:.0f} | {median['RssAnon']:.0f} | {median['ready_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

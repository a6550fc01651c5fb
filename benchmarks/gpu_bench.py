"""The full-size figures a lent GPU machine gives: merge on the GPU against the CPU on
LLaVA-1.5-7B's shapes, the app's in-memory variant build, fp16 and 4-bit loading, tokens per
second and peak GPU memory. Run through ``benchmarks/gpu.sh`` (which installs carried wheels).

    python benchmarks/gpu_bench.py --out gpu.json              # on the GPU machine, ~6 minutes
    python benchmarks/gpu_bench.py --dry-run --out gpu.json    # every step at a small size, on any machine
    python benchmarks/gpu_bench.py --render gpu.json           # the figures as the Markdown table of RESULTS.md

It needs no network and no gradio: it writes its own full-size replica (``fullsize.py``) and
loads it with the library. Without CUDA (a dry run here) the GPU steps run on the CPU and the
JSON says so; a dry run is for checking that every step works, not for its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_merge import SIZES, own_seconds  # noqa: E402
from fullsize import write_full_replica  # noqa: E402

TUNED, BASE = "llava-hf/llava-1.5-7b-hf", "lmsys/vicuna-7b-v1.5"
# a dry run: LLaVA-1.5-7B's tensor names, vision tower and vocabulary, two narrow decoder layers
DRY_SIZE = {"hidden": 512, "intermediate": 1024, "layers": 2, "heads": 8, "kv_heads": 8, "vocab": 32000}
TOKENS = 32


def merge_seconds(device: str, out: Path) -> float:
    """``python -m fusion merge --device DEVICE`` of the pair with the paper's recipe: its own time."""
    cmd = [sys.executable, "-m", "fusion", "merge", "--tuned", TUNED, "--base", BASE, "--method", "neu-p-taska", "--out", str(out), "--device", device, "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if run.returncode:
        raise RuntimeError(f"merge on {device} failed: {run.stderr[-2000:]}")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return own_seconds(run.stdout) or float("nan")


def tokens_per_second(model: Any) -> float:
    import torch

    inputs = model._inputs([model.prompt("Tell me about the sea.", False)], None)
    with torch.inference_mode():
        model.model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return TOKENS / (time.perf_counter() - start)


def load_and_measure(device: str, four_bit: bool) -> dict[str, float]:
    """Load the tuned model (fp16 on CUDA, bfloat16 on a CPU, or 4-bit), build the paper's
    fused variant in memory next to it, generate; GPU memory at its peak."""
    import torch

    from fusion.checkpoint import open_checkpoint
    from fusion.inference import ChatModel
    from fusion.merge import MergeStream
    from fusion.registry import resolve
    from studio.variants import build_variant

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    original = ChatModel.load(TUNED, True, device=device, dtype=torch.float16 if cuda else None, load_4bit=four_bit)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    stream = MergeStream(open_checkpoint(TUNED), open_checkpoint(BASE), resolve("neu-p-taska", {}), device=device)
    variant = build_variant(original, stream, "fused", "neu-p-taska")
    variant_s = time.perf_counter() - start
    figures = {"load_s": load_s, "variant_build_s": variant_s, "tokens_per_s": tokens_per_second(variant.model)}
    if cuda:
        figures["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del original, variant, stream
    return figures


def run(out: Path, dry_run: bool, work: Path) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    size = DRY_SIZE if dry_run else SIZES["7b"]
    cache = work / "hub"
    os.environ.update({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})  # before huggingface_hub is imported, which reads them once
    write_full_replica(work / "pair", cache, size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {
        "dry_run": dry_run, "size": size, "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__, "replica_s": time.perf_counter() - t0,
    }
    print(f"[gpu] replica ready in {result['replica_s']:.0f} s; GPU steps on {device}", flush=True)
    result["merge_cpu_s"] = merge_seconds("cpu", work / "merged")
    result["merge_gpu_s"] = merge_seconds(device, work / "merged")
    print(f"[gpu] merge: CPU {result['merge_cpu_s']:.1f} s, {device} {result['merge_gpu_s']:.1f} s", flush=True)
    for four_bit in (False, True):
        key = "4bit" if four_bit else "fp16"
        result[key] = load_and_measure(device, four_bit)
        print(f"[gpu] {key}: {result[key]}", flush=True)
    result["total_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def render(result: dict[str, Any]) -> str:
    """The figures as a Markdown table."""
    where = f"{result['gpu']} (torch {result['torch']})" if result["gpu"] else f"no GPU: every step on the CPU (torch {result['torch']})"
    kind = "a dry run (a small pair: its figures check the steps, not the speed)" if result["dry_run"] else "LLaVA-1.5-7B + Vicuna-7B shapes"
    device = result["device"]
    rows = [f"{kind}, {where}; the whole script {result['total_s']:.0f} s, of which the replica {result['replica_s']:.0f} s.", "",
            "| step | figure |", "|---|---:|",
            f"| merge on the CPU (neu-p-taska, written to disk) | {result['merge_cpu_s']:.1f} s |",
            f"| merge on {device} | {result['merge_gpu_s']:.1f} s |"]
    for key, name in (("fp16", "16-bit"), ("4bit", "4-bit nf4")):
        f = result[key]
        rows += [f"| {name}: load the tuned model on {device} | {f['load_s']:.1f} s |", f"| {name}: build the fused variant in memory | {f['variant_build_s']:.1f} s |",
                 f"| {name}: generation | {f['tokens_per_s']:.1f} tokens/s |"]
        if "peak_gpu_gib" in f:
            rows.append(f"| {name}: peak GPU memory (original + fused) | {f['peak_gpu_gib']:.1f} GiB |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-gpu/gpu.json"))
    parser.add_argument("--dry-run", action="store_true", help="every step at a small size (on any machine)")
    parser.add_argument("--work", type=Path, default=Path("bench-gpu/work"), help="where the replica goes (~28 GB at full size)")
    parser.add_argument("--render", type=Path, help="print this JSON's figures as Markdown and stop")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return
    print(render(run(args.out, args.dry_run, args.work.resolve())), end="")


if __name__ == "__main__":
    main()

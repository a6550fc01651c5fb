"""Merge benchmark: speed and memory of every method on a synthetic pair, next to the I/O floor.

    python benchmarks/bench_merge.py                      # ~1.1B parameters, TinyLlama shape
    python benchmarks/bench_merge.py --layers 4           # a smaller pair, same widths
    python benchmarks/bench_merge.py --mergekit /path/to/venv   # also time mergekit's ties

It writes a base/tuned pair (bf16 safetensors, plain Llama layout so other tools read it too)
under --dir, warms the page cache, then runs each merge as its own process (``python -m fusion
merge``) while sampling that process's /proc status every 10 ms. Figures printed per run: wall
time (process start to exit, imports included), parameters per second, peak RSS, and peak
RssAnon (anonymous memory: what the merge itself holds, as file-backed mmap pages of the
inputs do not count). The I/O floor is ``cp`` of the tuned checkpoint's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion.writer import Entry, ShardedWriter, plan_shards  # noqa: E402

TINYLLAMA = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
METHODS = ["task_arithmetic", "ties", "breadcrumbs", "dare", "della", "neuron_fusion"]


def llama_shapes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict[str, tuple[int, ...]]:
    kv = hidden // heads * kv_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_pair(root: Path, size: dict[str, int]) -> tuple[Path, Path, int]:
    """Base: N(0, 0.02); tuned: base + N(0, 0.002), with 2% of FFN neurons changed 10x more
    (a heavy-tailed change, like visual instruction tuning's)."""
    shapes = llama_shapes(**size)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    if (root / "tuned" / "config.json").exists():
        return root / "base", root / "tuned", params
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": size["hidden"],
        "intermediate_size": size["intermediate"],
        "num_hidden_layers": size["layers"],
        "num_attention_heads": size["heads"],
        "num_key_value_heads": size["kv_heads"],
        "vocab_size": size["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    entries = [Entry(n, s, torch.bfloat16) for n, s in shapes.items()]
    gen = torch.Generator().manual_seed(0)
    writers = {}
    for which in ("base", "tuned"):
        (root / which).mkdir(parents=True, exist_ok=True)
        (root / which / "config.json").write_text(json.dumps(config, indent=2))
        writers[which] = ShardedWriter(root / which, plan_shards(entries, 1 << 30), {"format": "pt"})
    for name, shape in shapes.items():
        base = torch.randn(shape, generator=gen).mul_(0.02) if len(shape) > 1 else torch.ones(shape)
        change = torch.randn(shape, generator=gen).mul_(0.002)
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            change[torch.rand(shape[0], generator=gen) < 0.02] *= 10
        writers["base"].write(name, base.to(torch.bfloat16))
        writers["tuned"].write(name, base.add_(change).to(torch.bfloat16))
    for w in writers.values():
        w.close()
    return root / "base", root / "tuned", params


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd``; sample its (and its children's) VmRSS and RssAnon; return wall and peaks."""
    peaks = {"rss": 0, "anon": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def sample() -> None:
        while proc.poll() is None:
            rss = anon = 0
            for pid in [proc.pid, *_children(proc.pid)]:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
            peaks["rss"], peaks["anon"] = max(peaks["rss"], rss), max(peaks["anon"], anon)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss": peaks["rss"], "peak_anon": peaks["anon"], "stdout": out}


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in _children(int(k))]


def warm(directory: Path) -> None:
    """Read every file once so that all runs start with the inputs in the page cache."""
    for f in directory.iterdir():
        with open(f, "rb") as h:
            while h.read(1 << 24):
                pass


def mergekit_ties(venv: Path, base: Path, tuned: Path, out: Path) -> list[str]:
    config = out.parent / "mergekit-ties.yml"
    config.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {tuned}\n    parameters:\n"
        "      density: 0.2\n      weight: 1.0\ndtype: bfloat16\n"
    )
    return [str(venv / "bin" / "mergekit-yaml"), str(config), str(out), "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="bench-data", help="where the pair and outputs go (default: ./bench-data)")
    parser.add_argument("--layers", type=int, default=TINYLLAMA["layers"], help="decoder layers (22: ~1.1B parameters)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to run")
    parser.add_argument("--mergekit", type=Path, help="a venv holding mergekit: also time its ties on the same pair")
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()

    root = Path(args.dir).resolve()
    t0 = time.perf_counter()
    base, tuned, params = write_pair(root / f"pair-{args.layers}L", {**TINYLLAMA, "layers": args.layers})
    print(f"pair: {params / 1e9:.3f} B parameters, bf16, under {base.parent} (ready in {time.perf_counter() - t0:.0f} s)", flush=True)
    out = root / "out"
    runs: list[tuple[str, list[str], dict[str, str] | None]] = [("copy (I/O floor)", ["cp", "-r", str(tuned), str(out)], None)]
    for method in args.methods.split(","):
        cmd = [sys.executable, "-m", "fusion", "merge", "--tuned", str(tuned), "--base", str(base), "--method", method, "--out", str(out), "--device", "cpu", "--quiet"]
        runs.append((method, cmd, None))
    if args.mergekit:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        runs.append(("mergekit 0.1.5 ties", mergekit_ties(args.mergekit, base, tuned, out), env))

    results = []
    print(f"{'run':<22} {'wall s':>8} {'x floor':>8} {'Mparam/s':>9} {'peak RSS GiB':>13} {'peak anon GiB':>14}", flush=True)
    floor = None
    for name, cmd, env in runs:
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        warm(base)
        warm(tuned)
        r = run_measured(cmd, env)
        floor = floor or r["wall_s"]
        row = {"run": name, "wall_s": r["wall_s"], "x_floor": r["wall_s"] / floor, "params_per_s": params / r["wall_s"], "peak_rss": r["peak_rss"], "peak_anon": r["peak_anon"]}
        results.append(row)
        print(
            f"{name:<22} {row['wall_s']:>8.2f} {row['x_floor']:>8.2f} {row['params_per_s'] / 1e6:>9.0f} "
            f"{row['peak_rss'] / 2**30:>13.2f} {row['peak_anon'] / 2**30:>14.2f}",
            flush=True,
        )
    shutil.rmtree(out, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": params, "layers": args.layers, "results": results}, indent=2))


if __name__ == "__main__":
    main()

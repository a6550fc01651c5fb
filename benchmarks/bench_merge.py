"""Merge benchmark: speed and memory of every method on a synthetic pair, next to the I/O floor.

    python benchmarks/bench_merge.py                        # ~1.1B parameters, TinyLlama shape, fp16
    python benchmarks/bench_merge.py --size 3b              # ~3B: the same layer shapes, 64 layers
    python benchmarks/bench_merge.py --layers 4             # a small pair, same widths
    python benchmarks/bench_merge.py --mergekit /path/to/venv   # also time mergekit's ties

It writes a base/tuned pair (safetensors, plain Llama layout so other tools read it too) under
--dir, then runs each merge as its own process (``python -m fusion merge``) with both inputs
warm in the page cache, sampling that process's /proc status every 10 ms. Figures per run: wall
time (process start to exit, imports included; the fastest of ``--repeats``), the merge's own
time as it reports it (without the interpreter's start and imports), wall × the I/O floor,
parameters per second, peak RSS, and peak RssAnon (anonymous memory: what the merge itself
holds, as file-backed mmap pages of the inputs do not count; the largest of the repeats).

The I/O floor is the fastest the same bytes can move in the same conditions, measured in the
same run: ``cp`` of the base checkpoint's files to the output disk (a merge writes that many
bytes) plus reading every tuned file with a warm page cache (a merge reads both inputs, warm),
the fastest of ``--floor-repeats`` repetitions. A cold ``cp`` of one model would flatter every
method by charging the floor for disk reads that the merges never pay. A merge also puts its
output on the disk before publishing it (``fusion.writer.ShardFile``), which ``cp`` does not:
the durable floor adds a ``sync`` of the copied files, and each run is shown against both.

Same conditions also means the same memory: on a virtual machine, memory the guest has left idle
for a few seconds is taken back by the host, and writing 2 GiB into it took 5.1 s here against
0.4 s right after a file of that size was deleted. So every timed run, the floor's included,
starts right after the previous run's output is deleted (a first, untimed floor run primes it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
# --size: TinyLlama's shape, and the same layer shapes with more layers (2.95 B parameters), so
# that time and memory per parameter can be compared across model sizes
SIZES = {"1.1b": TINYLLAMA, "3b": {**TINYLLAMA, "layers": 64}}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
METHODS = ["task_arithmetic", "ties", "breadcrumbs", "dare", "della", "neuron_fusion"]
READ_BLOCK = 1 << 24


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


def write_pair(root: Path, size: dict[str, int], dtype: torch.dtype) -> tuple[Path, Path, int]:
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
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    entries = [Entry(n, s, dtype) for n, s in shapes.items()]
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
        writers["base"].write(name, base.to(dtype))
        writers["tuned"].write(name, base.add_(change).to(dtype))
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


def read_all(directory: Path) -> None:
    """Read every file of ``directory`` once into one reused buffer: with the files in the page
    cache this is the cheapest way to move their bytes through user space, and it warms the cache."""
    buffer = bytearray(READ_BLOCK)
    for f in sorted(directory.iterdir()):
        with open(f, "rb", buffering=0) as h:
            while h.readinto(buffer):
                pass


def settle(out: Path, inputs: list[Path]) -> None:
    """What every timed run starts from: the previous output flushed to disk (so that no run pays
    for another's writes), the inputs warm in the page cache, and then, just before the run, the
    previous output deleted, so that its memory is fresh in the guest (see the module's notes)."""
    subprocess.run(["sync"], check=True)
    for directory in inputs:
        read_all(directory)
    shutil.rmtree(out, ignore_errors=True)


def copy_and_read(base: Path, tuned: Path, out: Path) -> dict[str, float]:
    """One run of the I/O floor: ``cp`` the base files into ``out`` (the bytes a merge writes),
    ``sync`` them (a merge's output is on the disk before it is published), then read every
    tuned file warm (the bytes a merge reads besides the base, which ``cp`` read)."""
    out.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run(["cp", *map(str, sorted(base.iterdir())), str(out)], check=True)
    copied = time.perf_counter()
    subprocess.run(["sync", *map(str, sorted(out.iterdir())), str(out)], check=True)
    synced = time.perf_counter()
    read_all(tuned)
    read = time.perf_counter() - synced
    cp_s, sync_s = copied - start, synced - copied
    return {"wall_s": cp_s + read, "durable_s": cp_s + sync_s + read, "cp_s": cp_s, "sync_s": sync_s, "read_s": read}


def io_floor(base: Path, tuned: Path, out: Path, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """The floor runs, after one untimed run that primes the memory: the fastest by its I/O
    floor (``wall_s``) and the fastest by its durable floor (``durable_s``)."""
    settle(out, [base, tuned])
    copy_and_read(base, tuned, out)
    runs = []
    for _ in range(repeats):
        settle(out, [base, tuned])
        runs.append(copy_and_read(base, tuned, out))
    return min(runs, key=lambda r: r["wall_s"]), min(runs, key=lambda r: r["durable_s"])


def mergekit_ties(venv: Path, base: Path, tuned: Path, out: Path, dtype: str) -> list[str]:
    config = out.parent / "mergekit-ties.yml"
    config.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {tuned}\n    parameters:\n"
        f"      density: 0.2\n      weight: 1.0\ndtype: {dtype}\n"
    )
    return [str(venv / "bin" / "mergekit-yaml"), str(config), str(out), "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def own_seconds(stdout: str) -> float | None:
    """The merge's own time as ``python -m fusion merge`` reports it (from the call of ``fuse``
    to the output published, so without the interpreter's start and imports)."""
    found = re.search(r"written in (\d+\.\d+) s", stdout)
    return float(found.group(1)) if found else None


def print_row(row: dict[str, object]) -> None:
    own = f"{row['own_s']:>8.2f}" if row.get("own_s") is not None else f"{'–':>8}"
    print(
        f"{row['run']:<22} {row['wall_s']:>8.2f} {own} {row['x_floor']:>8.2f} {row['x_durable']:>9.2f} {row['params_per_s'] / 1e6:>9.0f} "
        f"{row['peak_rss'] / 2**30:>13.2f} {row['peak_anon'] / 2**30:>14.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="bench-data", help="where the pair and outputs go (default: ./bench-data)")
    parser.add_argument("--size", choices=SIZES, default="1.1b", help="1.1b: TinyLlama's shape; 3b: the same layers, 64 of them")
    parser.add_argument("--layers", type=int, help="decoder layers instead of the size's (a quick, small pair)")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="storage dtype of the pair (default float16)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to run")
    parser.add_argument("--floor-repeats", type=int, default=3, help="repetitions of the I/O floor; the fastest counts")
    parser.add_argument("--repeats", type=int, default=1, help="repetitions of each merge; the fastest counts")
    parser.add_argument("--mergekit", type=Path, help="a venv holding mergekit: also time its ties on the same pair")
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()

    size = {**SIZES[args.size], **({"layers": args.layers} if args.layers else {})}
    root = Path(args.dir).resolve()
    t0 = time.perf_counter()
    base, tuned, params = write_pair(root / f"pair-{size['layers']}L-{args.dtype}", size, DTYPES[args.dtype])
    print(f"pair: {params / 1e9:.3f} B parameters, {args.dtype}, under {base.parent} (ready in {time.perf_counter() - t0:.0f} s)", flush=True)
    out = root / "out"
    runs: list[tuple[str, list[str], dict[str, str] | None]] = []
    for method in args.methods.split(","):
        cmd = [sys.executable, "-m", "fusion", "merge", "--tuned", str(tuned), "--base", str(base), "--method", method, "--out", str(out), "--device", "cpu", "--quiet"]
        runs.append((method, cmd, None))
    if args.mergekit:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        runs.append(("mergekit 0.1.5 ties", mergekit_ties(args.mergekit, base, tuned, out, args.dtype), env))

    floor, durable = io_floor(base, tuned, out, args.floor_repeats)
    print(f"I/O floor: {floor['wall_s']:.2f} s = cp of the base {floor['cp_s']:.2f} s + warm read of the tuned {floor['read_s']:.2f} s", flush=True)
    print(
        f"durable I/O floor: {durable['durable_s']:.2f} s = cp {durable['cp_s']:.2f} s + sync of the copy {durable['sync_s']:.2f} s "
        f"+ read {durable['read_s']:.2f} s",
        flush=True,
    )
    print(f"{'run':<22} {'wall s':>8} {'merge s':>8} {'x floor':>8} {'x durable':>9} {'Mparam/s':>9} {'peak RSS GiB':>13} {'peak anon GiB':>14}", flush=True)
    floor_row = {"run": "I/O floor", **floor, "durable": durable, "x_floor": 1.0, "x_durable": floor["wall_s"] / durable["durable_s"], "params_per_s": params / floor["wall_s"], "peak_rss": 0, "peak_anon": 0}
    print_row(floor_row)
    results = [floor_row]
    for name, cmd, env in runs:
        measured = []
        for _ in range(args.repeats):
            settle(out, [base, tuned])
            measured.append(run_measured(cmd, env))
        wall = min(r["wall_s"] for r in measured)
        fastest = min(measured, key=lambda r: r["wall_s"])
        row = {"run": name, "wall_s": wall, "own_s": own_seconds(fastest["stdout"]), "x_floor": wall / floor["wall_s"], "x_durable": wall / durable["durable_s"], "params_per_s": params / wall}
        row |= {"peak_rss": max(r["peak_rss"] for r in measured), "peak_anon": max(r["peak_anon"] for r in measured)}
        results.append(row)
        print_row(row)
    shutil.rmtree(out, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": params, "size": size, "dtype": args.dtype, "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Merge benchmark: speed and memory of every method on a synthetic pair, next to the I/O floor.

    python benchmarks/bench_merge.py                        # ~1.1B parameters, TinyLlama shape, fp16
    python benchmarks/bench_merge.py --size 3b              # ~3B: the same layer shapes, 64 layers
    python benchmarks/bench_merge.py --layers 4             # a small pair, same widths
    python benchmarks/bench_merge.py --mergekit /path/to/venv   # also time mergekit's ties
    python benchmarks/bench_merge.py --size 7b --mergekit /path/to/venv   # LLaVA-1.5-7B + Vicuna-7B, cold

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

``--size 7b`` is the paper's pair at its real size: LLaVA-1.5-7B's tensors (the llava-hf
layout: the language model under ``language_model.``, the CLIP-L/336 tower and projector, the
vocabulary padded to 32064) in three safetensors shards, and Vicuna-7B-v1.5's as it ships, two
pickle ``.bin`` shards with their index (and the rotary buffers old transformers saved), random
weights. Both together (27.6 GB) are more than this machine's RAM, so its runs are **cold**: the
page cache is dropped before each (``/proc/sys/vm/drop_caches`` as root, else every input file's
pages are dropped with ``posix_fadvise(DONTNEED)``; the run says which). Its floors: reading both
inputs cold, and that plus writing the output's bytes durably (a ``cp`` of the tuned files, then
``sync``). After the methods, the base is converted to safetensors (the .bin copy deleted, for
disk space) and Neuron-Fusion runs again on it (pickle vs safetensors per byte); mergekit runs on
that copy with the tuned model's language model as a plain Llama checkpoint, since mergekit has
no LLaVA architecture (and reads ``.bin`` whole unless told ``--lazy-unpickle``).

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
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion.writer import Entry, ShardedWriter, plan_shards  # noqa: E402

TINYLLAMA = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
# --size: TinyLlama's shape, and the same layer shapes with more layers (2.95 B parameters), so
# that time and memory per parameter can be compared across model sizes
SIZES = {"1.1b": TINYLLAMA, "3b": {**TINYLLAMA, "layers": 64}, "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)}
LLAVA_EXTRA_ROWS = 64  # llava-hf pads Vicuna's 32000 rows to 32064 (<image>, <pad>, padding)
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


def base_and_tuned(name: str, shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor of the synthetic pair, float32: the base N(0, 0.02) (norms: ones), the tuned
    model the base + N(0, 0.002), with 2% of FFN neurons changed 10x more."""
    base = torch.randn(shape, generator=gen).mul_(0.02) if len(shape) > 1 else torch.ones(shape)
    change = torch.randn(shape, generator=gen).mul_(0.002)
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        change[torch.rand(shape[0], generator=gen) < 0.02] *= 10
    return base, base + change


def write_pair(root: Path, size: dict[str, int], dtype: torch.dtype) -> tuple[Path, Path, int]:
    """A plain Llama pair of ``base_and_tuned`` tensors (a heavy-tailed change, like visual
    instruction tuning's)."""
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
        base, tuned = base_and_tuned(name, shape, gen)
        writers["base"].write(name, base.to(dtype))
        writers["tuned"].write(name, tuned.to(dtype))
    for w in writers.values():
        w.close()
    return root / "base", root / "tuned", params


def llava_vision_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    """LLaVA-1.5's CLIP-L/336 tower and its projector into a language model of width ``hidden``,
    by their on-disk names (shapes from transformers' own classes, built on the meta device: no
    memory)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config={"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": 1, "vocab_size": 32064},
        vision_config={"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768},
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {name.removeprefix("model."): tuple(t.shape) for name, t in model.state_dict().items() if ".language_model." not in f".{name}" and name != "lm_head.weight"}


def write_llava_pair(root: Path, size: dict[str, int], dtype: torch.dtype) -> tuple[Path, Path, int]:
    """LLaVA-1.5-7B (safetensors, llava-hf layout) and Vicuna-7B-v1.5 (pickle .bin shards + index),
    with ``base_and_tuned``'s change: returns (base, tuned, parameters of both inputs)."""
    base_dir, tuned_dir = root / "base", root / "tuned"
    lm = llama_shapes(**size)
    vision = llava_vision_shapes(size["hidden"])
    rows = size["vocab"] + LLAVA_EXTRA_ROWS
    tuned_shapes = {("language_model." + n): ((rows, s[1]) if n in ("model.embed_tokens.weight", "lm_head.weight") else s) for n, s in lm.items()}
    tuned_shapes |= vision
    params = sum(torch.Size(s).numel() for s in (*lm.values(), *tuned_shapes.values()))
    complete = root / "complete"  # written last: a pair whose writing was cut off is written again
    if complete.exists():
        return base_dir, tuned_dir, params
    text = {"model_type": "llama", "hidden_size": size["hidden"], "intermediate_size": size["intermediate"], "num_hidden_layers": size["layers"],
            "num_attention_heads": size["heads"], "num_key_value_heads": size["kv_heads"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "torch_dtype": "float16"}
    tuned_config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": size["vocab"], "pad_token_id": size["vocab"] + 1,
                    "projector_hidden_act": "gelu", "text_config": {**text, "vocab_size": rows}, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                      "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768},
                    "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": rows}
    for d in (base_dir, tuned_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    (tuned_dir / "config.json").write_text(json.dumps(tuned_config, indent=2))
    (base_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **text, "vocab_size": size["vocab"], "tie_word_embeddings": False}, indent=2))
    tuned = ShardedWriter(tuned_dir, plan_shards([Entry(n, s, dtype) for n, s in tuned_shapes.items()], 5 << 30), {"format": "pt"})
    gen = torch.Generator().manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, size["hidden"] // size["heads"], 2).float() / (size["hidden"] // size["heads"])))
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    # vicuna-7b-v1.5's index: the embeddings and layers 0-23 in the first file (a smaller pair: half its layers)
    first_shard_layers = 24 if size["layers"] == 32 else max(1, size["layers"] // 2)

    def save_shard(number: int) -> None:
        name = f"pytorch_model-{number:05d}-of-00002.bin"
        torch.save(shard, base_dir / name)
        weight_map.update({k: name for k in shard})
        shard.clear()

    for name, shape in [*lm.items(), *vision.items()]:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        if name in vision:
            tuned.write(name, (torch.randn(shape, generator=gen) * 0.02).to(dtype))
            continue
        if layer == first_shard_layers and not weight_map:
            save_shard(1)
        base, changed = base_and_tuned(name, shape, gen)
        shard[name] = base.to(dtype)
        if name.endswith("self_attn.o_proj.weight"):
            shard[name.replace("o_proj.weight", "rotary_emb.inv_freq")] = inv_freq
        if tuned_shapes["language_model." + name] != shape:
            changed = torch.cat([changed, torch.randn(LLAVA_EXTRA_ROWS, shape[1], generator=gen).mul_(0.02)])
        tuned.write("language_model." + name, changed.to(dtype))
    save_shard(2)
    tuned.close()
    (base_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    complete.write_text("")
    return base_dir, tuned_dir, params


def base_as_safetensors(base_bin: Path, out: Path) -> Path:
    """The pickle base as safetensors (what mergekit reads without --lazy-unpickle), the .bin
    copy deleted afterwards to make room on the disk."""
    if (out / "config.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in sorted(base_bin.glob("*.bin"))]
    tensors = {k: v for shard in shards for k, v in shard.items() if not k.endswith("rotary_emb.inv_freq")}
    writer = ShardedWriter(out, plan_shards([Entry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 5 << 30), {"format": "pt"})
    for k, v in tensors.items():
        writer.write(k, v.clone())
    writer.close()
    shutil.copyfile(base_bin / "config.json", out / "config.json")
    return out


def tuned_language_model(tuned: Path, out: Path, rows: int) -> Path:
    """The tuned LLaVA's language model as a plain Llama checkpoint of the base's vocabulary, for
    mergekit (which has no LLaVA architecture)."""
    from safetensors import safe_open

    if (out / "config.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    handles = [safe_open(str(f), "pt") for f in sorted(tuned.glob("*.safetensors"))]
    names = {k.removeprefix("language_model."): (h, k) for h in handles for k in h.keys() if k.startswith("language_model.")}
    entries = []
    for name, (h, key) in names.items():
        shape = tuple(h.get_slice(key).get_shape())
        entries.append(Entry(name, (rows, *shape[1:]) if name in ("model.embed_tokens.weight", "lm_head.weight") else shape, torch.float16))
    writer = ShardedWriter(out, plan_shards(entries, 5 << 30), {"format": "pt"})
    for e in entries:
        h, key = names[e.name]
        writer.write(e.name, h.get_tensor(key)[: e.shape[0]].clone())
    writer.close()
    config = json.loads((tuned / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **config["text_config"], "vocab_size": rows}, indent=2))
    return out


def drop_page_cache(paths: list[Path]) -> str:
    """Make the next read of ``paths`` cold: the whole page cache dropped where this process may
    (root), else each file's pages dropped; returns which."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for directory in paths:
            for f in directory.iterdir():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "posix_fadvise(DONTNEED)"


def cold_floors(base: Path, tuned: Path, out: Path, repeats: int) -> tuple[dict[str, float], dict[str, float], str]:
    """The cold floors, the fastest of ``repeats``: reading both inputs cold, and that plus
    writing the output's bytes durably (``cp`` of the tuned files, which reads them, then
    ``sync``, with the base read cold)."""
    reads, durables = [], []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        how = drop_page_cache([base, tuned])
        start = time.perf_counter()
        read_all(base)
        read_all(tuned)
        reads.append({"wall_s": time.perf_counter() - start})
        how = drop_page_cache([base, tuned])
        out.mkdir(parents=True)
        start = time.perf_counter()
        subprocess.run(["cp", *map(str, sorted(tuned.iterdir())), str(out)], check=True)
        read_all(base)
        copied = time.perf_counter()
        subprocess.run(["sync", *map(str, sorted(out.iterdir())), str(out)], check=True)
        durables.append({"wall_s": time.perf_counter() - start, "cp_and_read_s": copied - start, "sync_s": time.perf_counter() - copied})
    shutil.rmtree(out, ignore_errors=True)
    return min(reads, key=lambda r: r["wall_s"]), min(durables, key=lambda r: r["wall_s"]), how


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


def merge_command(tuned: Path, base: Path, method: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "fusion", "merge", "--tuned", str(tuned), "--base", str(base), "--method", method, "--out", str(out), "--device", "cpu", "--quiet"]


def timed(name: str, cmd: list[str], env: dict[str, str] | None, params: int, floors: tuple[float, float], before: Callable[[], object]) -> dict[str, object]:
    """One measured run after ``before`` (which settles the machine), as a table row."""
    before()
    r = run_measured(cmd, env)
    row = {"run": name, "wall_s": r["wall_s"], "own_s": own_seconds(r["stdout"]), "x_floor": r["wall_s"] / floors[0], "x_durable": r["wall_s"] / floors[1]}
    row |= {"params_per_s": params / r["wall_s"], "peak_rss": r["peak_rss"], "peak_anon": r["peak_anon"]}
    print_row(row)
    return row


def full_size(args: argparse.Namespace, size: dict[str, int], root: Path) -> None:
    """``--size 7b``: LLaVA-1.5-7B and Vicuna-7B-v1.5 as they ship, every run cold."""
    t0 = time.perf_counter()
    pair = root / "llava-1.5-7b"
    base_bin, tuned, params = write_llava_pair(pair, size, DTYPES[args.dtype])
    out = root / "out"
    print(f"pair: {params / 1e9:.3f} B parameters in both inputs, under {pair} (ready in {time.perf_counter() - t0:.0f} s)", flush=True)
    inputs = [base_bin, tuned]
    read, durable, how = cold_floors(base_bin, tuned, out, args.floor_repeats)
    print(f"cold: page cache dropped before every run with {how}", flush=True)
    print(f"cold read floor: {read['wall_s']:.2f} s; cold durable floor: {durable['wall_s']:.2f} s = cp of the tuned + cold read of the base "
          f"{durable['cp_and_read_s']:.2f} s + sync {durable['sync_s']:.2f} s", flush=True)
    floors = (read["wall_s"], durable["wall_s"])
    print(f"{'run':<22} {'wall s':>8} {'merge s':>8} {'x read':>8} {'x durable':>9} {'Mparam/s':>9} {'peak RSS GiB':>13} {'peak anon GiB':>14}", flush=True)

    def settle_cold() -> None:
        shutil.rmtree(out, ignore_errors=True)
        drop_page_cache(inputs)

    rows: list[dict[str, object]] = [{"run": "cold read floor", **read}, {"run": "cold durable floor", **durable}]
    for method in args.methods.split(","):
        rows.append(timed(method, merge_command(tuned, base_bin, method, out), None, params, floors, settle_cold))
    base_st = base_as_safetensors(base_bin, pair / "base-safetensors")
    shutil.rmtree(base_bin)  # room on the disk for mergekit's copy of the tuned language model
    (pair / "complete").unlink()  # the pair as bench_merge wrote it is no longer whole
    inputs = [base_st, tuned]
    rows.append(timed("neuron_fusion, base .st", merge_command(tuned, base_st, "neuron_fusion", out), None, params, floors, settle_cold))
    if args.mergekit:
        tuned_lm = tuned_language_model(tuned, pair / "tuned-lm", size["vocab"])
        inputs = [base_st, tuned_lm]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        rows.append(timed("mergekit ties", mergekit_ties(args.mergekit, base_st, tuned_lm, out, args.dtype), env, params, floors, settle_cold))
    shutil.rmtree(out, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": params, "size": size, "dtype": args.dtype, "cold": how, "results": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="bench-data", help="where the pair and outputs go (default: ./bench-data)")
    parser.add_argument("--size", choices=SIZES, default="1.1b", help="1.1b: TinyLlama's shape; 3b: the same layers, 64 of them; 7b: LLaVA-1.5-7B + Vicuna-7B, cold")
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
    if args.size == "7b":
        return full_size(args, size, root)
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

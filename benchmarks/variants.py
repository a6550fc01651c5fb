"""Time to a fused variant and time to ready: in memory (the app today) vs the disk path.

    python benchmarks/variants.py [--pair pocket|1b] [--runs 2]

*Disk path* (the app before per-visitor variants): ``fuse`` writes a checkpoint into an empty
cache, then ``from_pretrained`` loads it and the vision modules are shared. *In memory*: the
library's ``MergeStream`` feeds an in-memory copy of the loaded original (``studio.variants``).
*Time to variant* is the fused model alone, the original being loaded; *time to ready* is the
original's load plus the default variant, what a visitor waits for after the app starts.

``--pair 1b`` generates a LLaVA whose language model has TinyLlama-1.1B's shape (hidden 2048,
22 layers, 32 heads, 4 kv heads, FFN 5632; 0.97 B parameters in fp16) on the pocket pair's
vision tower, tokenizer and processor, and its base LLM, under ``bench-data/`` (ignored by git).
Each measurement runs in a fresh process, with a warm page cache (one untimed read first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POCKET = ROOT / "assets" / "pocket"
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 64}


def generate_1b(root: Path) -> tuple[Path, Path]:
    """A ~1B tuned LLaVA and its base LLM (random fp16 weights, a small change between them)."""
    import torch
    from safetensors.torch import load_file, save_file

    tuned_dir, base_dir = root / "llava", root / "base"
    if (tuned_dir / "config.json").exists() and (base_dir / "config.json").exists():
        return tuned_dir, base_dir
    for source, target in ((POCKET / "llava", tuned_dir), (POCKET / "base", base_dir)):
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    base_config = {**json.loads((base_dir / "config.json").read_text()), **TINYLLAMA, "dtype": "float16"}
    (base_dir / "config.json").write_text(json.dumps(base_config, indent=2))
    tuned_config = json.loads((tuned_dir / "config.json").read_text())
    tuned_config["text_config"] = {**tuned_config["text_config"], **TINYLLAMA}
    tuned_config["dtype"] = "float16"
    (tuned_dir / "config.json").write_text(json.dumps(tuned_config, indent=2))

    gen = torch.Generator().manual_seed(0)
    h, f, kv = TINYLLAMA["hidden_size"], TINYLLAMA["intermediate_size"], TINYLLAMA["num_key_value_heads"] * TINYLLAMA["head_dim"]
    shapes = {"model.embed_tokens.weight": (base_config["vocab_size"], h), "model.norm.weight": (h,), "lm_head.weight": (base_config["vocab_size"], h)}
    for i in range(TINYLLAMA["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }
    extra = tuned_config["text_config"]["vocab_size"] - base_config["vocab_size"]
    pocket = load_file(POCKET / "llava" / "model.safetensors")
    vision = {k: v.half() for k, v in pocket.items() if k.startswith("vision_tower.")}
    width = tuned_config["vision_config"]["hidden_size"]  # the projector maps vision width -> text width -> text width
    for name, shape in (("linear_1", (h, width)), ("linear_2", (h, h))):
        vision[f"multi_modal_projector.{name}.weight"] = (0.02 * torch.randn(shape, generator=gen)).half()
        vision[f"multi_modal_projector.{name}.bias"] = torch.zeros(h, dtype=torch.float16)
    base_shards: list[dict] = [{}, {}]
    tuned_shards: list[dict] = [{**vision}, {}]
    for n, (name, shape) in enumerate(shapes.items()):
        w = (0.02 * torch.randn(shape, generator=gen)).half()
        t = (w.float() + 0.002 * torch.randn(shape, generator=gen)).half()
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, (0.02 * torch.randn(extra, h, generator=gen)).half()])
        half = int(n >= len(shapes) // 2)
        base_shards[half][name] = w
        tuned_shards[half]["language_model." + name] = t
    for directory, shards in ((base_dir, base_shards), (tuned_dir, tuned_shards)):
        names = [f"model-{i:05d}-of-00002.safetensors" for i in (1, 2)]
        for name, shard in zip(names, shards):
            save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tuned_dir, base_dir


MEASURE = """
import json, sys, tempfile, time
sys.path.insert(0, {root!r})
from fusion.inference import ChatModel
from fusion.merge import MergeStream, fuse
from fusion.registry import resolve
from studio.variants import build_variant

tuned, base, mode = {tuned!r}, {base!r}, {mode!r}
recipe = resolve("neu-p-taska", {{"suppress": 0.5}})
for directory in (tuned, base):  # a warm page cache: what is timed is the work, not the disk
    for f in __import__("pathlib").Path(directory).glob("*.safetensors"):
        f.read_bytes()
start = time.perf_counter()
original = ChatModel.load(tuned, True)
loaded = time.perf_counter()
if mode == "disk":
    with tempfile.TemporaryDirectory() as cache:
        result = fuse(tuned, base, recipe, cache_dir=cache, device="cpu")
        fused = ChatModel.load(result.path, True)
        for name in ("vision_tower", "multi_modal_projector"):
            setattr(fused.model.model, name, getattr(original.model.model, name))
else:
    fused = build_variant(original, MergeStream(tuned, base, recipe, device="cpu"), "fused", "neu-p-taska").model
done = time.perf_counter()
print(json.dumps({{"variant": done - loaded, "ready": done - start}}))
"""


def measure(tuned: Path, base: Path, mode: str) -> dict[str, float]:
    code = MEASURE.format(root=str(ROOT), tuned=str(tuned), base=str(base), mode=mode)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=("pocket", "1b"), default="pocket")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data" / "variants-1b", help="where --pair 1b is generated")
    args = parser.parse_args(argv)
    if args.pair == "pocket":
        tuned, base = POCKET / "llava", POCKET / "base"
    else:
        args.data.mkdir(parents=True, exist_ok=True)
        tuned, base = generate_1b(args.data)
    print(f"| {args.pair}: neu-p-taska | time to variant s | time to ready s |\n|---|---:|---:|")
    for mode, label in (("disk", "disk path (fuse to a checkpoint, from_pretrained)"), ("memory", "in memory (MergeStream into a copy)")):
        runs = [measure(tuned, base, mode) for _ in range(args.runs)]
        print(f"| {label} | {statistics.median(r['variant'] for r in runs):.2f} | {statistics.median(r['ready'] for r in runs):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

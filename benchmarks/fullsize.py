"""A full-size replica of the paper's preset (llava-hf/llava-1.5-7b-hf and lmsys/vicuna-7b-v1.5)
in a Hugging Face cache, for the benchmarks that load models as the app does.

The weights are ``bench_merge.py --size 7b``'s pair (real tensor names and shapes, random values),
hard-linked into the cache (no second copy on the disk); the configs are the real ones (the full
sizes of ``tests/replicas.py``'s shrunk ones); the tokenizer, processor and chat-template files
are the replica's (a 320-piece SentencePiece vocabulary, so ``<image>`` is id 320 and the
config says so). Answers are noise; load times, memory and speed are the real model's.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_merge import DTYPES, SIZES, write_llava_pair  # noqa: E402
from replicas import llava_15_7b, write_repo  # noqa: E402

CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "projection_dim": 768}


def full_configs(size: dict[str, int]) -> tuple[dict, dict]:
    """(tuned, base) config.json contents: the replica's, at ``size`` (LLaVA-1.5-7B's by default)."""
    replica = llava_15_7b()
    widths = {"hidden_size": size["hidden"], "intermediate_size": size["intermediate"], "num_attention_heads": size["heads"],
              "num_key_value_heads": size["kv_heads"], "num_hidden_layers": size["layers"]}
    tuned = copy.deepcopy(replica.tuned.config)
    tuned["text_config"] |= {**widths, "vocab_size": size["vocab"] + 64}
    tuned["vision_config"] |= CLIP_L_336
    tuned["vocab_size"] = size["vocab"] + 64
    return tuned, {**replica.base.config, **widths, "vocab_size": size["vocab"]}


def write_full_replica(pair_root: Path, cache: Path, size: dict[str, int] | None = None, dtype: str = "float16") -> tuple[Path, Path]:
    """Both repos of the preset in ``cache`` (a ``HF_HUB_CACHE``), their weights ``pair_root``'s
    (written first if they are not there); returns the two snapshot directories."""
    size = size or SIZES["7b"]
    base_dir, tuned_dir, _ = write_llava_pair(pair_root, size, DTYPES[dtype])
    replica = llava_15_7b()
    tuned_config, base_config = full_configs(size)
    snapshots = []
    for repo, config, weights in ((replica.tuned, tuned_config, tuned_dir), (replica.base, base_config, base_dir)):
        snapshot = write_repo(cache, dataclasses.replace(repo, config=config), {}, cache.parent / "work")
        for f in weights.iterdir():
            target = snapshot / f.name
            if f.name != "config.json" and not target.exists():
                os.link(f, target)
        snapshots.append(snapshot)
    return snapshots[0], snapshots[1]

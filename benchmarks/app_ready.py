"""How soon the app is ready on the paper's pair at full size, and how much memory it holds.

    python benchmarks/app_ready.py --preset llava-1.5-7b --4bit [--dir bench-data] [--json FILE]
    python benchmarks/app_ready.py --layers 2 --json FILE        # the same steps on a small pair

On a full-size replica (``benchmarks/fullsize.py``: LLaVA-1.5-7B's and Vicuna-7B's real shapes,
random weights, in a Hugging Face cache read with ``HF_HUB_OFFLINE=1``), the app's own logic
(``studio.state.Studio``, what ``python app.py`` runs behind its page) is timed from the moment
it starts (after the replica is written and the floors measured; torch is imported by then, 1.1 s
on this machine): the original model loaded, the default fused model built in memory, the first
fused answer, the base LLM loaded (on first use, as in the app), and a visitor's own variant
(TIES). Resident memory (VmRSS, and RssAnon: memory not backed by files) is read at each stage,
and its peak sampled every 50 ms; generation speed is 32 greedy tokens after a short prompt.
Measured in the same run, with the page cache dropped first: the time to read both checkpoints
once, and the merge of the visitor's recipe to disk (``python -m fusion merge``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from app_memory import resident_mib  # noqa: E402
from bench_merge import SIZES, drop_page_cache, own_seconds, read_all  # noqa: E402
from fullsize import write_full_replica  # noqa: E402

TOKENS = 32


def memory() -> dict[str, float]:
    """This process's VmRSS and RssAnon, GiB."""
    return {key: mib / 1024 for key, mib in resident_mib(os.getpid()).items()}


class Timeline:
    """Stages with their time since the process started and the memory then; the peak memory
    sampled in between."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: list[dict[str, float | str]] = []
        self.peak = {"VmRSS": 0.0, "RssAnon": 0.0}
        self._done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            for key, value in memory().items():
                self.peak[key] = max(self.peak[key], value)

    def mark(self, stage: str) -> None:
        row = {"stage": stage, "t_s": time.perf_counter() - self.start, **memory()}
        self.stages.append(row)
        print(f"{row['t_s']:8.1f} s  {stage:<40} RSS {row['VmRSS']:6.2f} GiB  anon {row['RssAnon']:6.2f} GiB", flush=True)

    def stop(self) -> None:
        self._done.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llava-1.5-7b", choices=["llava-1.5-7b"], help="the full-size replica there is (the paper's pair)")
    parser.add_argument("--4bit", dest="four", action="store_true", help="load the language models in 4-bit nf4, as `python app.py --4bit`")
    parser.add_argument("--dir", default="bench-data", help="where bench_merge.py --size 7b keeps (or this run writes) the pair")
    parser.add_argument("--layers", type=int, help="decoder layers instead of 32 (a quick, small run)")
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()

    size = {**SIZES["7b"], **({"layers": args.layers} if args.layers else {})}
    root = Path(args.dir).resolve()
    pair = root / ("llava-1.5-7b" if not args.layers else f"llava-1.5-7b-{args.layers}L")
    cache = root / "hub" / pair.name / "cache"
    # before huggingface_hub is imported (writing the replica's tokenizer imports it), which reads them once
    os.environ.update({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "NEURON_FUSION_CACHE": str(root / "fusion-cache")})
    tuned, base = write_full_replica(pair, cache, size)

    drop_page_cache([tuned, base])
    t = time.perf_counter()
    read_all(tuned)
    read_all(base)
    read_once = time.perf_counter() - t
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        drop_page_cache([tuned, base])
        cmd = [sys.executable, "-m", "fusion", "merge", "--tuned", "llava-hf/llava-1.5-7b-hf", "--base", "lmsys/vicuna-7b-v1.5", "--method", "ties",
               "--out", str(Path(tmp) / "ties"), "--device", "cpu", "--quiet"]
        merged = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if merged.returncode:  # the merge's own line (a full disk, say), not a traceback of this script
            sys.exit(f"app_ready: the TIES merge to disk failed: {(merged.stderr.strip().splitlines() or ['no message'])[-1]}")
        merge_s = own_seconds(merged.stdout)
    print(f"read both checkpoints once, cold: {read_once:.1f} s; `merge --method ties` to disk: {merge_s:.1f} s (its own time)", flush=True)
    drop_page_cache([tuned, base])

    timeline = Timeline()
    timeline.mark("start")
    import torch

    from studio import StudioError, state
    from studio.settings import Settings

    timeline.mark("imports")
    build = state.build_variant

    def marked(*a: object, **k: object) -> object:  # the original is loaded when the default fused model starts being built
        first = not any(row["stage"] == "original loaded" for row in timeline.stages)
        if first:
            timeline.mark("original loaded")
        variant = build(*a, **k)
        if first:
            timeline.mark("default fused model built in memory")
        return variant

    state.build_variant = marked
    studio = state.Studio(Settings(args.preset, device="cpu", load_4bit=args.four, max_new_tokens=8), log=lambda line: None)
    studio.load()
    assert studio.status.state == "ready", studio.status
    timeline.mark("ready")
    studio.compare("What is the capital of France?")
    timeline.mark("first fused answer")
    studio.base()
    timeline.mark("base LLM loaded")
    t = time.perf_counter()
    try:
        studio.fuse_variant("ties", {}, owner="127.0.0.1/visitor")
        variant_s, refused = time.perf_counter() - t, None
        timeline.mark("a visitor's variant (ties) built")
    except StudioError as err:  # too little memory left for it: the visitor is told so
        variant_s, refused = float("nan"), str(err)
        timeline.mark("a visitor's variant (ties) refused")
        print(f"refused: {refused}", flush=True)
    fused = studio.ready().fused
    inputs = fused._inputs([fused.prompt("Tell me about the sea.", False)], None)
    with torch.inference_mode():
        t = time.perf_counter()
        fused.model.generate(**inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, pad_token_id=fused.tokenizer.pad_token_id)
        tokens_per_s = TOKENS / (time.perf_counter() - t)
    timeline.mark(f"{TOKENS} tokens generated")
    timeline.stop()
    marks = {row["stage"]: row for row in timeline.stages}
    result = {
        "preset": args.preset, "four_bit": args.four, "layers": size["layers"], "read_both_once_s": read_once, "merge_ties_own_s": merge_s,
        "ready_s": marks["ready"]["t_s"], "first_fused_answer_s": marks["first fused answer"]["t_s"], "visitor_variant_s": variant_s,
        "visitor_variant_refused": refused, "tokens_per_s": tokens_per_s, "peak_rss_gib": timeline.peak["VmRSS"], "peak_anon_gib": timeline.peak["RssAnon"], "stages": timeline.stages,
    }
    print(f"ready {result['ready_s']:.1f} s = {result['ready_s'] / read_once:.2f}x reading both once; first fused answer {result['first_fused_answer_s']:.1f} s; "
          f"a visitor's variant {variant_s:.1f} s = {variant_s / merge_s:.2f}x the merge's own time; {tokens_per_s:.2f} tokens/s; "
          f"peak RSS {result['peak_rss_gib']:.2f} GiB (anon {result['peak_anon_gib']:.2f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

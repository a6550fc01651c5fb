"""``python -m fusion.pocket train --out assets/pocket --seed 0``: retrain the pocket pair.
``python -m fusion.pocket sweep``: redo the sweep the app's trade-off plot shows for it."""

import argparse
import json
import tempfile
from pathlib import Path

from ..output import write_whole
from ..presets import ASSETS, get_preset
from ..registry import BASELINES
from .train import train_pocket


def sweep(out: Path) -> None:
    """Neuron-Fusion and every baseline along its strength knob, on the whole probe set
    (``python -m fusion eval --sweep``); only the rows are kept, written whole to ``out``."""
    from ..evaluate import run_sweep

    with tempfile.TemporaryDirectory() as work:
        rows = run_sweep(get_preset("pocket"), ["neu-p-taska", *BASELINES], Path(work))
    write_whole(out, json.dumps(rows, indent=1) + "\n")
    print(f"{len(rows)} rows written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fusion.pocket", description="Train the bundled pocket pair (tiny Vicuna + LLaVA) the way LLaVA-1.5 is made.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="build the world, pretrain the vision encoder and the base LM, run LLaVA's two stages, save the pair")
    train.add_argument("--out", type=Path, default=Path("assets/pocket"))
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2, help="torch threads; the same seed and thread count give the same bytes")
    train.add_argument("--probes", type=Path, default=Path("assets/probes/pocket.json"), help="where to write the held-out probes of the seed's world")
    swept = sub.add_parser("sweep", help="every method along its strength knob on the pocket pair: the rows the app's trade-off plot draws")
    swept.add_argument("--out", type=Path, default=ASSETS / "pocket" / "sweep.json")
    args = parser.parse_args()
    if args.command == "sweep":
        sweep(args.out)
        return
    record = train_pocket(args.out, args.seed, threads=args.threads, probes_file=args.probes)
    print(f"saved to {args.out} in {record['seconds']} s")


main()

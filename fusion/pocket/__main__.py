"""``python -m fusion.pocket train --out assets/pocket --seed 0``: retrain the pocket pair."""

import argparse
from pathlib import Path

from .train import train_pocket


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fusion.pocket", description="Train the bundled pocket pair (tiny Vicuna + LLaVA) the way LLaVA-1.5 is made.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="build the world, pretrain the vision encoder and the base LM, run LLaVA's two stages, save the pair")
    train.add_argument("--out", type=Path, default=Path("assets/pocket"))
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2, help="torch threads; the same seed and thread count give the same bytes")
    train.add_argument("--probes", type=Path, default=Path("assets/probes/pocket.json"), help="where to write the held-out probes of the seed's world")
    args = parser.parse_args()
    record = train_pocket(args.out, args.seed, threads=args.threads, probes_file=args.probes)
    print(f"saved to {args.out} in {record['seconds']} s")


main()

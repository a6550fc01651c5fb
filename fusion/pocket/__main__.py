"""``python -m fusion.pocket train --out assets/pocket --seed 0``: retrain the pocket pair."""

import argparse
from pathlib import Path

from .train import train_pocket


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fusion.pocket", description="Train the bundled pocket pair (tiny Vicuna + LLaVA).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="build the world, train the base LM, tune the LLaVA model on images, save both")
    train.add_argument("--out", type=Path, default=Path("assets/pocket"))
    train.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    record = train_pocket(args.out, args.seed)
    print(f"saved to {args.out} in {record['seconds']} s")


main()

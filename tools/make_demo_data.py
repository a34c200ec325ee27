"""Build the embedded demo dataset from the real photographs bundled with scikit-image.

    python -m tools.make_demo_data data/demo     # -> data/demo/{train,val}/<photo>/*.jpg

What it holds and how it is cut: `pipelines.demo_data`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.demo_data import PHOTOGRAPHS, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path("data/demo"))
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--val-per-class", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.root, args.train_per_class, args.val_per_class, args.seed)
    count = sum(1 for _ in args.root.rglob("*.jpg"))
    print(f"demo dataset: {args.root} ({len(PHOTOGRAPHS)} classes, {count} JPEGs)")


if __name__ == "__main__":
    main()

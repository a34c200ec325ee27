"""Build the embedded demo dataset from the real photographs bundled with scikit-image.

    python -m tools.make_demo_data data/demo     # -> data/demo/{train,val}/<photo>/*.jpg
    python -m tools.make_demo_data --imagenet-like 100000 data/in100k [--classes 10] [--workers 16]  # -> <class>/<n>.jpg

What it holds and how it is cut: `pipelines.demo_data`; the ImageNet-shaped set (sizes, qualities,
modes like ImageNet's): `pipelines.imagenet_like`.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bt_fast.errors import (CliParser, UserError, cli_errors, exit_on_interrupt, expand_home, flat_message, home_path,
                            option_flag, say)

with exit_on_interrupt("while starting"):
    from bt_fast.host import usable_cores
    from pipelines.demo_data import PHOTOGRAPHS, build
    from pipelines.imagenet_like import write_imagenet_like


def _flags(names: list[str]) -> str:
    return " and ".join(option_flag(name) for name in names)


@contextmanager
def _writing(what: str, root: Path, command: str) -> Iterator[None]:
    """An OSError writing `root` (the folder, a file in it, or a folder above it that mkdir makes) as one line
    that names the absolute path and gives `command`, the command line with a writable DIR, as what to do."""
    try:
        yield
    except OSError as err:
        root = root.absolute()
        failed = Path(err.filename).absolute() if err.filename else None
        if failed is None or not (failed == root or root in failed.parents or failed in root.parents):
            raise  # not a write of `root` (a worker pool's lock in a full /dev/shm names no file): as it is
        raise UserError(f"cannot write {what} into {root} ({failed}: {err.strerror or flat_message(err)}); "
                        f"give a folder you can write to: {command}") from None


def _imagenet_like_line(root: str, count: int, classes: int) -> str:
    """The result line of a `count`-image set of `classes`: image i is in class i % classes, so fewer images than
    classes leave the last classes without a folder until a larger N writes them."""
    made = f"{min(count, classes)} classes, {count} JPEGs"
    if count < classes:
        made += f"; the other {classes - count} of --classes {classes} get images once N is at least {classes}"
    return f"ImageNet-like dataset: {root} ({made})"


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m tools.make_demo_data", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=home_path, nargs="?", default=None,
                        help="demo set: its folder (default data/demo)")
    parser.add_argument("--train-per-class", type=int, default=None, help="demo set: training images per class (default 64)")
    parser.add_argument("--val-per-class", type=int, default=None, help="demo set: validation images per class (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images' draws, at least 0 (default 0)")
    parser.add_argument("--imagenet-like", nargs=2, metavar=("N", "DIR"),
                        help="instead, write N ImageNet-shaped JPEGs into DIR/<class>/ (the first N of the set of "
                             "--seed: give a validation split another --seed, or it holds training images)")
    parser.add_argument("--classes", type=int, default=None, help="classes of the --imagenet-like set (default 10)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes writing the --imagenet-like set (default and cap: the usable cores, "
                             f"{usable_cores()} here)")
    args = parser.parse_args(argv)
    demo, imagenet_like = {"train_per_class": 64, "val_per_class": 16}, {"classes": 10, "workers": usable_cores()}
    own, other = (imagenet_like, demo) if args.imagenet_like else (demo, imagenet_like)
    if any(getattr(args, name) is not None for name in other):
        parser.error(f"{_flags(list(other))} are for {'the demo set' if args.imagenet_like else '--imagenet-like'} only")
    if args.imagenet_like and args.root is not None:
        parser.error(f"--imagenet-like N DIR writes into DIR; the folder {args.root} is for the demo set only")
    args.root = Path("data/demo") if args.root is None else args.root
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, got {args.seed}")
    for name, default in own.items():  # each option's default, and at least 1
        value = default if getattr(args, name) is None else getattr(args, name)
        if value < 1:
            parser.error(f"{_flags([name])} must be at least 1, got {value}")
        setattr(args, name, value)
    if args.imagenet_like:
        count = args.imagenet_like[0]
        try:
            root = expand_home(args.imagenet_like[1])
        except argparse.ArgumentTypeError as err:
            parser.error(f"--imagenet-like N DIR: {err}")
        if not count.isdigit() or int(count) < 1:
            parser.error(f"--imagenet-like N DIR: N must be a number of images, at least 1, got {count!r}")
        kept = f"the images written to {root} are kept and the same command writes the rest"
        again = f"python -m tools.make_demo_data --imagenet-like {count} DIR"
        with cli_errors(OSError), exit_on_interrupt(outcome=kept), _writing("the ImageNet-like set", Path(root), again):
            write_imagenet_like(Path(root), int(count), num_classes=args.classes, seed=args.seed,
                                workers=args.workers)
        print(_imagenet_like_line(root, int(count), args.classes))
        return
    with cli_errors(OSError), exit_on_interrupt(outcome=f"the same command builds {args.root} again"), \
            _writing("the demo set", args.root, "python -m tools.make_demo_data DIR"):
        build(args.root, args.train_per_class, args.val_per_class, args.seed, log=say)
    count = sum(1 for _ in args.root.rglob("*.jpg"))
    print(f"demo dataset: {args.root} ({len(PHOTOGRAPHS)} classes, {count} JPEGs)")


if __name__ == "__main__":
    main()

"""Evaluate a pretrained backbone: weighted k-NN, the paper's linear probe or semi-supervised fine-tuning.

    python -m tools.evaluate --checkpoint runs/demo/checkpoint.pth --data data/demo --mode knn
    python -m tools.evaluate --checkpoint resnet50.pth --data /imagenet --mode linear --no-cache-features
    python -m tools.evaluate --checkpoint resnet50.pth --data /imagenet --mode finetune --train-percent 10
    python -m tools.evaluate --random-init --arch resnet18 --data data/demo --image-size 64
    python -m tools.evaluate --compare --checkpoint runs/demo/checkpoint.pth --data data/demo --json eval.json

Checkpoints: a bt_fast checkpoint.pth or backbone.pth, or any torchvision-style ResNet state dict such as
the official Barlow Twins resnet50.pth (the formats `bt_fast.weights` reads). The arch is inferred
unless --arch is given. The checkpoint.pth of an unfinished run (stopped, or paused by max_steps) is evaluated
as it is, after a `note:` line naming the step and epoch it reached; --json records that as `pretraining`.

Data: `--data DIR` with `train/` and `val/` sub-folders (the demo layout), or `--data TRAIN --val-data VAL`.

The k-NN and linear-probe protocols are those of `bt_fast.evaluation` (k-NN: k=200, T=0.07;
linear probe: 100 epochs, batch 256, lr 0.3, weight decay 1e-6 by default). --cache-features
(the default on CPU) trains the linear layer on features computed once without augmentation.

Fine-tuning (`bt_fast.finetune`) trains the whole backbone and a linear head on a labelled subset with
the official semi-supervised recipe by default: 1% of each class, 20 epochs, batch 256, lr 0.005 for
the backbone and 0.5 for the head, no weight decay, RandomResizedCrop + flip at the checkpoint's
image size. The same defaults run on the CPU: on the demo data (16 training images at 1%, the demo
checkpoint's 48 px) they finish in about a minute (docs/evaluation.md). With --out-dir the run keeps
<out-dir>/finetune.pth after every epoch and the same command resumes it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from bt_fast.config import MAX_IMAGE_SIZE, MAX_SEED, MIN_BATCH_PER_RANK
from bt_fast.errors import (STARTING, CliParser, DataError, UserError, cli_errors, exit_on_interrupt, expand_home,
                             home_path, ignore_interrupts_while_exiting, option_flag, output_file, print_error, say)
from bt_fast.files import check_output_file, same_file
from bt_fast.host import usable_cores
from pipelines.image_folder import is_split_root

with exit_on_interrupt(STARTING):
    from bt_fast.checkpoint import Progress
    from bt_fast.distributed import resolve_device
    from bt_fast.evaluation import EvalSettings, evaluate_backbones
    from bt_fast.files import write_json
    from bt_fast.finetune import CHECKPOINT_NAME, TRAIN_PERCENTS, FinetuneSettings, finetune
    from bt_fast.knn import DEFAULT_K, DEFAULT_TEMPERATURE
    from bt_fast.model import BACKBONE_DIM
    from bt_fast.weights import load_backbone, random_backbone

DEFAULT_IMAGE_SIZE = 224
MODES = ("knn", "linear", "finetune")
# defaults of the options left unset: the linear probe's, and fine-tuning's where they differ
DEFAULTS = {"k": DEFAULT_K, "temperature": DEFAULT_TEMPERATURE, "epochs": 100, "weight_decay": 1e-6, "lr": 0.3,
            "lr_backbone": 0.005, "lr_classifier": 0.5, "train_percent": 1}
FINETUNE_DEFAULTS = {"epochs": 20, "weight_decay": 0.0}
# the options that not every mode reads, and the modes that do
READ_BY = {"k": ("knn",), "temperature": ("knn",), "epochs": ("linear", "finetune"),
           "weight_decay": ("linear", "finetune"), "lr": ("linear",), "cache_features": ("linear",),
           **dict.fromkeys(("lr_backbone", "lr_classifier", "train_percent", "train_list", "out_dir"), ("finetune",))}


def resolve_splits(data: str | Path, val_data: str | Path | None = None) -> tuple[Path, Path]:
    """(train dir, val dir): DATA/train + DATA/val when present, else DATA + --val-data; a DataError naming
    the option whose path is a file or nothing."""
    data = Path(data)
    if val_data is not None:
        for flag, path, split in (("--data", data, "train"), ("--val-data", Path(val_data), "val")):
            if not path.is_dir():
                what = "is a file" if path.is_file() else "does not exist"
                raise DataError(f"{flag} {path} {what}; pass an ImageFolder directory (a sub-directory of images "
                                f"per class)")
            if is_split_root(path):  # its two splits would be two classes, unknown to the other folder
                alone = f", or --data {path} alone" if flag == "--data" else ""
                raise DataError(f"{flag} {path} holds train/ and val/, which would be read as two classes; give "
                                f"{flag} {path / split}{alone}")
        if data.resolve() == Path(val_data).resolve():  # every validation image finds itself among the training ones
            print(f"warning: --val-data {val_data} is the training data (--data): the accuracy is that of images "
                  f"the classifier has seen; pass images held out from training to measure it", file=sys.stderr)
        return data, Path(val_data)
    if (data / "train").is_dir() and (data / "val").is_dir():
        return data / "train", data / "val"
    if data.is_file():
        raise DataError(f"--data {data} is a file; pass a directory with train/ and val/ sub-folders (ImageFolders)")
    if not data.is_dir():
        raise DataError(f"data directory {data} does not exist; pass --data DIR with train/ and val/ sub-folders")
    raise DataError(f"data directory {data} has no train/ and val/ sub-folders; pass them as --data TRAIN --val-data VAL")


def _record(mode: str, accuracy: tuple[float, float], checkpoint: str | None, arch: str,
            settings: EvalSettings | FinetuneSettings, facts: dict[str, Any], random_init: bool,
            index: int, progress: Progress | None = None) -> dict[str, Any]:
    """What --json writes for backbone `index` of the run; `progress`: how far the checkpoint's pretraining
    run had come, where it records that."""
    record = {"mode": mode, "top1": round(accuracy[0], 4), "top5": round(accuracy[1], 4),
              "checkpoint": checkpoint, "random_init": random_init,
              "pretraining": progress.to_dict() if progress is not None else None, "arch": arch,
              "image_size": settings.image_size, "train_images": facts["train_images"],
              "val_images": facts["val_images"], "classes": facts["classes"]}
    if mode == "knn":
        record.update(k=min(settings.k, facts["train_images"]), temperature=settings.temperature)
    elif mode == "linear":
        record.update(epochs=settings.epochs, lr=settings.lr, weight_decay=settings.weight_decay,
                      cached_features=settings.cache_features)
    else:
        subset = ({"train_list": str(settings.train_list)} if settings.train_list is not None
                  else {"train_percent": settings.train_percent})
        record.update(**subset, epochs=settings.epochs, batch_size=settings.batch_size,
                      lr_backbone=settings.lr_backbone, lr_classifier=settings.lr_classifier,
                      weight_decay=settings.weight_decay, seed=settings.seed,
                      epoch_losses=[round(losses[index], 6) for losses in facts["epoch_losses"]])
    return record


def _method(mode: str, settings: EvalSettings | FinetuneSettings, facts: dict[str, Any]) -> str:
    if mode == "knn":
        return f"k-NN k={min(settings.k, facts['train_images'])} T={settings.temperature:g}"
    if mode == "linear":
        cached = "cached features" if settings.cache_features else "augmented"
        return f"linear {settings.epochs} ep lr={settings.lr:g} {cached}"
    subset = f"list {settings.train_list}" if settings.train_list is not None else f"{settings.train_percent}%"
    resumed = f" (resumed after epoch {facts['resumed_epochs']})" if facts["resumed_epochs"] else ""
    return (f"finetune {subset} {settings.epochs} ep lr backbone={settings.lr_backbone:g} "
            f"classifier={settings.lr_classifier:g}{resumed}")


def format_line(label: str, record: dict[str, Any]) -> str:
    return f"{label:<12} top1 {record['top1']:6.2f}%  top5 {record['top5']:6.2f}%"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the command line asks; prints the result lines and returns what --json writes."""
    device = resolve_device(args.device, setting="--device")
    train_dir, val_dir = resolve_splits(args.data, args.val_data)
    loaded = load_backbone(args.checkpoint, args.arch) if args.checkpoint else None
    if loaded is None and not args.arch:
        raise UserError("--random-init without --checkpoint needs --arch resnet18|resnet50")
    arch = loaded.arch if loaded else args.arch
    image_size = args.image_size or (loaded.image_size if loaded else None) or DEFAULT_IMAGE_SIZE
    if loaded and not args.image_size and loaded.image_size is None:
        print(f"warning: {args.checkpoint} records no training image size (nor does a config.yaml or checkpoint.pth "
              f"beside it); evaluating at {DEFAULT_IMAGE_SIZE} px, pass --image-size if it was trained at another",
              file=sys.stderr)
    progress = loaded.progress if loaded and not args.random_init else None
    if progress is not None and not progress.finished:  # legitimate, but its accuracy is not the run's
        print(f"note: {args.checkpoint} is from an unfinished pretraining run, saved at step {progress.step} of "
              f"{progress.total_steps} ({progress.epoch} of {progress.epochs} epochs complete); evaluating its "
              f"weights as they were then", file=sys.stderr)
    checkpoint = str(args.checkpoint) if args.checkpoint else None

    if args.compare:
        backbones = [loaded.backbone, random_backbone(arch, args.seed)]
    elif args.random_init:
        backbones = [random_backbone(arch, args.seed)]
    else:
        backbones = [loaded.backbone]
    shown = True  # without a terminal, `bt_fast.progress` throttles the bars to a line every half minute
    if args.mode == "finetune":
        settings = FinetuneSettings(image_size=image_size, batch_size=args.batch_size, workers=args.workers,
                                    device=device, epochs=args.epochs, lr_backbone=args.lr_backbone,
                                    lr_classifier=args.lr_classifier, weight_decay=args.weight_decay,
                                    train_percent=args.train_percent, train_list=args.train_list, seed=args.seed,
                                    out_dir=args.out_dir, show_progress=shown)
        results, facts = finetune(backbones, BACKBONE_DIM[arch], train_dir, val_dir, settings)
    else:
        cache = args.cache_features if args.cache_features is not None else device.type == "cpu"
        settings = EvalSettings(mode=args.mode, image_size=image_size, batch_size=args.batch_size,
                                workers=args.workers, device=device, k=args.k, temperature=args.temperature,
                                epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                                cache_features=cache, seed=args.seed, show_progress=shown)
        results, facts = evaluate_backbones(backbones, train_dir, val_dir, settings)
    header = (f"{_method(args.mode, settings, facts)} | {arch} {image_size}px | {facts['train_images']} train / "
              f"{facts['val_images']} val images, {facts['classes']} classes | {facts['seconds']:.1f} s")

    if args.compare:
        pretrained = _record(args.mode, results[0], checkpoint, arch, settings, facts, False, 0, progress)
        baseline = _record(args.mode, results[1], None, arch, settings, facts, True, 1)
        say(header)
        say(f"{format_line('pretrained', pretrained)}  {checkpoint}")
        say(f"{format_line('random init', baseline)}  (seed {args.seed})")
        say(f"{'difference':<12} top1 {pretrained['top1'] - baseline['top1']:+6.2f}   "
              f"top5 {pretrained['top5'] - baseline['top5']:+6.2f}")
        return {"pretrained": pretrained, "random_init": baseline}
    record = _record(args.mode, results[0], None if args.random_init else checkpoint, arch, settings, facts,
                     args.random_init, 0, progress)
    source = f"random init (seed {args.seed})" if args.random_init else checkpoint
    say(f"{format_line(args.mode, record)}  {source} | {header}")
    return record


def _epilog() -> str:
    """The docstring's examples and its fine-tuning paragraph."""
    lines = __doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Fine-tuning"))
    return "\n".join(lines[2:8] + [""] + lines[start:]).rstrip()


def build_parser() -> CliParser:
    p = CliParser(prog="python -m tools.evaluate", description=__doc__.splitlines()[0],
                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    p.add_argument("--checkpoint", type=expand_home,
                   help="bt_fast checkpoint.pth / backbone.pth, or a ResNet state dict")
    p.add_argument("--data", required=True, type=expand_home,
                   help="ImageFolder root with train/ and val/, or the train folder")
    p.add_argument("--val-data", type=expand_home, help="validation ImageFolder when --data has no train/ and val/")
    p.add_argument("--mode", choices=MODES, default="knn")
    p.add_argument("--arch", choices=sorted(BACKBONE_DIM), help="default: the checkpoint's config or its keys")
    p.add_argument("--image-size", type=int,
                   help=f"crop side in pixels, 1 to {MAX_IMAGE_SIZE}; default: augment.image_size of the checkpoint's "
                        f"config, or of its run's config.yaml or checkpoint.pth beside a backbone.pth, else 224. "
                        f"Evaluation resizes images to 8/7 of it (256 for 224, torchvision's ImageNet recipe) and "
                        f"centre-crops them; past {MAX_IMAGE_SIZE}, about twice torchvision's largest pretrained crop "
                        f"(600), ImageNet photographs are only upsampled and a batch outgrows memory")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, help="training epochs (default: linear 100, finetune 20)")
    p.add_argument("--lr", type=float, help="linear probe learning rate (default 0.3)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default: linear 1e-6, finetune 0)")
    p.add_argument("--lr-backbone", type=float, help="finetune: backbone learning rate (default 0.005)")
    p.add_argument("--lr-classifier", type=float, help="finetune: head learning rate (default 0.5)")
    subset = p.add_mutually_exclusive_group()
    subset.add_argument("--train-percent", type=int, choices=TRAIN_PERCENTS,
                        help="finetune: labelled share of each class, drawn with --seed (default 1)")
    subset.add_argument("--train-list", type=home_path,
                        help="finetune: file naming the training images to use, one per line (<class>/<file> or a "
                             "unique file name, as SimCLR's 1%%/10%% ImageNet lists)")
    p.add_argument("--out-dir", type=home_path, help=f"finetune: keep {CHECKPOINT_NAME} here after every epoch and "
                   f"resume from it; a rerun there takes the same settings, --epochs too (the cosine schedule "
                   f"follows it), else name a new --out-dir")
    p.add_argument("--k", type=int, help=f"k-NN neighbours, capped at the train set size (default {DEFAULT_K})")
    p.add_argument("--temperature", type=float, help=f"k-NN vote temperature (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=None,
                   help="linear probe on features computed once without augmentation (default: on for CPU)")
    p.add_argument("--workers", type=int, default=min(8, usable_cores()))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0,
                   help=f"0 to {MAX_SEED}: random-init weights, head init, data order, augmentation and the finetune subset")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--random-init", action="store_true", help="evaluate the untrained arch (the baseline)")
    group.add_argument("--compare", action="store_true",
                       help="evaluate (or fine-tune) --checkpoint and the random-init baseline side by side")
    p.add_argument("--json", type=output_file, help="write the result(s) to this JSON file")
    p.add_argument("--check-args", action="store_true",
                   help="check the arguments, then exit without evaluating (make eval checks the linear probe's "
                        "before its k-NN run)")
    return p


def main(argv: list[str] | None = None) -> int:
    """0 on success; a bad argument or input exits 2 with one `error:` line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.random_init:
        parser.error("--checkpoint is required (or --random-init --arch ARCH for the baseline alone)")
    parser.refuse_unread(args, READ_BY, args.mode, lambda modes: "--mode " + " or ".join(modes))
    for name, value in {**DEFAULTS, **(FINETUNE_DEFAULTS if args.mode == "finetune" else {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.image_size is not None:
        parser.check_range("--image-size", args.image_size, 1, MAX_IMAGE_SIZE, "pixels")
    parser.check_range("--seed", args.seed, 0, MAX_SEED, "(32 bits)")
    for name in ("batch_size", "epochs", "k", "workers"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name != "workers")):
            parser.error(f"{option_flag(name)} must be {'0 or more' if name == 'workers' else 'positive'}, "
                         f"got {value}")
    for name in ("lr", "lr_backbone", "lr_classifier", "temperature", "weight_decay"):
        flag, value = option_flag(name), getattr(args, name)
        if not math.isfinite(value):
            parser.error(f"{flag} must be a finite number, got {value}")
        if value < 0 or (value == 0 and name != "weight_decay"):
            parser.error(f"{flag} must be {'0 or more' if name == 'weight_decay' else 'positive'}, got {value}")
    if args.mode == "finetune" and args.batch_size < MIN_BATCH_PER_RANK:
        parser.error(f"--batch-size must be at least {MIN_BATCH_PER_RANK} for --mode finetune (BatchNorm trains on "
                     f"the statistics of a batch), got {args.batch_size}")
    if args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"--out-dir {args.out_dir} is a file; name a directory")
    if args.out_dir is not None:
        try:
            check_output_file(args.out_dir / CHECKPOINT_NAME)
        except OSError as err:
            parser.error(f"--out-dir {args.out_dir}: cannot write {CHECKPOINT_NAME} there ({err.strerror or err}); "
                         f"name a writable directory")
    read_or_kept = {"--checkpoint": args.checkpoint, "--train-list": args.train_list,
                    f"--out-dir's {CHECKPOINT_NAME}": args.out_dir / CHECKPOINT_NAME if args.out_dir else None}
    for name, path in read_or_kept.items():
        if args.json is not None and path and same_file(args.json, path):
            parser.error(f"--json {args.json} is {name}, which the result would replace; name another file")
    if args.check_args:
        return 0
    try:
        with cli_errors():
            payload = run(args)
            if args.json:
                write_json(args.json, payload)
    except KeyboardInterrupt:
        resume = ""
        if args.mode == "finetune" and args.out_dir is not None:  # (its checkpoint comes at the first epoch's end)
            kept = args.out_dir / CHECKPOINT_NAME
            resume = (f"; run the same command again to resume from {kept}" if kept.is_file() else
                      f"; no epoch had finished, so nothing is kept in {args.out_dir}: the same command starts over")
        print_error(f"interrupted{resume}")
        return 130
    return 0


if __name__ == "__main__":
    code = main()
    ignore_interrupts_while_exiting()
    sys.exit(code)

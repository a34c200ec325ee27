"""Evaluate a pretrained backbone: weighted k-NN or the paper's linear probe, against a random-init baseline.

    python -m tools.evaluate --checkpoint runs/demo/checkpoint.pth --data data/demo --mode knn
    python -m tools.evaluate --checkpoint resnet50.pth --data /imagenet --mode linear --no-cache-features
    python -m tools.evaluate --random-init --arch resnet18 --data data/demo --image-size 64
    python -m tools.evaluate --compare --checkpoint runs/demo/checkpoint.pth --data data/demo --json eval.json

Checkpoints: a bt_fast `checkpoint.pth` (the `backbone.*` weights of `model`; arch and image size
from its `config`), a bt_fast `backbone.pth`, or any torchvision-style ResNet state dict such as the
official Barlow Twins `resnet50.pth` (no `fc.*`; a `fc.*` present is ignored). `module.` and
`_orig_mod.` prefixes (DDP, torch.compile) are stripped, so the official training `checkpoint.pth`
loads too. The arch is inferred from the keys unless --arch is given.

Data: `--data DIR` with `train/` and `val/` sub-folders (the demo layout), or `--data TRAIN --val-data VAL`.

k-NN: frozen backbone in eval mode, resize to size*256/224 + centre crop, L2-normalised features,
cosine similarity, k=200 neighbours weighted by exp(sim/0.07). Linear probe: frozen backbone in eval
mode, a linear layer trained with cross-entropy, SGD momentum 0.9, cosine schedule over the epochs
(100 epochs, batch 256, lr 0.3, weight decay 1e-6 by default), RandomResizedCrop + flip for
training. With --cache-features (the default on CPU) the training images are not augmented:
features are computed once (resize + centre crop) and the linear layer trains on them.
Accuracies are those of the last epoch; nothing is selected on the validation set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bt_fast.knn import (DEFAULT_K, DEFAULT_TEMPERATURE, eval_loader, extract_features_multi, knn_predict,
                         topk_accuracy)
from bt_fast.model import BACKBONE_DIM, make_backbone
from pipelines.base import DataError

STRIPPED_PREFIXES = ("module.", "_orig_mod.")


class EvalError(RuntimeError):
    """Unusable evaluation input; the message names the file or option and what to do."""


class CheckpointFormatError(EvalError):
    """A checkpoint file that holds no usable ResNet backbone; the message names the file."""


# -- checkpoints ----------------------------------------------------------------------------------
@dataclass
class LoadedBackbone:
    backbone: nn.Module
    arch: str
    kind: str                    # "bt_fast checkpoint", "state dict", ...
    image_size: int | None       # training image size recorded in a bt_fast checkpoint's config


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _backbone_state(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    """(backbone state dict without fc, kind, bt_fast config or None) from whatever torch.load returned."""
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict; "
                                    f"pass a bt_fast checkpoint.pth/backbone.pth or a ResNet state dict")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
    if isinstance(obj.get("model"), dict):
        state, kind = obj["model"], "bt_fast checkpoint" if config is not None else "checkpoint"
    elif isinstance(obj.get("state_dict"), dict):
        state, kind = obj["state_dict"], "checkpoint"
    else:
        state, kind = obj, "state dict"
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointFormatError(f"checkpoint {path} is not a model state dict (key '{bad}' holds a "
                                    f"{type(state[bad]).__name__}); pass a bt_fast checkpoint.pth/backbone.pth "
                                    f"or a ResNet state dict")
    state = {_strip(k): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" not in state:
        sample = sorted(state)[:3]
        raise CheckpointFormatError(f"checkpoint {path} holds no ResNet backbone weights (no 'conv1.weight' or "
                                    f"'backbone.conv1.weight'; keys start {sample}); pass a bt_fast "
                                    f"checkpoint.pth/backbone.pth or a torchvision ResNet state dict")
    return state, kind, config


def _mismatch(state: dict[str, torch.Tensor], arch: str) -> str | None:
    """None if `state` loads into `arch` (num_batches_tracked may be absent), else what differs."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in make_backbone(arch).state_dict().items()}
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k]))
    if missing:
        return f"missing {missing[:2]}"
    if unexpected:
        return f"unexpected {unexpected[:2]}"
    if shapes:
        k = shapes[0]
        return f"'{k}' has shape {tuple(state[k].shape)}, {arch} expects {tuple(expected[k])}"
    return None


def infer_arch(state: dict[str, torch.Tensor]) -> str:
    """resnet50 (bottleneck blocks: layer1.0.conv3) or resnet18 (basic blocks)."""
    return "resnet50" if "layer1.0.conv3.weight" in state else "resnet18"


def load_backbone(path: str | Path, arch: str | None = None) -> LoadedBackbone:
    """The frozen-evaluation backbone (fc = Identity) stored in `path`; raises CheckpointFormatError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"checkpoint {path} does not exist; pass the checkpoint.pth or backbone.pth "
                                    f"written by training, or a ResNet state dict")
    if arch is not None and arch not in BACKBONE_DIM:
        raise EvalError(f"--arch {arch} is not supported; choose one of {sorted(BACKBONE_DIM)}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling fails in many exception types; all mean the same to the user
        detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        raise CheckpointFormatError(f"checkpoint {path} cannot be read by torch.load(weights_only=True) "
                                    f"({type(err).__name__}{': ' + detail if detail else ''}); "
                                    f"pass a torch-saved state dict") from None
    state, kind, config = _backbone_state(obj, path)
    config_arch = config.get("arch") if config else None
    if arch and config_arch and arch != config_arch:
        raise CheckpointFormatError(f"checkpoint {path} was trained as {config_arch} (its config), not {arch}; "
                                    f"drop --arch or pass --arch {config_arch}")
    chosen = arch or config_arch or infer_arch(state)
    if chosen not in BACKBONE_DIM:
        raise CheckpointFormatError(f"checkpoint {path} is a {chosen}; only {sorted(BACKBONE_DIM)} are supported")
    problem = _mismatch(state, chosen)
    if problem:
        raise CheckpointFormatError(f"checkpoint {path} does not fit a {chosen} backbone ({problem}); "
                                    f"pass the matching --arch or a resnet18/resnet50 checkpoint")
    backbone = make_backbone(chosen)
    backbone.load_state_dict(state, strict=False)  # only num_batches_tracked can be absent (checked above)
    image_size = None
    if config and isinstance(config.get("augment"), dict):
        image_size = config["augment"].get("image_size")
    return LoadedBackbone(backbone, chosen, kind, int(image_size) if image_size else None)


def random_backbone(arch: str, seed: int = 0) -> nn.Module:
    """The untrained backbone a pretraining run starts from (same constructor), seeded."""
    if arch not in BACKBONE_DIM:
        raise EvalError(f"--arch {arch} is not supported; choose one of {sorted(BACKBONE_DIM)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_backbone(arch)


# -- data -----------------------------------------------------------------------------------------
def resolve_splits(data: str | Path, val_data: str | Path | None = None) -> tuple[Path, Path]:
    """(train dir, val dir): DATA/train + DATA/val when present, else DATA + --val-data."""
    data = Path(data)
    if val_data is not None:
        return data, Path(val_data)
    if (data / "train").is_dir() and (data / "val").is_dir():
        return data / "train", data / "val"
    if not data.is_dir():
        raise DataError(f"data directory {data} does not exist; pass --data DIR with train/ and val/ sub-folders")
    raise DataError(f"data directory {data} has no train/ and val/ sub-folders; pass them as --data TRAIN --val-data VAL")


# -- linear probe ---------------------------------------------------------------------------------
def new_linear(in_dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """The official initialisation: weights N(0, 0.01), bias zero."""
    linear = nn.Linear(in_dim, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
    return linear


def fit_linears(linears: Sequence[nn.Linear], epoch_batches: Callable[[int], Iterable], epochs: int,
                lr: float = 0.3, weight_decay: float = 1e-6, progress: Callable[[int, float], None] | None = None
                ) -> None:
    """Train each linear layer on its own features: `epoch_batches(epoch)` yields (features per layer, labels).

    Cross-entropy, SGD with momentum 0.9, learning rate annealed by a cosine over the epochs
    (stepped once per epoch, as torch's CosineAnnealingLR in the official evaluate.py).
    """
    optimizers = [torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
                  for linear in linears]
    for linear in linears:
        linear.train()
    for epoch in range(epochs):
        epoch_lr = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        total, count = 0.0, 0
        for features, labels in epoch_batches(epoch):
            for linear, optimizer, x in zip(linears, optimizers, features):
                for group in optimizer.param_groups:
                    group["lr"] = epoch_lr
                loss = F.cross_entropy(linear(x), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * labels.shape[0]
            count += labels.shape[0] * len(linears)
        if progress:
            progress(epoch, total / max(count, 1))


def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 100,
                 lr: float = 0.3, weight_decay: float = 1e-6, batch_size: int = 256, seed: int = 0) -> nn.Linear:
    """A linear classifier trained on fixed (N, D) features (the --cache-features probe)."""
    linear = new_linear(features.shape[1], num_classes, seed).to(features.device)
    fit_linears([linear], _cached_batches([features], labels, batch_size, seed), epochs, lr, weight_decay)
    return linear


def _cached_batches(features: Sequence[torch.Tensor], labels: torch.Tensor, batch_size: int,
                    seed: int) -> Callable[[int], Iterator]:
    generator = torch.Generator().manual_seed(seed)

    def batches(epoch: int):
        order = torch.randperm(labels.shape[0], generator=generator).to(labels.device)
        for start in range(0, labels.shape[0], batch_size):
            idx = order[start:start + batch_size]
            yield [x[idx] for x in features], labels[idx]
    return batches


@torch.no_grad()
def linear_topk(linear: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    linear.eval()
    ranked = linear(features).sort(dim=1, descending=True, stable=True).indices
    top1, top5 = topk_accuracy(ranked, labels, (1, 5))
    return top1, top5


# -- evaluation -----------------------------------------------------------------------------------
@dataclass
class Settings:
    mode: str = "knn"
    image_size: int = 224
    batch_size: int = 256
    workers: int = 2
    device: torch.device = torch.device("cpu")
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    epochs: int = 100
    lr: float = 0.3
    weight_decay: float = 1e-6
    cache_features: bool = True
    seed: int = 0
    verbose: bool = False


def _progress(iterable, desc: str, verbose: bool, total: int | None = None):
    if not verbose:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


def evaluate_backbones(backbones: Sequence[nn.Module], train_dir: str | Path, val_dir: str | Path,
                       settings: Settings) -> tuple[list[tuple[float, float]], dict[str, Any]]:
    """Top-1/top-5 (percent) of each frozen backbone; images are decoded once for all of them.

    Returns the accuracies and facts about the run (image counts, classes, seconds).
    """
    start = time.perf_counter()
    device = settings.device
    # channels-last: what the trainer uses, and 3x faster convolutions on CPU than contiguous NCHW
    backbones = [b.to(device, memory_format=torch.channels_last).eval().requires_grad_(False) for b in backbones]
    train_loader = eval_loader(str(train_dir), settings.image_size, settings.batch_size, settings.workers,
                               device=device)
    classes = train_loader.dataset.classes
    val_loader = eval_loader(str(val_dir), settings.image_size, settings.batch_size, settings.workers,
                             classes=classes, device=device)
    v = settings.verbose
    val_x, val_y = extract_features_multi(backbones, _progress(val_loader, "val features", v), device)
    results: list[tuple[float, float]] = []
    if settings.mode == "knn" or settings.cache_features:
        train_x, train_y = extract_features_multi(backbones, _progress(train_loader, "train features", v), device)
    if settings.mode == "knn":
        for tx, vx in zip(train_x, val_x):
            ranked = knn_predict(tx, train_y, vx, len(classes), settings.k, settings.temperature)
            top1, top5 = topk_accuracy(ranked, val_y, (1, 5))
            results.append((top1, top5))
    elif settings.mode == "linear":
        linears = [new_linear(x.shape[1], len(classes), settings.seed).to(device) for x in val_x]
        bar = _progress(range(settings.epochs), "linear probe", v)
        report = (lambda epoch, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}"))) if v else None
        if settings.cache_features:
            batches = _cached_batches(train_x, train_y, settings.batch_size, settings.seed)
        else:
            aug_loader = eval_loader(str(train_dir), settings.image_size, settings.batch_size, settings.workers,
                                     classes=classes, train=True, device=device, seed=settings.seed)

            def batches(epoch: int):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(settings.seed * 1_000_003 + epoch)  # augmentation in the main process
                    for images, labels in aug_loader:
                        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                        with torch.no_grad():
                            features = [b(images).float().flatten(1) for b in backbones]
                        yield features, labels.to(device)
        fit_linears(linears, batches, settings.epochs, settings.lr, settings.weight_decay, report)
        if v:
            bar.close()
        results = [linear_topk(linear, x, val_y) for linear, x in zip(linears, val_x)]
    else:
        raise EvalError(f"--mode {settings.mode} is unknown; choose knn or linear")
    facts = {"train_images": len(train_loader.dataset), "val_images": len(val_loader.dataset),
             "classes": len(classes), "seconds": time.perf_counter() - start}
    return results, facts


def _record(mode: str, accuracy: tuple[float, float], checkpoint: str | None, arch: str, settings: Settings,
            facts: dict[str, Any], random_init: bool) -> dict[str, Any]:
    record = {"mode": mode, "top1": round(accuracy[0], 4), "top5": round(accuracy[1], 4),
              "checkpoint": checkpoint, "random_init": random_init, "arch": arch,
              "image_size": settings.image_size, "train_images": facts["train_images"],
              "val_images": facts["val_images"], "classes": facts["classes"]}
    if mode == "knn":
        record.update(k=min(settings.k, facts["train_images"]), temperature=settings.temperature)
    else:
        record.update(epochs=settings.epochs, lr=settings.lr, weight_decay=settings.weight_decay,
                      cached_features=settings.cache_features)
    return record


def _method(settings: Settings, facts: dict[str, Any]) -> str:
    if settings.mode == "knn":
        return f"k-NN k={min(settings.k, facts['train_images'])} T={settings.temperature:g}"
    cached = "cached features" if settings.cache_features else "augmented"
    return f"linear {settings.epochs} ep lr={settings.lr:g} {cached}"


def format_line(label: str, record: dict[str, Any]) -> str:
    return f"{label:<12} top1 {record['top1']:6.2f}%  top5 {record['top5']:6.2f}%"


def _write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda was requested but torch sees no CUDA device; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise EvalError(f"--device {name} is unknown; choose auto, cpu or cuda")
    return torch.device(name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the command line asks; prints the result lines and returns what --json writes."""
    device = pick_device(args.device)
    loaded = load_backbone(args.checkpoint, args.arch) if args.checkpoint else None
    if loaded is None and not args.arch:
        raise EvalError("--random-init without --checkpoint needs --arch resnet18|resnet50")
    arch = loaded.arch if loaded else args.arch
    image_size = args.image_size or (loaded.image_size if loaded else None) or 224
    cache = args.cache_features if args.cache_features is not None else device.type == "cpu"
    settings = Settings(mode=args.mode, image_size=image_size, batch_size=args.batch_size, workers=args.workers,
                        device=device, k=args.k, temperature=args.temperature, epochs=args.epochs, lr=args.lr,
                        weight_decay=args.weight_decay, cache_features=cache, seed=args.seed,
                        verbose=sys.stderr.isatty())
    train_dir, val_dir = resolve_splits(args.data, args.val_data)
    checkpoint = str(args.checkpoint) if args.checkpoint else None

    if args.compare:
        backbones = [loaded.backbone, random_backbone(arch, args.seed)]
    elif args.random_init:
        backbones = [random_backbone(arch, args.seed)]
    else:
        backbones = [loaded.backbone]
    results, facts = evaluate_backbones(backbones, train_dir, val_dir, settings)
    header = (f"{_method(settings, facts)} | {arch} {image_size}px | {facts['train_images']} train / "
              f"{facts['val_images']} val images, {facts['classes']} classes | {facts['seconds']:.1f} s")

    if args.compare:
        pretrained = _record(args.mode, results[0], checkpoint, arch, settings, facts, False)
        baseline = _record(args.mode, results[1], None, arch, settings, facts, True)
        print(header)
        print(f"{format_line('pretrained', pretrained)}  {checkpoint}")
        print(f"{format_line('random init', baseline)}  (seed {args.seed})")
        print(f"{'difference':<12} top1 {pretrained['top1'] - baseline['top1']:+6.2f}   "
              f"top5 {pretrained['top5'] - baseline['top5']:+6.2f}")
        return {"pretrained": pretrained, "random_init": baseline}
    record = _record(args.mode, results[0], None if args.random_init else checkpoint, arch, settings, facts,
                     args.random_init)
    source = f"random init (seed {args.seed})" if args.random_init else checkpoint
    print(f"{format_line(args.mode, record)}  {source} | {header}")
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:7]))
    p.add_argument("--checkpoint", help="bt_fast checkpoint.pth / backbone.pth, or a ResNet state dict")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or the train folder")
    p.add_argument("--val-data", help="validation ImageFolder when --data has no train/ and val/")
    p.add_argument("--mode", choices=("knn", "linear"), default="knn")
    p.add_argument("--arch", choices=sorted(BACKBONE_DIM), help="default: the checkpoint's config or its keys")
    p.add_argument("--image-size", type=int, help="default: the checkpoint config's augment.image_size, else 224")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    p.add_argument("--lr", type=float, default=0.3, help="linear probe learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="linear probe weight decay")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="k-NN neighbours (capped at the train set size)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="k-NN vote temperature")
    p.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=None,
                   help="linear probe on features computed once without augmentation (default: on for CPU)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0, help="random-init weights, linear init and data order")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--random-init", action="store_true", help="evaluate the untrained arch (the baseline)")
    group.add_argument("--compare", action="store_true",
                       help="evaluate --checkpoint and the random-init baseline side by side")
    p.add_argument("--json", help="write the result(s) to this JSON file")
    return p


def one_line(err: BaseException) -> str:
    """The message of `err` on one line; for an error re-raised from a DataLoader worker, the original's."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    if lines[0].startswith("Caught ") and len(lines) > 1:  # "Caught DataError in DataLoader worker ..."
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return lines[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.random_init:
        parser.error("--checkpoint is required (or --random-init --arch ARCH for the baseline alone)")
    for name in ("image_size", "batch_size", "epochs", "k", "workers"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name != "workers")):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.lr <= 0 or args.temperature <= 0 or args.weight_decay < 0:
        parser.error("--lr and --temperature must be positive and --weight-decay non-negative")
    try:
        payload = run(args)
        if args.json:
            _write_json(args.json, payload)
    except (EvalError, DataError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

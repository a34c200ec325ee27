"""Frozen evaluation of several backbones side by side: weighted k-NN or the linear probe.

Every backbone runs in eval mode on the same decoded images (resize to size*256/224, centre
crop). k-NN: `bt_fast.knn` on L2-normalised features. Linear probe: `bt_fast.linear_probe`, on
features computed once without augmentation (`cache_features`) or on RandomResizedCrop + flip
images every epoch. Accuracies are those of the last epoch; nothing is selected on the
validation set.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from bt_fast.knn import (DEFAULT_K, DEFAULT_TEMPERATURE, eval_loader, extract_features_multi, knn_predict,
                         topk_accuracy)
from bt_fast.linear_probe import cached_batches, fit_linears, linear_topk, new_linear
from bt_fast.progress import progress

MODES = ("knn", "linear")


@dataclass
class EvalSettings:
    mode: str = "knn"
    image_size: int = 224
    batch_size: int = 256
    workers: int = 2
    device: torch.device = torch.device("cpu")
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    epochs: int = 100                 # linear probe
    lr: float = 0.3                   # linear probe
    weight_decay: float = 1e-6        # linear probe
    cache_features: bool = True       # linear probe on features computed once, without augmentation
    seed: int = 0                     # linear init and training order
    show_progress: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"evaluation mode must be one of {MODES}, got '{self.mode}'")


def evaluate_backbones(backbones: Sequence[nn.Module], train_dir: str | Path, val_dir: str | Path,
                       settings: EvalSettings) -> tuple[list[tuple[float, float]], dict[str, Any]]:
    """Top-1/top-5 (percent) of each frozen backbone; images are decoded once for all of them.

    `train_dir` and `val_dir` are ImageFolders with the same class sub-directories. Returns the
    accuracies, one pair per backbone, and facts about the run: train_images, val_images,
    classes, seconds.
    """
    start = time.perf_counter()
    device = settings.device
    # channels-last: what the trainer uses, and faster convolutions on the CPU than contiguous NCHW
    backbones = [b.to(device, memory_format=torch.channels_last).eval().requires_grad_(False) for b in backbones]
    train_loader = eval_loader(str(train_dir), settings.image_size, settings.batch_size, settings.workers,
                               device=device)
    classes = train_loader.dataset.classes
    val_loader = eval_loader(str(val_dir), settings.image_size, settings.batch_size, settings.workers,
                             classes=classes, device=device)
    shown = settings.show_progress
    val_x, val_y = extract_features_multi(backbones, progress(val_loader, desc="val features", enabled=shown),
                                          device)
    if settings.mode == "knn" or settings.cache_features:
        train_x, train_y = extract_features_multi(
            backbones, progress(train_loader, desc="train features", enabled=shown), device)
    if settings.mode == "knn":
        results = []
        for tx, vx in zip(train_x, val_x):
            ranked = knn_predict(tx, train_y, vx, len(classes), settings.k, settings.temperature)
            top1, top5 = topk_accuracy(ranked, val_y, (1, 5))
            results.append((top1, top5))
    else:
        linears = [new_linear(x.shape[1], len(classes), settings.seed).to(device) for x in val_x]
        if settings.cache_features:
            batches = cached_batches(train_x, train_y, settings.batch_size, settings.seed)
        else:
            batches = _augmented_batches(backbones, str(train_dir), classes, settings)
        with progress(total=settings.epochs, desc="linear probe", enabled=shown) as bar:
            fit_linears(linears, batches, settings.epochs, settings.lr, settings.weight_decay,
                        lambda epoch, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
        remedy = f"lower --lr ({settings.lr:g})"
        results = [linear_topk(linear, x, val_y, remedy) for linear, x in zip(linears, val_x)]
    facts = {"train_images": len(train_loader.dataset), "val_images": len(val_loader.dataset),
             "classes": len(classes), "seconds": time.perf_counter() - start}
    return results, facts


def _augmented_batches(backbones: Sequence[nn.Module], train_dir: str, classes: Sequence[str],
                       settings: EvalSettings):
    """Each epoch's (features per backbone, labels) of freshly augmented training images."""
    device = settings.device
    loader = eval_loader(train_dir, settings.image_size, settings.batch_size, settings.workers,
                         classes=classes, train=True, device=device, seed=settings.seed)

    def batches(epoch: int):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(settings.seed * 1_000_003 + epoch)  # augmentation, in this process
            for images, labels in loader:
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    features = [b(images).float().flatten(1) for b in backbones]
                yield features, labels.to(device)
    return batches

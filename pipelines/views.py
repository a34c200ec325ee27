"""Pictures of what a pipeline feeds the network: view-1/view-2 pairs, de-normalised, side by side.

The same grid goes to TensorBoard at the start of a run and to `python -m tools.preview`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torchvision.utils
from PIL import Image

from bt_fast.config import AugmentSpec, Config
from bt_fast.errors import DataError
from bt_fast.files import atomic_write
from bt_fast.host import usable_cores
from pipelines import build_pipeline
from pipelines.base import Placement

PAIRS_PER_ROW = 4


def denormalise(views: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """Undo the pipelines' normalisation: (B, 3, H, W) in any dtype or layout -> float32 in [0, 1] on the CPU."""
    views = views.detach().float().cpu().contiguous()
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (views * std + mean).clamp(0.0, 1.0)


def pair_grid(view1: torch.Tensor, view2: torch.Tensor, spec: AugmentSpec, pairs: int = 8) -> torch.Tensor:
    """The first `pairs` pairs as one uint8 (H, W, 3) image: each pair is view 1 then view 2, left to right,
    PAIRS_PER_ROW pairs to a row."""
    pairs = min(pairs, len(view1))
    tiles = torch.stack([denormalise(view1[:pairs], spec), denormalise(view2[:pairs], spec)], dim=1).flatten(0, 1)
    grid = torchvision.utils.make_grid(tiles, nrow=2 * min(pairs, PAIRS_PER_ROW), padding=2, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def first_pairs(config: Config, device: torch.device, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `pairs` view pairs that training on one process feeds in epoch 0, in float32.

    The pipeline `config` names is built as the trainer builds it, with batches of `config.batch_size`,
    and its batches are taken in order until `pairs` pairs are in hand (past the first batch when `pairs`
    is larger). Training in an autocast dtype rounds the same views to it. DataError if epoch 0 feeds
    fewer pairs (its full batches). With at most one worker per core: the views do not depend on the
    count, and for a few batches more workers than cores only start slower."""
    config = dataclasses.replace(config, workers=min(config.workers, usable_cores()))
    pipeline = build_pipeline(config, Placement(device), config.batch_size)
    fed = len(pipeline) * pipeline.batch_size
    if pairs > fed:
        raise DataError(f"the {config.pipeline} pipeline feeds {fed} pairs in epoch 0 ({len(pipeline)} batches of "
                        f"batch_size={config.batch_size}); ask for at most {fed} pairs")
    pipeline.set_epoch(0)
    view1, view2, taken = [], [], 0
    with contextlib.closing(iter(pipeline)) as batches:  # ends the loader's work on the batches not shown
        for batch1, batch2 in batches:
            keep = min(len(batch1), pairs - taken)
            view1.append(batch1[:keep].clone())  # a copy: a pipeline may reuse its buffers a few batches later
            view2.append(batch2[:keep].clone())
            taken += keep
            if taken == pairs:
                break
    return torch.cat(view1), torch.cat(view2)


def write_png(path: str | Path, image: torch.Tensor) -> Path:
    """Write a uint8 (H, W, 3) image to `path` as a PNG, atomically."""
    picture = Image.fromarray(image.numpy())
    return atomic_write(path, lambda handle: picture.save(handle, format="PNG"))

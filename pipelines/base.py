"""The one interface every data pipeline implements.

A pipeline is an iterable over one epoch of `(view1, view2)` batches that are already
on the training device, in channels-last layout, normalised, and in the input dtype.
The trainer and the benchmark use nothing else, so pipelines are interchangeable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from bt_fast.config import Config
from bt_fast.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


class DataError(UserError):
    """Unusable input data; the message names the file or directory and what to do."""


@dataclass(frozen=True)
class Placement:
    """Where a pipeline delivers: device, dtype and which shard of the data it reads."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    rank: int = 0
    world_size: int = 1


class TwoViewPipeline(Protocol):
    batch_size: int  # per rank

    def __len__(self) -> int:
        """Batches per epoch on this rank."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Reseed shuffling and augmentation for `epoch` (same order on every rank). The next iteration
        yields batches `start_batch`, `start_batch + 1`, ... of the epoch, equal to those an iteration from
        batch 0 would yield there (a run resumed mid-epoch)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (view1, view2), each (B, 3, H, W) on the device, channels-last, normalised. Closing the
        iterator early ends the epoch's background work."""


class EpochPipeline:
    """The state a pipeline that is rebuilt or reseeded per epoch keeps from its construction."""

    def __init__(self, config: Config, placement: Placement, batch_size: int):
        self.config = config
        self.spec = config.augment
        self.placement = placement
        self.batch_size = batch_size
        self.seed = config.seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        check_start_batch(start_batch, len(self))
        self.epoch, self.start_batch = epoch, start_batch


def check_start_batch(start_batch: int, batches: int) -> None:
    """ValueError unless `start_batch` lies in an epoch of `batches` batches (`set_epoch`'s argument)."""
    if not 0 <= start_batch <= batches:
        raise ValueError(f"start batch {start_batch} outside the epoch's {batches} batches")


def find_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-directories) and (path, label) samples of an ImageFolder.

    A class's images are the files (and symbolic links) with an image suffix anywhere below its
    directory, not following linked directories, in `sorted(Path.rglob('*'))` order. Raises
    DataError with the directory named if it is missing or holds no images.
    """
    root = Path(root)
    if root.is_file():
        raise DataError(f"data {root} is a file; give the ImageFolder directory (or, with pipeline=ffcv, a .beton)")
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; pass DATA=/path/to/imagefolder or omit it for the demo")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [(path, label) for label, name in enumerate(classes) for path in _images_below(str(root / name))]
    if not samples:
        raise DataError(f"data directory {root} holds no images in class sub-directories (expected {root}/<class>/<image>.jpg)")
    return classes, samples


def _has_image_suffix(name: str) -> bool:
    """`Path(name).suffix in IMAGE_SUFFIXES` for a lower-case name (a leading dot starts no suffix)."""
    return name.endswith(IMAGE_SUFFIXES) and name.rfind(".") > 0


def _images_below(directory: str) -> list[str]:
    """Image paths below `directory`, ordered as sorted Paths (by their parts); one scandir per
    directory and no stat per file, which is what keeps a million-image scan to seconds."""
    found: list[tuple[tuple[str, ...], str]] = []
    pending = [(directory, ())]
    while pending:
        current, parts = pending.pop()
        try:
            entries = os.scandir(current)
        except PermissionError:  # skipped, as Path.rglob skips it
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, parts + (entry.name,)))
                elif (_has_image_suffix(entry.name.lower())
                      and (entry.is_file() or entry.is_symlink())):
                    found.append((parts + (entry.name,), entry.path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def to_device(view: torch.Tensor, placement: Placement) -> torch.Tensor:
    view = view.to(placement.device, non_blocking=True)
    return view.to(dtype=placement.dtype, memory_format=torch.channels_last)

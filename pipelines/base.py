"""The one interface every data pipeline implements.

A pipeline is an iterable over one epoch of `(view1, view2)` batches that are already
on the training device, in channels-last layout, normalised, and in the input dtype.
The trainer and the benchmark use nothing else, so pipelines are interchangeable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from bt_fast.config import Config


@dataclass(frozen=True)
class Placement:
    """Where a pipeline delivers: device, dtype and which shard of the data it reads."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    rank: int = 0
    world_size: int = 1


class TwoViewPipeline(Protocol):
    batch_size: int  # per rank
    num_samples: int  # images of the dataset, which the epoch order of all ranks together permutes

    def __len__(self) -> int:
        """Batches per epoch on this rank."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Reseed shuffling and augmentation for `epoch` (same order on every rank). The next iteration
        yields batches `start_batch`, `start_batch + 1`, ... of the epoch, equal to those an iteration from
        batch 0 would yield there (a run resumed mid-epoch)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (view1, view2), each (B, 3, H, W) on the device, channels-last, normalised. Closing the
        iterator early ends the epoch's background work."""

    def position_state(self) -> dict | None:
        """Between two batches of an epoch being iterated: what, beyond (seed, epoch, batch), a resumed run
        needs to go on from here exactly (picklable; a checkpoint keeps it). None when nothing more is
        needed, as between epochs."""

    def restore_position(self, state: dict | None) -> None:
        """A `position_state` for the next `set_epoch`: used if that names the same epoch and batch."""


class EpochPipeline:
    """The state a pipeline that is rebuilt or reseeded per epoch keeps from its construction. Its
    batches are functions of (seed, epoch, batch) unless it overrides `position_state`."""

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

    def position_state(self) -> dict | None:
        return None

    def restore_position(self, state: dict | None) -> None:
        pass


def check_start_batch(start_batch: int, batches: int) -> None:
    """ValueError unless `start_batch` lies in an epoch of `batches` batches (`set_epoch`'s argument)."""
    if not 0 <= start_batch <= batches:
        raise ValueError(f"start batch {start_batch} outside the epoch's {batches} batches")


def to_device(view: torch.Tensor, placement: Placement) -> torch.Tensor:
    view = view.to(placement.device, non_blocking=True)
    return view.to(dtype=placement.dtype, memory_format=torch.channels_last)

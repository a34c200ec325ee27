"""Epoch order for every pipeline: the per-epoch seeds, each rank's samples, the minimum size.

The one convention: an epoch's global order is a permutation of all N samples derived from
(seed, epoch) alone, so it is identical on every rank; rank r reads the r-th contiguous block of
N // world_size entries of it. Each sample goes to at most one rank per epoch, every rank gets
the same number of samples, and the N % world_size samples left at the end of the order are not
read that epoch (a different few each epoch). A pipeline with its own global order (FFCV's
page-local quasi-random order) hands that order to `rank_block` and keeps the same sharding.

Streams separate the random numbers drawn from one (seed, epoch): stream `ORDER_STREAM` is the
sample order; pipelines number their other streams (crop seeds, augmentation generators) above it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from bt_fast.errors import DataError

ORDER_STREAM = 0


def epoch_seed(seed: int, epoch: int, stream: int = ORDER_STREAM) -> int:
    """A 31-bit seed for (seed, epoch, stream), the same on every rank."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, stream]).generate_state(1)[0]) & 0x7FFFFFFF


@contextmanager
def sample_rng(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Inside the block, torch's global generator (which torchvision's transforms draw from) is
    seeded from (seed, epoch, index) alone; outside it is left as it was. The CUDA generators are
    not touched (`torch.manual_seed` would reseed every GPU's, per sample)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(hash((seed, epoch, index)) % 2**63)
        yield


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's global order: a permutation of range(num_samples) from (seed, epoch) only."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, ORDER_STREAM]).permutation(num_samples)


def rank_block(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s share of a global order: its contiguous block of len(order) // world_size entries."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    per_rank = len(order) // world_size
    return order[rank * per_rank:(rank + 1) * per_rank]


def rank_indices(num_samples: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """The sample indices rank `rank` reads in `epoch`, in reading order."""
    return rank_block(epoch_order(num_samples, seed, epoch), rank, world_size)


class TooFewSamples(DataError):
    """Fewer samples per rank than one batch; `where` and `num_samples` say which data and how many."""

    def __init__(self, where: str, num_samples: int, batch_size: int, world_size: int):
        super().__init__(f"{where} has {num_samples} images: too few for one batch of {batch_size} per rank "
                         f"on {world_size} rank(s); lower batch_size")
        self.where, self.num_samples = where, num_samples


def samples_per_rank(num_samples: int, batch_size: int, world_size: int, where: str) -> int:
    """Samples each rank reads per epoch; TooFewSamples if that is less than one batch."""
    per_rank = num_samples // world_size
    if per_rank < batch_size:
        raise TooFewSamples(where, num_samples, batch_size, world_size)
    return per_rank

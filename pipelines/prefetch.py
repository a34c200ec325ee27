"""Run a pipeline's device stage ahead of the training step.

`run_ahead(host_batches, device_stage, depth, device)` yields `device_stage(batch)` for each host
batch, with the device stage of up to `depth` later batches already issued:

- On CUDA the device stage runs on a side stream, so the copy, crop and augmentation of batch N+1
  overlap the step of batch N on the current stream. Each delivered batch is fenced: the
  consumer's stream waits (on the GPU, not the host) for the event recorded after the batch's
  work, and `record_stream` tells the caching allocator that the consumer's stream uses the
  tensors, so their memory is not reused by the side stream before the step is done with them.
  The host batches are also taken on the side stream: an FFCV epoch iterator, created on the first
  `next`, then fences its buffers against the side stream, where they are read.
- On the CPU the same work runs in the same order, eagerly. Random draws happen in batch order
  whatever `depth` is, so the delivered tensors do not depend on it (`depth=0`: no run-ahead).

Nothing here synchronises the host with the device; a stage may (TorchCodec's decode does: docs/pipelines.md).
"""
from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from typing import Callable, Iterable, Iterator, TypeVar

import torch

Views = TypeVar("Views", bound=tuple)


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def run_ahead(host_batches: Iterable, device_stage: Callable[..., Views], depth: int,
              device: torch.device) -> Iterator[Views]:
    """`device_stage(batch)` for each of `host_batches`, issued up to `depth` batches early (module docstring).

    Closing the returned generator closes `host_batches` (if it is a generator) after the issued work.
    """
    if depth < 0:
        raise ValueError(f"prefetch depth must be 0 or positive, got {depth}")
    side = torch.cuda.Stream(device) if device.type == "cuda" else None  # GPU only
    on_side = (lambda: torch.cuda.stream(side)) if side is not None else nullcontext
    pending: deque = deque()
    batches = iter(host_batches)
    try:
        while True:
            with on_side():
                batch = next(batches, None)
                if batch is not None:
                    views = device_stage(batch)
                    ready = side.record_event() if side is not None else None
                    pending.append((views, ready))
            if batch is None and not pending:
                return
            if batch is not None and len(pending) <= depth:
                continue
            views, ready = pending.popleft()
            if ready is not None:  # GPU only: fence the batch for the consumer's stream
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(ready)
                for tensor in _tensors(views):
                    tensor.record_stream(consumer)
            yield views
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            with on_side():
                close()

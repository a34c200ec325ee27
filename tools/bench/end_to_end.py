"""The `end_to_end` section (`--end-to-end`): the real training step fed by each pipeline, against
the same step fed synthetic device tensors of the same shape.

Each pipeline runs in a fresh process (`train_step.train_in_child`), as training runs it. There the
trainer (`bt_fast.trainer.Trainer`, its model, optimizer and pipeline, built from the run's config)
first takes its warm-up and timed steps on synthetic views already on the device, then the same
numbers of steps on the pipeline's batches. Per pipeline:

  images_per_s        images of the timed steps / timed_seconds (the first timed step's request
                      for its batch to the end of the last step, on the device's timeline)
  vs_synthetic        images_per_s / synthetic.images_per_s (the same trainer, the same shapes)
  data_wait_fraction  wait_seconds / timed_seconds; wait_seconds sums, over the timed steps, the
                      time from a step asking for its batch to the batch being ready for it
  host_cores_busy     host_cpu_seconds / wall_seconds: CPU seconds of the process, its threads and
                      its loader worker processes (`measure.tree_cpu_seconds`) per wall second of
                      the timed steps
  peak_gpu_memory_gib CUDA only: the allocator's peak over the timed steps (after the warm-up, whose first
                      step's cuDNN autotuning takes workspaces that no later step needs)

The times come from the trainer's own step clock (`bt_fast.step_clock`), marked as the trainer's loop
marks them: on CUDA, events on the step's stream, since nothing in the timed loop syncs with the host
and host timers would measure the host running ahead, not the device waiting. The step is
`Trainer.train_step`, as the trainer's loop calls it; the loss is not read.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from typing import Any, Iterator, Sequence

import torch

from bt_fast.errors import one_line
from bt_fast.trainer import Trainer
from tools.bench.loaders import LOADERS, batch_stream
from tools.bench.measure import BenchError, tree_cpu_seconds
from tools.bench.train_step import clocked_steps, make_trainer, train_in_child, warm_up

# The entries end to end: the loader table's modes, with FFCV in its default mode (ffcv.crop=auto:
# the device crop on CUDA, the host crop on the CPU).
MODES: dict[str, tuple[str, tuple[str, ...]]] = {**LOADERS, "ffcv": ("ffcv", ())}
DEFAULT_PIPELINES = ("reference", "ffcv", "ffcv_device_decode", "dali")


def timed_steps(trainer: Trainer, batches: Iterator, steps: int, warmup: int) -> dict[str, Any]:
    """`steps` training steps on `batches` after `warmup` untimed ones: the figures of the module docstring.

    A step lasts from the previous step's end (the clock's start, for the first) to its own end, and
    waits from there until its batch is ready; on CUDA "ready" is when the step's stream may use it.
    """
    warm_up(trainer, batches, warmup)
    device = trainer.ctx.device
    if device.type == "cuda":  # GPU only
        torch.cuda.reset_peak_memory_stats(device)
    cpu0, wall0 = tree_cpu_seconds(), time.perf_counter()
    step_and_wait, y1 = clocked_steps(trainer, batches, steps)  # on CUDA: waits for the last step
    wall, cpu = time.perf_counter() - wall0, tree_cpu_seconds() - cpu0
    timed, wait = (sum(column) for column in zip(*step_and_wait))
    images = steps * y1.shape[0]
    shape = (tuple(y1.shape), y1.dtype, y1.is_contiguous(memory_format=torch.channels_last))
    figures = {"images_per_s": images / timed, "data_wait_fraction": wait / timed, "host_cores_busy": cpu / wall,
               "images": images, "steps": steps, "timed_seconds": timed, "wait_seconds": wait,
               "host_cpu_seconds": cpu, "wall_seconds": wall, "views": shape}
    if device.type == "cuda":  # GPU only
        figures["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return figures


def synthetic_views(trainer: Trainer, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normal-random views of the pipeline's delivery: (local batch, 3, S, S), channels-last, the input dtype."""
    size = trainer.config.augment.image_size
    shape = (trainer.local_batch, 3, size, size)
    g = torch.Generator().manual_seed(seed)
    dtype = trainer.amp_dtype or torch.float32  # what the pipelines deliver (bt_fast.train's Placement)
    return tuple(torch.randn(shape, generator=g).to(trainer.ctx.device, dtype=dtype, memory_format=torch.channels_last)
                 for _ in range(2))


def _views(entry: dict) -> tuple:
    shape, dtype, channels_last = entry.pop("views")
    return shape, str(dtype), channels_last


def end_to_end_pipeline(args: argparse.Namespace, name: str) -> dict:
    """end_to_end.<name>, measured in this process (the child of `train_in_child`)."""
    try:
        trainer = make_trainer(args, name, MODES)
    except Exception as err:  # noqa: BLE001 - reported in the section
        return {"unavailable": f"{type(err).__name__}: {one_line(err)}"}
    y1, y2 = synthetic_views(trainer, args.seed)
    synthetic = timed_steps(trainer, iter(lambda: (y1, y2), None), args.train_steps, args.train_warmup)
    del y1, y2
    stream = batch_stream(trainer.pipeline)
    try:
        entry = timed_steps(trainer, stream, args.train_steps, args.train_warmup)
    except Exception as err:  # noqa: BLE001 - reported in the section
        traceback.print_exc(file=sys.stderr)
        return {"unavailable": f"failed while training: {type(err).__name__}: {one_line(err)}"}
    finally:
        stream.close()
    views, expected = _views(entry), _views(synthetic)
    if views != expected:
        raise BenchError(f"pipeline {name} delivered views {views}; the synthetic views are {expected}")
    entry["vs_synthetic"] = entry["images_per_s"] / synthetic["images_per_s"]
    entry["synthetic"] = synthetic
    entry["mode"] = ", ".join(f"{key}={getattr(trainer.pipeline, key)}" for key in ("decode", "crop")
                              if isinstance(getattr(trainer.pipeline, key, None), str))
    del trainer, stream
    gc.collect()
    return entry


def bench_end_to_end(args: argparse.Namespace, pipelines: Sequence[str]) -> dict:
    """The section: the settings, then one entry per pipeline (`{"unavailable": reason}` where it cannot run)."""
    out: dict[str, Any] = {
        "model": f"{args.arch} + {args.projector} projector", "image_size": args.train_image_size,
        "batch_size": args.train_batch_size, "amp": args.amp, "steps": args.train_steps,
        "warmup_steps": args.train_warmup, "data": str(args.data), "device": str(args.device),
        "timeline": "CUDA events" if args.device.type == "cuda" else "host clock",
    }
    for name in pipelines:
        out[name] = train_in_child(args, name)
    return out

"""The `train_step` section: images/s of `Trainer.train_step`, fed synthetic batches and by each pipeline.

Synthetic batches are device-resident; each pipeline feeds the trainer in a fresh process (as
training runs it), with the data-stall fraction per step (time waiting for the batch over the
whole step, as `bt_fast.train` logs it). The steps are timed by the trainer's step clock, with no
host sync between them. `{"skipped": reason}` for pipelines not in
--train-pipelines, `{"unavailable": reason}` for those that cannot run.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from bt_fast.distributed import DistContext
from bt_fast.errors import DataError, one_line
from bt_fast.step_clock import StepClock
from bt_fast.trainer import Trainer
from tools.bench.loaders import LOADERS, batch_stream, pipeline_config
from tools.bench.measure import rate_stats, stats, sync


def make_trainer(args: argparse.Namespace, name: str, modes: dict = LOADERS) -> Trainer:
    """A trainer for entry `name` of `modes` with the training-step model settings (--arch, --projector, --amp)."""
    extra = [f"arch={args.arch}", f"projector={args.projector}", f"amp={args.amp}", "epochs=100",
             "warmup_epochs=1", "compile_optimizer=false"]
    config = pipeline_config(args, name, args.train_image_size, args.train_batch_size, extra, modes)
    config.device = args.device.type
    return Trainer(config, DistContext(rank=0, local_rank=0, world_size=1, device=args.device))


def warm_up(trainer: Trainer, batches: Iterator, steps: int) -> None:
    """`steps` untimed training steps on `batches`, then a device sync: what follows starts on an idle device."""
    for _ in range(steps):
        trainer.train_step(*next(batches))
        trainer.step += 1
    sync(trainer.ctx.device)


def clocked_steps(trainer: Trainer, batches: Iterator, steps: int) -> tuple[list[tuple[float, float]], torch.Tensor]:
    """(step seconds, data-wait seconds) of each of `steps` training steps on `batches`, and the last step's first
    view. Timed as the trainer's loop times its steps, by its step clock (`bt_fast.step_clock`): on CUDA events
    on the step's stream, and nothing is read on the host until the last step is issued, so the host runs ahead
    of the device as in training."""
    clock = StepClock(trainer.ctx.device)
    clock.start()
    for _ in range(steps):
        y1, y2 = next(batches)
        clock.data_ready()
        trainer.train_step(y1, y2)
        trainer.step += 1
        clock.step_done()
    return clock.read(), y1


def train_steps(trainer: Trainer, batches: Iterator, steps: int, warmup: int) -> tuple[list[float], list[float], int]:
    """(step seconds incl. the wait for the batch, wait seconds, batch size) of `steps` steps after `warmup` steps."""
    warm_up(trainer, batches, warmup)
    step_and_wait, y1 = clocked_steps(trainer, batches, steps)
    totals, waits = (list(column) for column in zip(*step_and_wait))
    return totals, waits, y1.shape[0]


def train_with_pipeline(args: argparse.Namespace, name: str) -> dict:
    """train_step.<name>: steps fed by the pipeline, timed as `bt_fast.train` times them."""
    try:
        trainer = make_trainer(args, name)
    except Exception as err:  # noqa: BLE001 - reported in the section
        return {"unavailable": f"{type(err).__name__}: {one_line(err)}"}
    stream = batch_stream(trainer.pipeline)
    try:
        totals, waits, images = train_steps(trainer, stream, args.train_steps, args.train_warmup)
    except Exception as err:  # noqa: BLE001 - reported in the section
        traceback.print_exc(file=sys.stderr)
        return {"unavailable": f"failed while training: {type(err).__name__}: {one_line(err)}"}
    finally:
        stream.close()
    return {"images_per_s": rate_stats(images, totals),
            "data_stall_fraction": stats([w / t for w, t in zip(waits, totals)]),
            "step_seconds": stats(totals), "wait_seconds": stats(waits)}


def train_in_child(args: argparse.Namespace, name: str) -> dict:
    """`train_with_pipeline` in a fresh process, as training runs: one pipeline per process.

    A process that already built and iterated a pipeline for the loader figures keeps its
    threads and JIT state; a fresh one measures the pipeline alone. The child is this benchmark
    run again with the same arguments plus the hidden --_train-child/--_child-out options.
    """
    with tempfile.TemporaryDirectory(prefix="bt_fast_bench_") as scratch:
        out = Path(scratch) / "train_step.json"
        command = [sys.executable, "-m", "tools.bench", *args.argv, "--data", str(args.data),
                   "--_train-child", name, "--_child-out", str(out)]
        try:
            proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            return {"unavailable": f"training-step process timed out after {args.child_timeout} s"}
        if proc.returncode != 0 or not out.is_file():
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            return {"unavailable": f"training-step process failed (exit {proc.returncode}): "
                                   f"{lines[-1].strip() if lines else 'no output'}"}
        return json.loads(out.read_text())


def _synthetic_rate(args: argparse.Namespace) -> dict:
    """The rate on device-resident batches, or {"unavailable": reason} where --data cannot fill the trainer's
    (never iterated) reference pipeline with one batch: the other sections' figures are kept."""
    try:
        trainer = make_trainer(args, "reference")
    except DataError as err:
        return {"unavailable": one_line(err)}
    dtype = trainer.amp_dtype or torch.float32
    shape = (args.train_batch_size, 3, args.train_image_size, args.train_image_size)
    g = torch.Generator().manual_seed(args.seed)
    y1, y2 = (torch.randn(shape, generator=g).to(args.device, dtype=dtype, memory_format=torch.channels_last)
              for _ in range(2))
    totals, _, images = train_steps(trainer, iter(lambda: (y1, y2), None), args.train_steps, args.train_warmup)
    del trainer
    gc.collect()
    return rate_stats(images, totals)


def bench_train_step(args: argparse.Namespace, pipelines: Sequence[str], loaders: dict) -> dict:
    out: dict[str, Any] = {
        "model": f"{args.arch} + {args.projector} projector", "image_size": args.train_image_size,
        "batch_size": args.train_batch_size, "amp": args.amp, "steps": args.train_steps,
        "timed": f"Trainer.train_step (forward, loss, backward, LARS step) after {args.train_warmup} warm-up step(s); "
                 "images/s = batch / step time; each pipeline in a fresh process",
        "synthetic_images_per_s": _synthetic_rate(args),
    }
    for name in pipelines:
        if "unavailable" in loaders.get(name, {}):
            out[name] = {"unavailable": loaders[name]["unavailable"]}
        elif name not in args.train_pipelines:
            out[name] = {"skipped": "not in --train-pipelines" + (" (--quick feeds none by default)" if args.quick else "")}
        else:
            out[name] = train_in_child(args, name)
    return out

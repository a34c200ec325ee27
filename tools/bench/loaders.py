"""The `loaders` section: each pipeline delivering two augmented views to the device.

Per pipeline (`reference`, `ffcv`, `dali`): `images_per_s` over windows of --loader-batches
consecutive batches after two warm-up batches (at least --workers batches when reference is measured:
its workers deliver that many at a time, `__main__.min_loader_batches`); `host_cpu_s_per_image` = CPU
time of this process (all threads) plus all its descendant processes (`measure.tree_cpu_seconds`) per
image delivered; `vs_decode_floor` (set by the driver) = that over the pipeline's own decode floor.

On a CPU device the device-side augmentation runs on the host: a pipeline with a separate host
stage (`host_batches()`, FFCV) then has its host stage measured alone as well (`host_cpu_scope`; the
whole pipeline's figure is `cpu_s_per_image_incl_device_work`), and a pipeline without one
(DALI) is flagged `host_cpu_includes_device_work`. `{"unavailable": reason}` when a pipeline
cannot be imported or built, or fails while loading.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from typing import Any, Iterator, Sequence

import torch

from bt_fast.config import Config, ConfigError, load_config
from bt_fast.errors import one_line
from pipelines import build_pipeline
from pipelines.base import Placement
from tools.bench.decode_floor import jpeg_source
from tools.bench.measure import BenchError, rate_stats, stats, sync, tree_cpu_seconds


# The table's loader entries: a pipeline and the settings of its mode (FFCV has three).
LOADERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "reference": ("reference", ()),
    "ffcv": ("ffcv", ("ffcv.decode=host", "ffcv.crop=device")),
    "ffcv_device_decode": ("ffcv", ("ffcv.decode=device", "ffcv.crop=device")),
    "ffcv_host_crop": ("ffcv", ("ffcv.decode=host", "ffcv.crop=host")),
    "dali": ("dali", ()),
}


def pipeline_config(args: argparse.Namespace, name: str, image_size: int, batch_size: int,
                    extra: Sequence[str] = (), modes: dict[str, tuple[str, tuple[str, ...]]] = LOADERS) -> Config:
    """The config the benchmark runs entry `name` of `modes` with: --config and --set over the run's settings."""
    pipeline, mode = modes[name]
    return load_config(args.config, [f"data={args.data}", f"pipeline={pipeline}", f"workers={args.workers}",
                                     f"batch_size={batch_size}", f"augment.image_size={image_size}",
                                     f"seed={args.seed}", *mode, *extra, *args.set])


def try_build(config: Config, placement: Placement, batch_size: int):
    """(pipeline, None), or (None, reason) when the pipeline cannot be imported or built."""
    try:
        return build_pipeline(config, placement, batch_size), None
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to build makes the pipeline unavailable
        return None, f"{type(err).__name__}: {one_line(err)}"


def batch_stream(pipeline, host_stage: bool = False) -> Iterator:
    """Batches across epochs without end, each epoch reseeded like the trainer does.

    `host_stage`: the first tensor of each of the pipeline's `host_batches()` (its host stage's
    output, before any device work) instead.
    """
    epoch = 0
    while True:
        pipeline.set_epoch(epoch)
        empty = True
        for batch in ((first for first, *_ in pipeline.host_batches()) if host_stage else pipeline):
            empty = False
            yield batch
        if empty:
            raise BenchError(f"pipeline {type(pipeline).__name__} yielded no batch in epoch {epoch}")
        epoch += 1


def _batch_images(batch, device: torch.device, who: str) -> int:
    """Images in one delivered batch: (view1, view2) of equal shapes on the device, or a crop tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    v1, v2 = batch
    if v1.device.type != device.type or v2.shape != v1.shape:
        raise BenchError(f"{who} delivered views on {v1.device} of shapes {tuple(v1.shape)} / {tuple(v2.shape)}; "
                         f"expected equal shapes on {device}")
    return v1.shape[0]


def loader_windows(pipeline, device: torch.device, window: int, reps: int, warmup: int,
                   host_stage: bool = False) -> tuple[list[float], list[float], list[float], int]:
    """(wall seconds, host CPU seconds, of which this process's, images per window) of `reps`
    consecutive windows of `window` batches, after `warmup` untimed batches (worker start, JIT
    compiles, file cache).

    The stream runs across epochs. In steady state the workers produce what the windows consume,
    so the CPU time of a window is the work for the images it delivered; work in flight at the
    window edges (at most a batch per worker) is the only error. A loader whose workers each build a
    whole batch delivers that many at once: a window needs at least as many batches, or it may time
    only batches built before it began.
    """
    stream = batch_stream(pipeline, host_stage)
    who = type(pipeline).__name__
    walls, cpus, mains, counts = [], [], [], []

    def take(n: int) -> int:
        count = sum(_batch_images(next(stream), device, who) for _ in range(n))
        sync(device)
        return count

    take(warmup)
    for _ in range(reps):
        cpu0, main0, t0 = tree_cpu_seconds(), time.process_time(), time.perf_counter()
        counts.append(take(window))
        walls.append(time.perf_counter() - t0)
        mains.append(time.process_time() - main0)
        cpus.append(tree_cpu_seconds() - cpu0)
    stream.close()
    if len(set(counts)) != 1:
        raise BenchError(f"windows of {window} batches delivered different numbers of images: {counts}")
    return walls, cpus, mains, counts[0]


def _measure(pipeline, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    walls, cpus, mains, images = loader_windows(pipeline, device, args.loader_batches, args.reps, args.loader_warmup)
    entry: dict[str, Any] = {
        "images_per_s": rate_stats(images, walls),
        "host_cpu_s_per_image": stats([c / images for c in cpus]),
        "main_process_cpu_s_per_image": stats([c / images for c in mains]),  # the rest: worker processes
        "host_cpu_scope": "whole pipeline",
        "seconds": stats(walls), "host_cpu_seconds": stats(cpus),
        "images_per_rep": images, "batches_per_rep": args.loader_batches,
    }
    if device.type == "cpu" and callable(getattr(pipeline, "host_batches", None)):
        h_walls, h_cpus, _, h_images = loader_windows(pipeline, device, args.loader_batches, args.reps,
                                                      args.loader_warmup, host_stage=True)
        entry["cpu_s_per_image_incl_device_work"] = entry["host_cpu_s_per_image"]
        entry["host_cpu_s_per_image"] = stats([c / h_images for c in h_cpus])
        entry["host_cpu_scope"] = "host stage only (host_batches(): FFCV's loader, before any device work)"
        entry["host_stage_images_per_s"] = rate_stats(h_images, h_walls)
        entry["host_stage_seconds"] = stats(h_walls)
        entry["host_stage_cpu_seconds"] = stats(h_cpus)
        entry["host_stage_images_per_rep"] = h_images
    return entry


def bench_loader(args: argparse.Namespace, name: str) -> tuple[dict, dict | None]:
    """(loaders.<name> entry, the JPEG source that pipeline decodes, or None when unavailable)."""
    device = args.device
    config = pipeline_config(args, name, args.image_size, args.batch_size)
    pipeline, reason = try_build(config, Placement(device, torch.float32), args.batch_size)
    if pipeline is None:
        return {"unavailable": reason}, None
    try:
        source = jpeg_source(pipeline, config)
        entry = _measure(pipeline, args, device)
    except Exception as err:  # noqa: BLE001 - a pipeline that builds but fails to deliver is reported
        traceback.print_exc(file=sys.stderr)
        return {"unavailable": f"failed while loading: {type(err).__name__}: {one_line(err)}"}, None
    finally:
        del pipeline
        gc.collect()
    # On a CPU device ffcv/dali augment on the host: say when the host figure includes that work.
    entry["host_cpu_includes_device_work"] = (device.type == "cpu" and config.pipeline != "reference"
                                              and entry["host_cpu_scope"] == "whole pipeline")
    return entry, source

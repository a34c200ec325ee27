"""Before a run starts: a lower bound of the bytes one training step needs on the host and on the
device, checked against the memory this process can see.

Per rank, for a batch of B images with crops of side S (the largest of a resolution schedule),
V = 2 views and a = bytes per element of the training dtype (2 under bfloat16 / float16 autocast,
4 without):

    views        = V * B * 3 * S^2 * a     the pipeline's output, on the device
    activations  = V * B * C(S) * a        C(S): elements the backbone's convolutions output for one
                                           S x S image, each kept for the backward pass (counted by a
                                           forward on the meta device: exact shapes, no memory)
    model        = 3 * 4 * P               float32 weights, gradients and LARS momentum of P parameters
    padded       = B * H * W * 3           FFCV's uint8 slots: the .beton's largest stored height x width
    device crops = V * B * 3 * S^2 * c     crops of FFCV's device crop, c bytes each (2: float16 on CUDA;
                                           4: float32 on the CPU)
    host views   = V * B * 3 * S^2 * h     views built on the host: reference (float32, h = 4),
                                           FFCV's host crop (uint8, h = 1), DALI (h = a, on any device)

    host   = padded (FFCV, decode=host) + host views
    device = views + activations + model (+ padded + device crops with FFCV's device crop)
    shared = W * R * host views            the reference pipeline with W > 0 loader workers: each keeps R
                                           batches ready (`pipelines.reference.BATCHES_PER_WORKER`), in
                                           shared memory (/dev/shm) until the step takes them

Only these largest buffers are counted, each once (no prefetched batch, no workspace, no copy held
by a loader worker), so a setting whose estimate exceeds the memory cannot run; one within it may
still not fit. The host and shared figures are per rank: the ranks of one node share its memory. On a
CPU device, host and device are the same memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bt_fast.checkpoint import CHECKPOINT_NAME
from bt_fast.config import Config, ConfigError
from bt_fast.distributed import DistContext
from bt_fast.files import SHARED_MEMORY, free_bytes, size_bytes, size_text
from bt_fast.model import build_model
from pipelines.reference import BATCHES_PER_WORKER, loader_workers

VIEWS = 2


@dataclass(frozen=True)
class Footprint:
    host: int
    device: int
    parts: dict[str, int]  # name -> bytes, the terms of the module docstring that apply
    shared: int = 0

    def describe(self) -> str:
        return ", ".join(f"{name} {size_text(count)}" for name, count in self.parts.items() if count)


def conv_elements(arch: str, side: int) -> int:
    """C(S): the output elements of every convolution of `arch`'s backbone for one `side` x `side` image."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        total += output.numel()

    with torch.device("meta"):
        backbone = build_model(arch, "8", channels_last=False).backbone.eval()  # eval: any side, batch 1
        hooks = [m.register_forward_hook(count) for m in backbone.modules() if isinstance(m, nn.Conv2d)]
        backbone(torch.empty(1, 3, side, side))
    for hook in hooks:
        hook.remove()
    return total


def parameter_count(arch: str, projector: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(arch, projector, channels_last=False).parameters())


def estimate(*, arch: str, projector: str, pipeline: str, batch: int, side: int, dtype_bytes: int,
             ffcv_crop: str = "device", ffcv_decode: str = "host", padded: tuple[int, int] | None = None,
             crop_bytes: int = 4, loader_workers: int = 0) -> Footprint:
    """The module docstring's formula for one rank's batch of `batch` images of `side` px.

    `padded` is the FFCV slot (H, W); `ffcv_crop` / `ffcv_decode` are FFCV's resolved modes; `crop_bytes`
    the size of one element of its device crops; `loader_workers` the reference pipeline's worker processes.
    """
    pixels = VIEWS * batch * 3 * side * side
    parts = {"views": pixels * dtype_bytes,
             "activations": VIEWS * batch * conv_elements(arch, side) * dtype_bytes,
             "model": 3 * 4 * parameter_count(arch, projector)}
    host_parts: dict[str, int] = {}
    shared = 0
    if pipeline == "ffcv":
        slots = batch * padded[0] * padded[1] * 3 if padded else 0
        if ffcv_crop == "host":
            host_parts["host crops"] = pixels
        else:
            parts["padded slots"] = slots
            parts["device crops"] = pixels * crop_bytes
        if ffcv_decode == "host":
            host_parts["host padded slots"] = slots
    elif pipeline == "reference":
        host_parts["host views"] = pixels * 4
        shared = loader_workers * BATCHES_PER_WORKER * pixels * 4
    elif pipeline == "dali":
        host_parts["host views"] = pixels * dtype_bytes
    return Footprint(host=sum(host_parts.values()), device=sum(parts.values()), parts={**host_parts, **parts},
                     shared=shared)


def visible_host_memory(cgroups: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> int:
    """Physical memory, or the lowest memory limit of this process's cgroup and the cgroups above it when lower:
    a container's, a SLURM job's or a systemd unit's (cgroup v2's memory.max, v1's memory.limit_in_bytes)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in _memory_limit_files(cgroups, own):
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _memory_limit_files(cgroups: Path, own: Path) -> list[Path]:
    """The memory limit files of this process's cgroup (from `own`, /proc/self/cgroup's "id:controllers:path"
    lines) and of each cgroup above it, up to the hierarchy's root, which always counts."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        lines = []
    places = {(cgroups, "memory.max"): "/", (cgroups / "memory", "memory.limit_in_bytes"): "/"}
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            places[(cgroups, "memory.max")] = path
        elif "memory" in controllers.split(","):
            places[(cgroups / "memory", "memory.limit_in_bytes")] = path
    files = []
    for (root, name), path in places.items():
        parts = [part for part in path.split("/") if part]
        files += [root.joinpath(*parts[:depth], name) for depth in range(len(parts), -1, -1)]
    return files


def visible_device_memory(device: torch.device) -> int | None:
    """The device's total memory (None on the CPU, whose memory is the host's)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory  # GPU only


def check_memory(config: Config, ctx: DistContext, dtype: torch.dtype | None) -> None:
    """A ConfigError, before anything is built, if one step cannot fit the memory this rank sees (the
    estimate above; `dtype` is the run's autocast dtype, None without), if the reference pipeline's ready
    batches cannot fit in /dev/shm, or if FFCV's host crop would cut crops larger than any stored image; the
    DataError of an existing .beton whose padded images are above ffcv.max_padded_side for the device crop."""
    side = config.augment.image_size  # the largest size of a resolution schedule
    crop, padded, crop_bytes = "device", None, 4
    if config.pipeline == "ffcv":  # imported for FFCV runs only: FFCV's import is heavy
        from pipelines.ffcv import device_crop_dtype, host_crop_size, resolve_crop
        from pipelines.ffcv_decoders import PaddedLayout
        from pipelines.ffcv_format import beton_path, open_beton
        crop, path = resolve_crop(config, ctx.device), beton_path(config)
        crop_bytes = device_crop_dtype(ctx.device).itemsize
        if path.is_file():
            layout = PaddedLayout.of(open_beton(path))
            padded = (layout.max_height, layout.max_width)
            if crop == "device":
                layout.check_side(path, config.ffcv.max_padded_side)
        largest = max(padded) if padded else config.ffcv.max_resolution
        stored = (f"the largest side stored in {path}" if padded else
                  "ffcv.max_resolution, the largest side the first-use conversion stores")
        if crop == "host":
            host_crop_size(config.augment)  # one size: no resolution schedule
        if crop == "host" and side > largest:
            raise ConfigError(f"config key 'augment.image_size' ({side}) is above {stored} ({largest} px): FFCV's "
                              f"host crop would upsample every crop; lower augment.image_size (or reconvert with a "
                              f"larger --max-resolution)")
    footprint = estimate(arch=config.arch, projector=config.projector, pipeline=config.pipeline,
                         batch=config.batch_size // ctx.world_size, side=side,
                         dtype_bytes=dtype.itemsize if dtype is not None else 4, ffcv_crop=crop,
                         ffcv_decode=config.ffcv.decode, padded=padded, crop_bytes=crop_bytes,
                         loader_workers=loader_workers(config.workers))
    device_memory = visible_device_memory(ctx.device)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # they share this node's host memory
    needs = [("device", footprint.device, device_memory)] if device_memory is not None else []
    host = footprint.host + (footprint.device if device_memory is None else 0)
    needs.append(("host", host * ranks_here, visible_host_memory()))
    ranks = f" for {ranks_here} ranks" if ranks_here > 1 else ""
    for where, need, memory in needs:
        if need > memory:
            raise ConfigError(f"config keys 'augment.image_size' ({side}) and 'batch_size' ({config.batch_size}) need "
                              f"at least {size_text(need)} of {where} memory per step"
                              f"{ranks if where == 'host' else ''} ({footprint.describe()}), but it has "
                              f"{size_text(memory)}; {lower_one_of(config, [f'augment.image_size (now {side})'])}")
    _check_shared_memory(config, footprint.shared, ranks_here)


def lower_one_of(config: Config, settings: list[str], resuming: bool | None = None) -> str:
    """'lower a', 'lower a or b', 'lower a, b or c' of `settings`, after batch_size unless the run resumes (a
    resume keeps the batch size of its checkpoint); `resuming` None: whether out_dir holds a checkpoint."""
    if resuming is None:
        resuming = (Path(config.out_dir) / CHECKPOINT_NAME).is_file()
    options = settings if resuming else [f"batch_size (now {config.batch_size})", *settings]
    return "lower " + (options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}")


def _check_shared_memory(config: Config, need: int, ranks_here: int) -> None:
    """A ConfigError if /dev/shm cannot hold the `need` bytes of each of the node's `ranks_here` ranks, or has not
    `need` bytes free for this one (the other ranks' workers may have started: their share is not free)."""
    if not need:
        return
    total, free = size_bytes(SHARED_MEMORY), free_bytes(SHARED_MEMORY)
    started = loader_workers(config.workers)  # a lower `workers` needs less only below it
    capped = f"; {started} start, one per usable core" if started < config.workers else ""
    keys = f"config keys 'workers' ({config.workers}{capped}) and 'batch_size' ({config.batch_size})"
    ready = f"for the batches the reference pipeline's loader workers keep ready ({BATCHES_PER_WORKER} each)"
    lower = lower_one_of(config, [f"workers below {started}" if capped else f"workers (now {config.workers})"])
    if total is not None and need * ranks_here > total:
        ranks = f" for {ranks_here} ranks" if ranks_here > 1 else ""
        raise ConfigError(f"{keys} need at least {size_text(need * ranks_here)} of shared memory{ranks} {ready}, but "
                          f"{SHARED_MEMORY} holds {size_text(total)}; {lower}, or give the machine more shared memory "
                          f"(docker run --shm-size)")
    if free is not None and need > free:
        raise ConfigError(f"{keys} need at least {size_text(need)} of shared memory {ready}, but {SHARED_MEMORY} has "
                          f"only {size_text(free)} free of {size_text(total or 0)}; free some (files of stopped "
                          f"programs, such as torch_* ones left by killed runs), or {lower}")

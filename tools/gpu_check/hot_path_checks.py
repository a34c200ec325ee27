"""Checks that the training hot path stays on the device: no host sync in a step, each rank on its own GPU."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing

from bt_fast.config import load_config
from bt_fast.errors import one_line
from bt_fast.files import write_json
from bt_fast.step_clock import StepClock
from tools.gpu_check.data_checks import installed
from tools.gpu_check.measure import Result
from tools.gpu_check.train_checks import image_folder, make_trainer, synthetic_views

RANKS = 2
BATCHES = 2  # per rank: the second batch's device work runs while the first is held


@contextlib.contextmanager
def sync_debug_mode(mode: str | None):
    """CUDA's sync debug mode set to `mode` ("error": a host-device synchronisation raises) while inside;
    None (the CPU, where there is no such thing) changes nothing."""
    if mode is None:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()  # GPU only from here
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def check_no_host_sync(device, sizes, workdir, measured) -> list[Result]:
    """`sizes.steps` trainer steps, none of them a logging step, after a warm-up step, under CUDA's sync
    debug mode "error": any host-device synchronisation inside a step raises and fails the check. Each
    step is marked on the step clock as the trainer's loop marks it. On the CPU the steps run without the
    mode (it is CUDA's), so the check's code runs and the check is skipped."""
    trainer = make_trainer(device, sizes, workdir, f"log_every={10 * sizes.steps}")
    views = synthetic_views(sizes, device)
    cuda = device.type == "cuda"
    trainer.train_step(*views)  # warm-up outside the mode: cuDNN autotuning, lazy initialisation, first allocations
    trainer.step += 1
    clock = StepClock(device)
    try:
        with sync_debug_mode("error" if cuda else None):
            clock.start()
            for _ in range(sizes.steps):
                clock.data_ready()
                trainer.train_step(*views)
                trainer.step += 1
                clock.step_done()
    except RuntimeError as err:
        return [Result("no host sync", f"fail: {one_line(err)}")]
    if not cuda:
        return [Result("no host sync", f"skipped: CUDA's sync debug mode does not apply on the CPU "
                                       f"({sizes.steps} steps ran without it)")]
    return [Result("no host sync", "pass")]


def foreign_allocations(per_rank: list[dict]) -> list[str]:
    """Each rank's allocations on a GPU other than its own, and a rank with nothing on its own GPU.

    `per_rank`: one {"rank": r, "allocated": [bytes on cuda:0, cuda:1, ...]} per rank.
    """
    problems = []
    for entry in per_rank:
        rank, allocated = entry["rank"], entry["allocated"]
        problems += [f"rank {rank} holds {nbytes / 2**20:.1f} MiB on cuda:{index}"
                     for index, nbytes in enumerate(allocated) if index != rank and nbytes]
        if not allocated[rank]:
            problems.append(f"rank {rank} holds nothing on its own cuda:{rank}")
    return problems


def rank_memory(rank: int, overrides: list[str], batch: int, workdir: str) -> None:
    """One rank (spawned): NCCL, the FFCV pipeline on cuda:<rank>, two batches, then the bytes the caching
    allocator of this process holds on every visible GPU, written to <workdir>/rank<r>.json (what the
    pipeline prints goes to <workdir>/rank<r>.log)."""
    with open(Path(workdir) / f"rank{rank}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        _rank_memory(rank, overrides, batch, Path(workdir))


def _rank_memory(rank: int, overrides: list[str], batch: int, workdir: Path) -> None:
    from pipelines.base import Placement
    from pipelines.ffcv import FFCVPipeline
    device = torch.device("cuda", rank)  # GPU only: this function runs only where two GPUs are visible
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.FileStore(str(workdir / "store"), RANKS), rank=rank,
                            world_size=RANKS)
    try:
        pipeline = FFCVPipeline(load_config(None, overrides), Placement(device, torch.float16, rank, RANKS), batch)
        pipeline.set_epoch(0)
        with contextlib.closing(iter(pipeline)) as batches:
            held = [next(batches) for _ in range(BATCHES)]
            total = torch.stack([sum(v.float().sum() for v in views) for views in held]).sum()
            dist.all_reduce(total)
            torch.cuda.synchronize(device)
            allocated = [torch.cuda.memory_allocated(index) for index in range(torch.cuda.device_count())]
        write_json(workdir / f"rank{rank}.json", {"rank": rank, "allocated": allocated})
    finally:
        dist.destroy_process_group()


def check_rank_devices(device, sizes, workdir, measured) -> list[Result]:
    """Two ranks (NCCL) of the FFCV pipeline, one process each: rank r allocates on cuda:r and nothing on
    any other GPU (`torch.cuda.memory_allocated` per device). FFCV's own loader thread never sets the
    device; the pipeline must."""
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    if visible < RANKS:
        return [Result("rank devices", f"skipped: needs {RANKS} CUDA devices, {visible} visible")]
    if not installed("ffcv"):
        return [Result("rank devices", "skipped: ffcv not installed")]
    from pipelines.ffcv import ensure_beton  # GPU only from here
    data = image_folder(workdir / "ranks", RANKS * BATCHES * sizes.batch)
    overrides = [f"data={data}", "pipeline=ffcv", "workers=1", f"augment.image_size={sizes.image_size}"]
    ensure_beton(load_config(None, overrides))  # converted once, before the ranks start
    torch.multiprocessing.spawn(rank_memory, args=(overrides, sizes.batch, str(workdir)), nprocs=RANKS)
    per_rank = [json.loads((workdir / f"rank{rank}.json").read_text()) for rank in range(RANKS)]
    problems = foreign_allocations(per_rank)
    return [Result("rank devices", "fail: " + "; ".join(problems) if problems else "pass")]

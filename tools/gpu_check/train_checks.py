"""Checks of the training path on the device: AMP, LARS, resume, DDP, and the training-speed table."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from bt_fast.config import load_config
from bt_fast.distributed import DistContext, shutdown_distributed, sync_batchnorm
from bt_fast.errors import one_line
from bt_fast.loss import barlow_twins_loss
from bt_fast.model import build_model
from bt_fast.optim import LARS, param_groups
from bt_fast.trainer import Trainer
from tools.gpu_check.measure import Result, compare, timed

def image_folder(root: Path, count: int) -> Path:
    """`count` small JPEGs: the trainer builds its pipeline from them; the checks feed synthetic batches."""
    (root / "class0").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (16, 16), (i % 256, 64, 128)).save(root / "class0" / f"{i}.jpg")
    return root


def make_trainer(device, sizes, workdir, *overrides) -> Trainer:
    config = load_config(None, [f"data={image_folder(workdir / 'images', sizes.batch)}", "pipeline=reference",
                                "workers=0", f"arch={sizes.arch}", f"projector={sizes.projector}",
                                f"batch_size={sizes.batch}", f"augment.image_size={sizes.image_size}",
                                "epochs=10", "warmup_epochs=0", "knn_every=0", "channels_last=true",
                                f"out_dir={workdir / 'run'}", *overrides])
    return Trainer(config, DistContext(rank=0, local_rank=0, world_size=1, device=device))


def synthetic_views(sizes, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (sizes.batch, 3, sizes.image_size, sizes.image_size)
    return tuple(torch.randn(shape, generator=generator, device=device if generator is None else "cpu")
                 .to(device).contiguous(memory_format=torch.channels_last) for _ in range(2))


def check_amp(device, sizes, workdir, measured) -> list[Result]:
    """`sizes.steps` trainer steps under float16 (GradScaler) and bfloat16 autocast against float32 steps."""
    generator = torch.Generator().manual_seed(1)
    batches = [synthetic_views(sizes, device, generator) for _ in range(sizes.steps)]
    losses = {}
    for amp in ("none", "float16", "bfloat16"):
        trainer = make_trainer(device, sizes, workdir, f"amp={amp}")
        losses[amp] = torch.stack([trainer.train_step(y1, y2) for y1, y2 in batches]).float()
        trainer = None  # its memory goes before the next configuration is built
    return [compare(f"amp {amp}", losses[amp], losses["none"]) for amp in ("float16", "bfloat16")]


def check_lars(device, sizes, workdir, measured) -> list[Result]:
    """Compiled against eager LARS: the parameter updates of five steps on the same gradients."""
    model = build_model(sizes.arch, sizes.projector).to(device)
    start = [p.detach().clone() for p in model.parameters()]
    updates, optimizers = [], []
    for compiled in (False, True):
        params = [[torch.nn.Parameter(p.detach().clone()) for p in group["params"]] for group in param_groups(model)]
        optimizer = LARS([{"params": params[0], "lr": 0.2}, {"params": params[1], "lr": 0.0048}], lr=0,
                         weight_decay=1.5e-6, weight_decay_filter=True, lars_adaptation_filter=True,
                         compile=compiled)
        generator = torch.Generator(device=device).manual_seed(2)
        for _ in range(5):
            for p in params[0] + params[1]:
                p.grad = torch.randn(p.shape, generator=generator, device=device)
            optimizer.step()
        ordered = {id(p): q for p, q in zip(param_groups(model)[0]["params"] + param_groups(model)[1]["params"],
                                             params[0] + params[1])}
        updates.append(torch.cat([(ordered[id(p)] - s).flatten() for p, s in zip(model.parameters(), start)]))
        optimizers.append(optimizer)
    measured["lars_step_ms"] = 1000 * timed(optimizers[1].step, device, 5)
    return [compare("lars", updates[1], updates[0])]


def check_resume(device, sizes, workdir, measured) -> list[Result]:
    """A checkpoint after two steps, resumed by a fresh trainer, gives the same next batch (drawn from
    the device RNG) and the same next step as the trainer that wrote it."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):  # the same kernels twice
        trainer = make_trainer(device, sizes, workdir / "resume")
        torch.backends.cudnn.benchmark = False  # GPU only: the trainer turned it on
        for _ in range(2):
            trainer.train_step(*synthetic_views(sizes, device))
            trainer.step += 1
        trainer.save_checkpoint()
        after = []
        for run in (trainer, None):
            if run is None:
                run = make_trainer(device, sizes, workdir / "resume")
                torch.backends.cudnn.benchmark = False
                torch.manual_seed(1)  # scrambles every RNG on purpose: resume() must restore them
                run.resume()
            views = synthetic_views(sizes, device)
            loss = run.train_step(*views)
            after.append((torch.cat([v.flatten() for v in views]),
                          torch.cat([loss.view(1).float()] + [p.detach().flatten() for p in run.model.parameters()])))
    return [compare("resume batch", after[1][0], after[0][0]), compare("resume step", after[1][1], after[0][1])]


def check_ddp(device, sizes, workdir, measured) -> list[Result]:
    """DDP with synchronised BatchNorm at world size 1 (NCCL on CUDA, gloo on the CPU) against the plain model:
    the wrapping and its process group on this device. At one rank SyncBatchNorm is plain BatchNorm and every
    all-reduce is the identity, so what two ranks compute is checked by the CPU tests (tests/test_distributed.py)."""
    backend = "nccl" if device.type == "cuda" else "gloo"  # GPU only: nccl
    dist.init_process_group(backend, store=dist.FileStore(str(workdir / "store"), 1), rank=0, world_size=1)
    try:
        views = synthetic_views(sizes, device, torch.Generator().manual_seed(3))
        grads = []
        for distributed in (False, True):
            torch.manual_seed(0)
            model = build_model(sizes.arch, sizes.projector).to(device)
            if distributed:
                model = DistributedDataParallel(sync_batchnorm(model, device),
                                                device_ids=[device] if device.type == "cuda" else None)
            barlow_twins_loss(*model(*views)).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    finally:
        model = None  # DDP's reducer goes before the group (see shutdown_distributed)
        shutdown_distributed()
    return [compare("ddp", grads[1], grads[0])]



# key -> (cudnn.benchmark, config override) of each timed training configuration. No "benchmark off": cuDNN's
# plan cache is not keyed by the flag, so after the checks' steps it would time the autotuned plans again.
TRAINING_RUNS = {"train_images_per_s_cudnn_benchmark_on": (True, "compile_model=false"),
                 "train_images_per_s_compile_model": (True, "compile_model=true")}


def measure_training(device, sizes, workdir, measured) -> None:
    """Synthetic training steps per second (AMP, channels-last) in each of TRAINING_RUNS (CUDA only), and
    the peak memory of these runs. A configuration that fails is recorded as `error: <why>`."""
    if device.type == "cuda":  # GPU only: the checks before do not count
        torch.cuda.reset_peak_memory_stats(device)
    for key, (benchmark, setting) in TRAINING_RUNS.items():
        if device.type != "cuda":
            measured[key] = "n/a"
            continue
        try:
            trainer = make_trainer(device, sizes, workdir / "speed", setting)  # GPU only from here
            torch.backends.cudnn.benchmark = benchmark
            views = synthetic_views(sizes, device)
            measured[key] = sizes.batch / timed(lambda: trainer.train_step(*views), device, 10)
        except Exception as err:  # noqa: BLE001 - the other configurations' figures still count
            measured[key] = f"error: {one_line(err)}"
        trainer = None  # its memory goes before the next configuration is built
    measured["peak_gpu_memory_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30
                                       if device.type == "cuda" else "n/a")



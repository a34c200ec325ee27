"""Tolerances, the comparison every check makes, and timing."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

# Largest error each check accepts: augmentation as the mean |diff| in normalised pixel units (one 8-bit
# level is 0.017; rounding near the solarize threshold and at grey pixels' hue makes the max a poor
# measure), losses, gradients and LARS updates as max |diff| over the reference's largest magnitude.
TOLERANCE = {"augment float16": 0.005, "augment bfloat16": 0.04, "augment triton": 0.005,
             "amp float16": 0.02, "amp bfloat16": 0.05,
             "lars": 1e-5, "resume batch": 0.0, "resume step": 1e-6, "ddp": 1e-5,
             "ffcv crops": 1 / 255, "dali ids": 0.0, "dali view means": 0.05, "dali resume": 0.0,
             "device crop float16": 0.5 / 255, "device crop bfloat16": 3.0 / 255,
             "device decode": 3.0 / 255}  # nvJPEG vs libjpeg-turbo (IDCT, chroma upsampling): 1.9 levels on an H200


@dataclass(frozen=True)
class Sizes:
    arch: str
    projector: str
    image_size: int
    batch: int
    steps: int


# The CPU run only exercises each check's code: the smallest sizes that do (a batch of 4 is the fewest that
# device decode's four JPEG shapes fill; 2 steps: the second starts from the first's update, under the
# GradScaler and the momentum it made). 32 px, not 16: at 16 px layer4's first convolution sees a 1x1 map, and
# torch 2.14.1's CPU backward then leaves some of its weight gradient unwritten (whatever the memory held, NaN
# in some processes), which failed the resume check at random; at 32 px the resume step is bit-exact.
SIZES = {"cuda": Sizes("resnet50", "8192-8192-8192", 224, 64, 3),  # the paper's network at 64 images per GPU
         "cpu": Sizes("resnet18", "64-64", 32, 4, 2)}


@dataclass
class Result:
    check: str
    status: str                   # pass | fail | skipped: <why>
    error: float | None = None
    tolerance: float | None = None


def compare(check: str, got: torch.Tensor, want: torch.Tensor, relative: bool = True, mean: bool = False) -> Result:
    """Max (or `mean`) |got - want|, over max |want| when `relative`, against `TOLERANCE[check]`."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    difference = (got - want).abs()
    error = (difference.mean() if mean else difference.max()).item()
    if relative:
        error /= max(want.abs().max().item(), 1e-30)
    tolerance = TOLERANCE[check]
    return Result(check, "pass" if error <= tolerance else "fail", error, tolerance)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # GPU only
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call of `fn`, after one untimed warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


# -- checks: each takes (device, sizes, workdir, measurements) and returns its results ------------------


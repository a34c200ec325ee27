"""The `augment` section: `pipelines.augment.TwoViewAugment` against `kornia.augmentation`.

Both sides apply the same distortions per view (flip, colour jitter p 0.8 with the same
magnitudes, grayscale, Gaussian blur with the same kernel and sigma range and the per-view
probabilities, solarize, normalise) to both views, from channels-last uint8 crops on the
device, timed interleaved. A side that cannot be built is reported (`ours.unavailable`,
`kornia_unavailable`) and its rate is None. With --augment-compile, `TwoViewAugment(backend="compile")`
is timed too (`ours_compiled_images_per_s`, compile excluded); on CUDA the fused Triton kernels are
(`ours_triton_images_per_s`, `triton_speedup` over kornia).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from bt_fast.config import AugmentSpec
from pipelines.augment import TwoViewAugment
from tools.bench.loaders import pipeline_config
from tools.bench.measure import installed_version, rate_stats, ratio, time_interleaved


def kornia_view(spec: AugmentSpec, device: torch.device) -> torch.nn.Module:
    """`kornia.augmentation` with the view-1 distortions of `spec` (per-batch jitter order, as kornia does)."""
    import kornia.augmentation as K
    k = spec.blur_kernel_size
    return torch.nn.Sequential(
        K.RandomHorizontalFlip(p=spec.flip_p),
        K.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue, p=spec.jitter_p),
        K.RandomGrayscale(p=spec.grayscale_p),
        K.RandomGaussianBlur((k, k), tuple(spec.blur_sigma), p=spec.blur_p[0]),
        K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize_p[0]),  # threshold 0.5
        K.Normalize(mean=torch.tensor(spec.mean), std=torch.tensor(spec.std)),
    ).to(device)


class KorniaTwoView:
    """uint8 (B, 3, H, W) crops of both views -> two normalised float views, with kornia.

    View 2 is `kornia_view` with the view-2 blur and solarize probabilities.
    """

    def __init__(self, spec: AugmentSpec, device: torch.device):
        swapped = dataclasses.replace(spec, blur_p=spec.blur_p[::-1], solarize_p=spec.solarize_p[::-1])
        self.views = [kornia_view(spec, device), kornia_view(swapped, device)]

    def __call__(self, crops1: torch.Tensor, crops2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(aug(c.float() / 255) for aug, c in zip(self.views, (crops1, crops2)))


def _build(make, what: str):
    """(make(), None), or (None, reason) when `what` cannot be imported or built."""
    try:
        return make(), None
    except Exception as err:  # noqa: BLE001 - reported in the section
        return None, f"{what}: {type(err).__name__}: {err}"


def _ours(spec: AugmentSpec, backend: str):
    # stateless: runs on the device of its inputs
    return _build(lambda: TwoViewAugment(spec, torch.float32, backend=backend), "pipelines.augment.TwoViewAugment")


def bench_augment(args: argparse.Namespace) -> dict:
    device, size, batch = args.device, args.image_size, args.batch_size
    spec = pipeline_config(args, "reference", size, batch).augment
    g = torch.Generator().manual_seed(args.seed)
    crops = [torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8).to(device).permute(0, 3, 1, 2)
             for _ in range(2)]
    out: dict[str, Any] = {"batch_size": batch, "image_size": size,
                           "input": "channels-last uint8 crops on the device, both views",
                           "kornia": f"kornia {installed_version('kornia')}: tools.bench.augment.kornia_view per view"}
    runners = {}
    kornia, reason = _build(lambda: KorniaTwoView(spec, device), "kornia")
    if kornia is None:
        out["kornia_unavailable"] = reason
    else:
        runners["kornia"] = lambda: kornia(*crops)
    ours, reason = _ours(spec, "eager")
    if ours is None:
        out["ours"] = {"unavailable": reason}
    else:
        runners["ours"] = lambda: ours(*crops)
    extra = {"ours_compiled": "compile"} if args.augment_compile else {}
    if torch.device(device).type == "cuda":  # GPU only: the fused kernels
        extra["ours_triton"] = "triton"
    for name, backend in extra.items():
        other, reason = _ours(spec, backend)
        if other is None:
            out[name] = {"unavailable": reason}
        else:
            runners[name] = lambda other=other: other(*crops)
    with torch.no_grad():
        seconds = time_interleaved(runners, device, args.reps)  # the untimed first call compiles
    for name in ("kornia", "ours", "ours_compiled", "ours_triton"):
        if name in seconds:
            out[f"{name}_images_per_s"] = rate_stats(batch, seconds[name])
    out.setdefault("kornia_images_per_s", None)
    out.setdefault("ours_images_per_s", None)
    out["speedup"] = ratio(out["ours_images_per_s"], out["kornia_images_per_s"])
    if "ours_compiled_images_per_s" in out:
        out["compiled_speedup"] = ratio(out["ours_compiled_images_per_s"], out["kornia_images_per_s"])
    if "ours_triton_images_per_s" in out:
        out["triton_speedup"] = ratio(out["ours_triton_images_per_s"], out["kornia_images_per_s"])
    return out

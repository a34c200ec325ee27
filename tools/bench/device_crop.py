"""The `device_crop` section: the FFCV pipeline's batched crop + resize (`pipelines.device_crop`).

- `ops_per_batch`: aten ops of one `resized_crops` call at --batch-size and at twice that; the
  operator is batched, so the two must be equal.
- `flops_per_image`: the two matmuls' floating-point operations for both views at --image-size
  from the padded slot (`slot`: the largest stored height and width of the `.beton` the ffcv
  entries read, else, where none was read, a square of the run's `ffcv.max_resolution`, the largest
  a converted image can be; `slot_from` says which).
- `images_per_s`: both views of --batch-size images already on the device (float16 compute on
  CUDA, float32 on the CPU, as the pipeline runs it).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from bt_fast.errors import UserError, flat_message
from pipelines.device_crop import flops_per_image, random_boxes, resized_crops
from tools.bench.loaders import pipeline_config
from tools.bench.measure import count_dispatched_ops, rate_stats, time_calls


def padded_slot(sources: dict[str, dict | None], max_resolution: int) -> tuple[int, int, str]:
    """(max height, max width, where they come from) of the images the FFCV device crop reads: the padded slot of
    the `.beton` the ffcv entries read, else a square of `max_resolution` (the run's `ffcv.max_resolution`)."""
    beton = next((s["path"] for s in sources.values() if s and s["kind"] == "beton"), None)
    if beton is None:
        return max_resolution, max_resolution, f"ffcv.max_resolution ({max_resolution}) square: no .beton was read"
    try:
        from pipelines.ffcv_decoders import PaddedLayout
        from pipelines.ffcv_format import open_beton
        layout = PaddedLayout.of(open_beton(Path(beton)))
    except (ImportError, OSError, UserError) as err:  # no FFCV, or the .beton unreadable since its loader ran
        return (max_resolution, max_resolution,
                f"ffcv.max_resolution ({max_resolution}) square: cannot read {beton} ({flat_message(err)})")
    return layout.max_height, layout.max_width, f"largest stored image of {beton}"


def batch_of_crops(batch: int, height: int, width: int, device: torch.device, seed: int):
    """A padded uint8 batch and two random boxes per image inside it."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, height, width, 3), generator=generator, dtype=torch.uint8)
    return images.to(device), random_boxes(batch, height, width, generator).to(device)


def bench_device_crop(args: argparse.Namespace, sources: dict[str, dict | None]) -> dict[str, Any]:
    device, size, batch = args.device, args.image_size, args.batch_size
    height, width, slot = padded_slot(sources, pipeline_config(args, "ffcv", size, batch).ffcv.max_resolution)
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # GPU only: half compute
    ops = {}
    for count in (batch, 2 * batch):
        images, boxes = batch_of_crops(count, height, width, device, args.seed)
        ops[count] = count_dispatched_ops(lambda: resized_crops(images, boxes, size, dtype=dtype))
    images, boxes = batch_of_crops(batch, height, width, device, args.seed)
    seconds = time_calls(lambda: resized_crops(images, boxes, size, dtype=dtype), device, args.reps)
    return {"slot": [height, width], "slot_from": slot, "image_size": size, "compute_dtype": str(dtype),
            "ops_per_batch": {str(k): v for k, v in ops.items()},
            "flops_per_image": flops_per_image(height, width, size),
            "images_per_s": rate_stats(batch, seconds)}

"""What the DALI graph chose for each sample, and the same choices replayed with PIL/torchvision.

`DALIPipeline(..., debug=True).debug_batches()` yields `DebugBatch`es: the two views with, per
view and sample, the crop window, the coins and the jitter factors and blur sigma the graph drew.
`replay_view` recomputes one view from those choices with PIL and torchvision, so tests and
`tools.dali_semantics` can compare operator semantics with the randomness taken out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as F
from nvidia.dali import fn, types
from PIL import Image

from bt_fast.config import AugmentSpec

FLAG_NAMES = ("flip", "jitter", "grayscale", "blur", "solarize")
PARAM_NAMES = ("brightness", "contrast", "saturation", "hue", "sigma")
BOX_NAMES = ("anchor", "extent")  # crop window: (top, left) and (height, width)
CHOICE_NAMES = FLAG_NAMES + PARAM_NAMES + BOX_NAMES


@dataclass
class DebugBatch:
    """One batch with what the graph chose for it (numpy arrays, one row per sample)."""

    view1: torch.Tensor
    view2: torch.Tensor
    ids: np.ndarray                 # sample ids (ImageFolder index, or the converter's sample number)
    image_shape: np.ndarray         # (B, 3) decoded H, W, C
    choices: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # per view: CHOICE_NAMES


def choice_outputs(choices: dict) -> tuple:
    """A view's recorded choices as extra graph outputs, in CHOICE_NAMES order, one value per sample
    even where the spec made a choice a Python constant."""
    def per_sample(value, dtype):
        if isinstance(value, (bool, int, float)):
            return fn.constant(fdata=float(value), shape=[], dtype=dtype)
        return fn.cast(value, dtype=dtype)

    return (tuple(per_sample(choices[name], types.INT32) for name in FLAG_NAMES)
            + tuple(per_sample(choices[name], types.FLOAT) for name in PARAM_NAMES)
            + tuple(fn.cast(choices[name], dtype=types.INT32) for name in BOX_NAMES))


def sample_key(source_info: str) -> int:
    """The converter's global sample number from a webdataset source_info ('.../shard.tar:offset:KEY.jpg')."""
    name = source_info.rsplit(":", 1)[-1]
    return int(name.split(".", 1)[0])


def debug_batch(views: tuple[torch.Tensor, torch.Tensor], outputs, ids_are_source_info: bool) -> DebugBatch:
    """Unpack a debug graph's outputs (view1, view2, ids, shape, choices of view 1, choices of view 2)."""
    def rows(tensor_list):
        return np.stack([np.array(tensor_list.at(i)) for i in range(len(tensor_list))])

    if ids_are_source_info:
        ids = np.array([sample_key(bytes(np.array(outputs[2].at(i))).decode()) for i in range(len(outputs[2]))])
    else:
        ids = rows(outputs[2]).reshape(-1)
    count = len(CHOICE_NAMES)
    choices = []
    for view in range(2):
        values = [rows(t) for t in outputs[4 + view * count: 4 + (view + 1) * count]]
        choices.append({name: (v if name in BOX_NAMES else v.reshape(-1)) for name, v in zip(CHOICE_NAMES, values)})
    return DebugBatch(views[0], views[1], ids, rows(outputs[3]), (choices[0], choices[1]))


def to_pixels(views: torch.Tensor, spec: AugmentSpec) -> np.ndarray:
    """Normalised (B, 3, H, W) views -> (B, H, W, 3) float64 grey levels 0..255."""
    x = views.detach().to(torch.float64).cpu().permute(0, 2, 3, 1).numpy()
    return (x * np.array(spec.std) + np.array(spec.mean)) * 255.0


def grey_views(pixels: np.ndarray, tolerance: float = 2.0) -> np.ndarray:
    """Per image of (B, H, W, 3) grey levels: every pixel has R, G and B within `tolerance`."""
    return (pixels.max(axis=-1) - pixels.min(axis=-1)).max(axis=(1, 2)) <= tolerance


def replay_view(image: Image.Image, choices: dict[str, np.ndarray], i: int, spec: AugmentSpec) -> np.ndarray:
    """Sample `i` of one DALI view recomputed with PIL/torchvision from the same choices: (S, S, 3) uint8.

    The steps run in torchvision's order (jitter as brightness, contrast, saturation, hue).
    """
    top, left = (int(v) for v in choices["anchor"][i])
    height, width = (int(v) for v in choices["extent"][i])
    size = spec.image_size
    out = image.crop((left, top, left + width, top + height)).resize((size, size), Image.BICUBIC)
    if choices["jitter"][i]:
        out = F.adjust_brightness(out, float(choices["brightness"][i]))
        out = F.adjust_contrast(out, float(choices["contrast"][i]))
        out = F.adjust_saturation(out, float(choices["saturation"][i]))
        out = F.adjust_hue(out, float(np.clip(choices["hue"][i], -0.5, 0.5)))
    if choices["grayscale"][i]:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    if choices["blur"][i]:
        sigma = float(choices["sigma"][i])
        out = F.gaussian_blur(out, [spec.blur_kernel_size] * 2, [sigma, sigma])
    if choices["solarize"][i]:
        out = F.solarize(out, round(spec.solarize_threshold * 255))
    if choices["flip"][i]:
        out = F.hflip(out)
    return np.asarray(out)

"""Random-resized-crop boxes drawn per sample, the same in every FFCV mode.

Both functions run compiled by numba inside FFCV's loader (`Compiler.compile`) and as plain
Python when FFCV's compiler is off. A sample's boxes depend only on (epoch seed, sample
index): each sample reseeds the (thread-local) Mersenne Twister with `sample_seed`, so
they do not change with the number of workers or ranks.
"""
from __future__ import annotations

import numpy as np

_SEED_MODULUS = 2147483647  # 2**31 - 1 (prime): per-sample seeds stay exact in numba and Python


def sample_seed(epoch_seed, sample_index):
    """The Mersenne Twister seed of one sample in one epoch (< 2**31, no overflow anywhere)."""
    a = np.int64(epoch_seed) % _SEED_MODULUS
    b = np.int64(sample_index) % _SEED_MODULUS
    return ((a * 1103515245) % _SEED_MODULUS + (b * 2654435761) % _SEED_MODULUS + 12345) % _SEED_MODULUS


def random_resized_crop(height, width, scale_low, scale_high, log_ratio_low, log_ratio_high, ratio_min, ratio_max):
    """torchvision's `RandomResizedCrop.get_params` with numpy's global (or numba's thread) RNG.

    Returns (top, left, crop_height, crop_width).
    """
    area = height * width
    for _ in range(10):
        target_area = area * (scale_low + (scale_high - scale_low) * np.random.random())
        aspect_ratio = np.exp(log_ratio_low + (log_ratio_high - log_ratio_low) * np.random.random())
        w = int(round(np.sqrt(target_area * aspect_ratio)))
        h = int(round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(np.random.random() * (height - h + 1))
            left = int(np.random.random() * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio_min:
        w = width
        h = int(round(w / ratio_min))
    elif in_ratio > ratio_max:
        h = height
        w = int(round(h * ratio_max))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w

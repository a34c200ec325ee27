"""Shared fixtures: a tiny ImageFolder of real-looking JPEGs, built once per session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: tuple[int, int] = (80, 60),
                       seed: int = 0) -> Path:
    """Smooth random colour fields (JPEG-friendly), one sub-directory per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
            image = Image.fromarray(low).resize(size, Image.BICUBIC)
            image.save(root / f"class{c}" / f"img{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))

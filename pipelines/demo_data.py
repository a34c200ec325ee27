"""The embedded demo dataset: an ImageFolder cut from the real photographs bundled with scikit-image.

Each photograph is a class. Training images are random crops from the left 75% of the
photograph, validation images from the right 25%, so the two splits never share pixels. Every
crop is resized to an ImageNet-typical 500x375 (or 375x500) and saved as a quality-90 JPEG.
`build` is deterministic and reuses a complete dataset instead of rebuilding it.

    root = build(Path("data/demo"), train_per_class=64, val_per_class=16)  # root/{train,val}/<photo>/*.jpg
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from bt_fast.errors import DataError
from bt_fast.files import write_json

PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
               "immunohistochemistry", "stereo_motorcycle", "camera", "coins", "moon", "page",
               "horse", "brick", "grass", "gravel")
TRAIN_FRACTION = 0.75
VERSION = 1


def load_photograph(name: str) -> np.ndarray:
    """The scikit-image photograph `name` as an (H, W, 3) uint8 RGB array."""
    import skimage.data
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def random_crops(image: np.ndarray, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """`count` crops covering 30-90% of the region's area, resized to 500x375 or 375x500."""
    height, width = image.shape[:2]
    crops = []
    for _ in range(count):
        area = rng.uniform(0.3, 0.9) * height * width
        aspect = rng.uniform(0.75, 1.33)
        h = int(min(height, round(np.sqrt(area / aspect))))
        w = int(min(width, round(np.sqrt(area * aspect))))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        crop = Image.fromarray(image[top:top + h, left:left + w])
        crops.append(crop.resize((500, 375) if w >= h else (375, 500), Image.BICUBIC))
    return crops


def _demo_manifest(path: Path) -> dict | None:
    """The manifest `build` wrote at `path` (complete or not); None if there is none or it is not one."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = {"version", "photographs", "train_per_class", "val_per_class", "seed"}
    return manifest if isinstance(manifest, dict) and set(manifest) - {"complete"} == keys else None


def build(root: Path, train_per_class: int, val_per_class: int, seed: int = 0) -> Path:
    """`root` holding train/ and val/ ImageFolders with one class per photograph; returns `root`.

    `manifest.json` says what the folder holds: written first with `"complete": false`, then again
    when the set is complete. A set built with other arguments, or not finished, is deleted and
    rebuilt; a non-empty folder without a demo set's manifest (none, or a `manifest.json` that is
    not one) is not ours, and is refused (DataError), as is a `root` that is not a directory.
    """
    manifest = root / "manifest.json"
    wanted = {"version": VERSION, "photographs": list(PHOTOGRAPHS), "train_per_class": train_per_class,
              "val_per_class": val_per_class, "seed": seed}
    previous = _demo_manifest(manifest)
    if previous == wanted:
        return root
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is not a directory; name a new or empty directory for the demo data")
    if root.is_dir() and previous is None and any(root.iterdir()):
        raise DataError(f"{root} holds files that are not a demo set (it has no demo set's manifest.json); "
                        f"name a new or empty directory for the demo data")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    write_json(manifest, {**wanted, "complete": False})
    rng = np.random.default_rng(seed)
    for name in PHOTOGRAPHS:
        image = load_photograph(name)
        split = int(image.shape[1] * TRAIN_FRACTION)
        for subset, region, count in (("train", image[:, :split], train_per_class),
                                      ("val", image[:, split:], val_per_class)):
            out = root / subset / name
            out.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(random_crops(region, count, rng)):
                crop.save(out / f"{name}_{i:04d}.jpg", quality=90)
    write_json(manifest, wanted)
    return root

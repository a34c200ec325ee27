"""The embedded demo dataset: an ImageFolder cut from the real photographs bundled with scikit-image.

Each photograph is a class. Training images are random crops from the left 75% of the
photograph, validation images from the right 25%, so the two splits never share pixels. Every
crop is resized to an ImageNet-typical 500x375 (or 375x500) and saved as a quality-90 JPEG.
`build` is deterministic and reuses a complete dataset instead of rebuilding it; a rebuild replaces only
what it made and the conversions of it, never the user's other files beside them.

    root = build(Path("data/demo"), train_per_class=64, val_per_class=16)  # root/{train,val}/<photo>/*.jpg
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from bt_fast.errors import DataError
from bt_fast.files import write_json

PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
               "immunohistochemistry", "stereo_motorcycle", "camera", "coins", "moon", "page",
               "horse", "brick", "grass", "gravel")
TRAIN_FRACTION = 0.75
VERSION = 1
SPLITS = ("train", "val")


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


def random_crops(image: np.ndarray, count: int, rng: np.random.Generator) -> Iterator[Image.Image]:
    """`count` crops covering 30-90% of the region's area, resized to 500x375 or 375x500, made one at a
    time as they are taken (a class of 10,000 held at once would be 5.6 GB)."""
    height, width = image.shape[:2]
    for _ in range(count):
        area = rng.uniform(0.3, 0.9) * height * width
        aspect = rng.uniform(0.75, 1.33)
        h = int(min(height, round(np.sqrt(area / aspect))))
        w = int(min(width, round(np.sqrt(area * aspect))))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        crop = Image.fromarray(image[top:top + h, left:left + w])
        yield crop.resize((500, 375) if w >= h else (375, 500), Image.BICUBIC)


def _demo_manifest(path: Path) -> dict | None:
    """The manifest `build` wrote at `path` (complete or not); None if there is none or it is not one."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = {"version", "photographs", "train_per_class", "val_per_class", "seed"}
    return manifest if isinstance(manifest, dict) and set(manifest) - {"complete"} == keys else None


def _converted_from(entry: Path, sources: set[Path]) -> bool:
    """Whether `entry` is a conversion of one of `sources` (resolved): its report (`pipelines.convert`) names it."""
    from pipelines.convert import recorded_sources, report_path
    try:
        report = json.loads(report_path(entry).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and bool(recorded_sources(report, entry) & sources)


def _conversions(root: Path) -> list[Path]:
    """What the project derived from the splits of the demo set in `root` and keeps beside them: the .beton that
    the FFCV pipeline converts `root/<split>` to on first use (`pipelines.ffcv_format.beton_beside`), its unfinished
    work directory, and every entry of `root` whose report names a split as its source (tools.convert's .beton or
    DALI records), each with that report."""
    from pipelines.convert import report_path
    from pipelines.convert_parts import work_dir
    from pipelines.ffcv_format import beton_beside
    sources = {(root / split).resolve() for split in SPLITS}
    outputs = {beton_beside(root / split) for split in SPLITS}
    outputs |= {entry for entry in root.iterdir() if entry.name not in SPLITS and _converted_from(entry, sources)}
    derived = [path for output in sorted(outputs) for path in (output, report_path(output), work_dir(output))]
    return [path for path in derived if path.exists() or path.is_symlink()]


def _remove(path: Path) -> None:
    """Delete the file, link or directory tree at `path`; an OSError if any of it stays (unlike
    `bt_fast.files.remove_path`): old images left in train/ would join the new set unnoticed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def build(root: Path, train_per_class: int, val_per_class: int, seed: int = 0,
          log: Callable[[str], None] | None = None) -> Path:
    """`root` holding train/ and val/ ImageFolders with one class per photograph; returns `root`.

    `manifest.json` says what the folder holds: written first with `"complete": false`, then again
    when the set is complete. A set built with other arguments, or not finished, is rebuilt: its
    train/ and val/ are deleted, and so are the conversions of them beside them (`_conversions`: the
    FFCV pipeline's `train.beton`, DALI records, with their reports), which hold the old images and
    would be read in place of the new ones; `log` (if given) is told each conversion removed. Every
    other entry of `root` (the user's notes, runs) is kept. A non-empty folder without a demo set's
    manifest (none, or a `manifest.json` that is not one) is not ours, and is refused (DataError), as
    is a `root` that is not a directory.
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
    root.mkdir(parents=True, exist_ok=True)
    # first: a removal cut short leaves a set marked incomplete, which the next build rebuilds whatever its arguments
    write_json(manifest, {**wanted, "complete": False})
    if previous is not None:
        for path in _conversions(root):
            _remove(path)
            if log is not None:
                log(f"removed {path} (converted from the demo set's old images)")
        for split in SPLITS:
            _remove(root / split)
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

"""ImageNet-shaped JPEGs on demand, cut from the photographs bundled with scikit-image.

`write_imagenet_like(root, count)` writes `root/<class>/<index>.jpg` for index 0..count-1 with
the statistics that make ImageNet's training set costly to convert and load, stated here and
checked by tests/test_imagenet_like.py:

- **Classes:** image i belongs to class i % num_classes, named like a WordNet id (`n00000003`);
  class c is cut from photograph `PHOTOGRAPHS[c % 16]` (`pipelines.demo_data`).
- **Sizes:** in every block of `BLOCK` consecutive indices, exactly (`SIDE_CLASSES`)
  70% have a longer side of exactly 500 px (ImageNet's commonest, Flickr's 500 px size),
  18% uniform in 300..499 px, 10% log-uniform in 501..1500 px and 2% log-uniform in 1501..4000 px.
- **Aspect ratios:** the longer over the shorter side is 4:3 for 50% of images, 3:2 for 20%,
  1:1 for 10%, 16:9 for 5% and uniform in [1, 2] for 15% (drawn per image); 75% landscape.
- **JPEG:** quality uniform over the integers 75..95 (the quantisation tables are libjpeg's
  standard tables at that quality); in every block of `BLOCK` exactly 5% are progressive.
- **Pixel modes:** in every block of `BLOCK` exactly 2% are grayscale ('L') and 0.2% CMYK
  (ImageNet holds a few of each, CMYK being the rare one); the rest are RGB.

Every image depends on (seed, index) only (its own `numpy` generator, and one generator per block
for the counts above), so a set of N images is the first N of any larger set with the same seed
and classes, and the bytes do not depend on how many worker processes write them. Each file is
written atomically; a `imagenet_like.json` written last marks a complete set. A complete set is
returned untouched; an incomplete one (a killed run) is completed, keeping the files already
written; a root holding anything else is refused.
"""
from __future__ import annotations

import io
import json
import math
import os
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image

from bt_fast.errors import DataError, WorkerLost
from bt_fast.files import temporary_name, write_json
from bt_fast.host import usable_cores
from bt_fast.worker_pool import WorkerPool
from pipelines.demo_data import PHOTOGRAPHS, load_photograph

VERSION = 1
BLOCK = 500
MANIFEST = "imagenet_like.json"
# (share of each block, smallest and largest longer side, distribution within)
SIDE_CLASSES = ((0.70, 500, 500, "fixed"), (0.18, 300, 499, "uniform"), (0.10, 501, 1500, "log"),
                (0.02, 1501, 4000, "log"))
ASPECTS = ((0.50, 4 / 3), (0.20, 3 / 2), (0.10, 1.0), (0.05, 16 / 9), (0.15, None))  # None: uniform in [1, 2]
LANDSCAPE = 0.75
QUALITY = (75, 95)
PROGRESSIVE, GRAYSCALE, CMYK = 0.05, 0.02, 0.002


def class_name(label: int) -> str:
    return f"n{label:08d}"


def image_path(root: Path, index: int, num_classes: int) -> Path:
    return root / class_name(index % num_classes) / f"{index:08d}.jpg"


def _counts(shares: tuple[float, ...]) -> list[int]:
    counts = [round(share * BLOCK) for share in shares]
    counts[0] += BLOCK - sum(counts)  # shares summing to 1 may round off by one
    return counts


@lru_cache(maxsize=None)
def _block_plan(seed: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(side class, pixel mode, progressive) of each position in `block`, exact counts per block."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, block, 1])
    sides = np.repeat(np.arange(len(SIDE_CLASSES)), _counts(tuple(s[0] for s in SIDE_CLASSES)))
    modes = np.repeat(np.array(["L", "CMYK", "RGB"]),
                      [round(GRAYSCALE * BLOCK), round(CMYK * BLOCK), BLOCK - round(GRAYSCALE * BLOCK) - round(CMYK * BLOCK)])
    progressive = np.arange(BLOCK) < round(PROGRESSIVE * BLOCK)
    return rng.permutation(sides), rng.permutation(modes), rng.permutation(progressive)


def _size(rng: np.random.Generator, side_class: int) -> tuple[int, int]:
    _, low, high, kind = SIDE_CLASSES[side_class]
    if kind == "fixed":
        longer = low
    elif kind == "uniform":
        longer = int(rng.integers(low, high + 1))
    else:
        longer = int(min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))))
    shares = [a[0] for a in ASPECTS]
    aspect = ASPECTS[rng.choice(len(ASPECTS), p=shares)][1] or rng.uniform(1.0, 2.0)
    shorter = max(1, round(longer / aspect))
    return (longer, shorter) if rng.random() < LANDSCAPE else (shorter, longer)


@lru_cache(maxsize=None)
def _photograph(name: str) -> np.ndarray:
    return load_photograph(name)


def render(index: int, num_classes: int, seed: int) -> bytes:
    """The JPEG bytes of image `index` of the set (seed, num_classes)."""
    block, position = divmod(index, BLOCK)
    sides, modes, progressive = _block_plan(seed, block)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, index, 0])
    width, height = _size(rng, int(sides[position]))
    photo = _photograph(PHOTOGRAPHS[(index % num_classes) % len(PHOTOGRAPHS)])
    rows, cols = photo.shape[:2]
    # the largest box of the target aspect that fits, scaled by 50-100% in area
    scale = math.sqrt(rng.uniform(0.5, 1.0)) * min(rows / height, cols / width)
    h, w = max(1, min(rows, round(height * scale))), max(1, min(cols, round(width * scale)))
    top, left = int(rng.integers(0, rows - h + 1)), int(rng.integers(0, cols - w + 1))
    image = Image.fromarray(photo[top:top + h, left:left + w]).resize((width, height), Image.BICUBIC)
    mode = str(modes[position])
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)),
               progressive=bool(progressive[position]))
    return out.getvalue()


def _write_whole(path: Path, data: bytes) -> None:
    """Rename a complete temporary into place: a killed process leaves no partial image.

    Unlike `bt_fast.files.atomic_write` there is no fsync: the set is regenerable, and two fsyncs
    per image would dominate writing 100,000 of them.
    """
    tmp = temporary_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_image(root: Path, num_classes: int, seed: int, index: int) -> None:
    _write_whole(image_path(root, index, num_classes), render(index, num_classes, seed))


def _write_images(root: Path, indices: list[int], num_classes: int, seed: int, workers: int) -> None:
    """Images `indices` of the set, over `workers` processes (in this one when 1, or for a single image)."""
    write = partial(_write_image, root, num_classes, seed)
    workers = min(workers, len(indices), usable_cores())
    if workers <= 1:
        for index in indices:
            write(index)
        return
    # Small chunks: 2% of the images are up to 4000 px and cost far more than the rest.
    chunksize = max(1, min(8, len(indices) // (workers * 8)))
    Image.init()  # what the workers use is loaded before they are forked (WorkerPool)
    for name in {PHOTOGRAPHS[(index % num_classes) % len(PHOTOGRAPHS)] for index in indices}:
        _photograph(name)
    with WorkerPool(workers) as pool:  # leaving the block terminates the workers
        try:
            for _ in pool.imap_unordered(write, indices, chunksize=chunksize):
                pass
        except WorkerLost as err:
            raise WorkerLost(f"writing the ImageNet-like set {root}: {err}. The images written so far are kept; "
                             f"the same command writes the rest (with fewer workers if memory ran out)") from None


def _read_manifest(path: Path) -> dict:
    """The manifest a `write_imagenet_like` wrote at `path`; DataError naming it if it is not one."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("count"), int):
        raise DataError(f"{path} is not the manifest of an ImageNet-like set; choose another directory or delete it")
    return manifest


def write_imagenet_like(root: str | Path, count: int, num_classes: int = 10, seed: int = 0,
                        workers: int | None = None) -> Path:
    """Write (or complete) the `count`-image set described above under `root`; returns `root`.

    The missing images are rendered and written by `workers` processes (default and cap: `usable_cores()`);
    the files are the same whatever their number. Raises DataError if `root` holds anything but such
    a set with the same `num_classes` and `seed` (a set with another `count` is grown or trimmed to
    `count`), is not a directory, or if `workers` is below 1.
    """
    if count < 1 or num_classes < 1:
        raise DataError(f"an ImageNet-like set needs count >= 1 and num_classes >= 1, got {count} and {num_classes}")
    workers = usable_cores() if workers is None else workers
    if workers < 1:
        raise DataError(f"writing an ImageNet-like set needs workers >= 1, got {workers}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is not a directory; name a new or empty directory for the ImageNet-like set")
    manifest = root / MANIFEST
    wanted = {"version": VERSION, "count": count, "num_classes": num_classes, "seed": seed}
    existing = None
    if manifest.is_file():
        existing = _read_manifest(manifest)
        if existing == {**wanted, "complete": True}:
            return root
        if {k: existing.get(k) for k in ("version", "num_classes", "seed")} != \
                {k: wanted[k] for k in ("version", "num_classes", "seed")}:
            raise DataError(f"{root} holds an ImageNet-like set with other settings ({manifest}); "
                            f"choose another directory or delete it")
    elif root.exists() and any(root.iterdir()):
        raise DataError(f"{root} is not empty and holds no ImageNet-like set ({MANIFEST}); choose an empty directory")
    write_json(manifest, {**wanted, "count": max(count, (existing or {}).get("count", 0)), "complete": False})
    for label in range(min(count, num_classes)):
        folder = root / class_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        for orphan in folder.glob(".*.tmp"):  # left by a killed run
            orphan.unlink(missing_ok=True)
    # files are renamed into place whole, so one that exists is complete
    missing = [index for index in range(count) if not image_path(root, index, num_classes).exists()]
    _write_images(root, missing, num_classes, seed, workers)
    for index in range(count, (existing or {}).get("count", count)):  # a larger set trimmed to `count`
        image_path(root, index, num_classes).unlink(missing_ok=True)
    write_json(manifest, {**wanted, "complete": True})
    return root

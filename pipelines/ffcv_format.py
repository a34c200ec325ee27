"""The FFCV `.beton` format: where it lives, how the converter writes it, and how it is opened.

A `.beton` written here has fields `image` (`RGBImageField(write_mode='jpg',
max_resolution=N, jpeg_quality=Q)`) and `label` (`IntField`), samples in the order given.
The pixels handed to FFCV come from `ImagePrep.pixels`, already capped to N on the longer
side, so FFCV's own resize is a no-op and FFCV only JPEG-encodes (OpenCV, quality Q) what
both formats agree on. FFCV is imported inside the functions that need it, so the converter
and its DALI format work without it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from bt_fast.config import Config
from pipelines.base import DataError
from pipelines.images import ImagePrep

if TYPE_CHECKING:
    from ffcv.reader import Reader

_MIN_PAGE = 1 << 21            # ffcv.writer.MIN_PAGE_SIZE
_DEFAULT_PAGE = 4 * _MIN_PAGE  # DatasetWriter's default
_MAX_PAGE = 1 << 31            # below ffcv's uint32 limit


def beton_path(config: Config) -> Path:
    """`ffcv.beton`, or `<data>.beton` beside the ImageFolder."""
    if config.ffcv.beton:
        return Path(config.ffcv.beton)
    if not config.data:
        raise DataError("pipeline 'ffcv' needs data=<ImageFolder> (converted on first use) or ffcv.beton=<file.beton>")
    if config.data.endswith(".beton") and Path(config.data).is_file():  # data= names the dataset itself
        return Path(config.data)
    return Path(config.data.rstrip("/") + ".beton")


def open_beton(path: Path) -> "Reader":
    """Read and check the header: a DataError naming the file if it is not an FFCV image dataset."""
    from ffcv.fields.rgb_image import RGBImageField
    from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
    except Exception as err:  # noqa: BLE001 - FFCV raises anything from AssertionError to IndexError
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"cannot read FFCV dataset {path} ({reason}); delete it to reconvert from data=..., "
                        f"or point ffcv.beton at a file written by `python -m tools.convert`") from None
    if not isinstance(reader.handlers.get("image"), RGBImageField):
        raise DataError(f"FFCV dataset {path} has no RGB 'image' field (fields: {', '.join(reader.handlers)}); "
                        f"write it with `python -m tools.convert SRC {path} --format ffcv`")
    if reader.num_samples == 0:
        raise DataError(f"FFCV dataset {path} holds no samples; reconvert it from a non-empty ImageFolder")
    return reader


def page_size_for(max_resolution: int) -> int:
    """A power-of-two page that holds any JPEG of a capped image (FFCV cannot split a sample)."""
    worst = 2 * 3 * max_resolution * max_resolution  # a JPEG at q100 of noise stays below 2x raw
    page = _DEFAULT_PAGE
    while page < worst and page < _MAX_PAGE:
        page *= 2
    return page


class _PreparedImages:
    """Indexable dataset for DatasetWriter: (capped RGB array, label).

    FFCV's writer workers hang the parent if a sample raises, so a failure is logged to
    `failures` and a 1x1 stand-in returned; the caller aborts the whole write afterwards.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], prep: ImagePrep, failures: str):
        self.samples = list(samples)
        self.prep = prep
        self.failures = failures

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        try:
            return self.prep.pixels(path), int(label)
        except Exception as err:  # noqa: BLE001 - reported by write_ffcv
            with open(self.failures, "a") as log:
                log.write(f"{path}\t{' '.join(str(err).split()) or type(err).__name__}\n")
            return np.zeros((1, 1, 3), dtype=np.uint8), int(label)


def write_ffcv(dst: Path, samples: Sequence[tuple[str, int]], prep: ImagePrep, *, workers: int) -> None:
    """Write `samples` (validated (path, label)) to the `.beton` file `dst` over `workers` processes.

    Raises DataError if any image fails to prepare (e.g. the file changed since validation).
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode="jpg", max_resolution=prep.max_resolution,
                               jpeg_quality=prep.jpeg_quality),
        "label": IntField(),
    }
    with tempfile.TemporaryDirectory(prefix="bt_fast_convert_") as scratch:
        failures = os.path.join(scratch, "failures.tsv")
        writer = DatasetWriter(str(dst), fields, page_size=page_size_for(prep.max_resolution),
                               num_workers=max(1, min(workers, len(samples))))
        writer.from_indexed_dataset(_PreparedImages(samples, prep, failures),
                                    chunksize=max(1, min(100, len(samples) // (workers * 4) or 1)))
        if os.path.exists(failures):
            with open(failures) as log:
                lines = log.read().splitlines()
            path, reason = lines[0].split("\t", 1)
            raise DataError(f"{len(lines)} image(s) failed while writing, e.g. {path}: {reason}; "
                            "did the source change during conversion? nothing was written")

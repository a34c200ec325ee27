"""Convert an ImageFolder or a `path label` list into an FFCV `.beton` or DALI webdataset shards.

The source is an ImageFolder (SRC/<class>/<image>, labels = index of the sorted class names,
exactly as `pipelines.base.find_image_folder`) or a text file whose lines are `<path> <label>`
(path relative to the list file's directory or absolute, label a non-negative int; blank
lines and lines starting with '#' are ignored).

`convert` does, in order:

1. Every input is validated, in parallel over `workers` processes, by fully decoding it
   (`pipelines.images.validate_file`). Zero-byte, missing, truncated, corrupt and non-image
   files are *skipped*; other pixel modes are *converted* to RGB (rules in `pipelines.images`).
2. Images whose longer side exceeds `max_resolution` are shrunk to it and anything re-encoded
   is encoded at `jpeg_quality` (`pipelines.images.ImagePrep`).
3. The output is written under a hidden temporary name in DST's directory and moved into
   place only when complete. An existing DST is kept unless `force`.
4. A JSON report goes to `report_path(DST)` = `DST + '.report.json'`: counts and one
   `{path, status, reason}` entry per skipped or converted file.

Formats:

- ffcv: DST is a `.beton` (`pipelines.ffcv_format`), in source order. FFCV always
  re-encodes the JPEG it stores.
- dali: DST is a directory of webdataset tar shards plus DALI index files and `dataset.json`
  (layout in `pipelines.dali_format`). A source file that is already a baseline or
  progressive RGB JPEG within the size limit and needs no EXIF rotation is stored
  byte-for-byte (no second lossy generation); everything else is re-encoded as above.
"""
from __future__ import annotations

import os
import shutil
from multiprocessing import Pool
from pathlib import Path
from typing import Sequence

from bt_fast.files import (ensure_writable_directory, fsync_directory, remove_orphaned_temporaries, temporary_name,
                           write_json)
from bt_fast.progress import progress as progress_bar
from pipelines.base import DataError, find_image_folder
from pipelines.dali_format import write_dali
from pipelines.ffcv_format import write_ffcv
from pipelines.images import (DEFAULT_JPEG_QUALITY, DEFAULT_MAX_RESOLUTION, ImagePrep, cv2_module,
                              validate_file)

DEFAULT_SHARD_SIZE = 1000
FORMATS = ("ffcv", "dali")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def read_list_file(list_file: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names '0'..'max label', [(path, label)]) from a `<path> <label>` list file."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"source {list_file} is neither a directory nor a UTF-8 '<path> <label>' list file") from None
    base = list_file.parent
    samples: list[tuple[str, int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{list_file} line {number}: expected '<path> <label>', got {line[:80]!r}")
        name, raw_label = parts
        try:
            label = int(raw_label)
        except ValueError:
            raise DataError(f"{list_file} line {number}: label {raw_label!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{list_file} line {number}: label {label} is negative")
        path = Path(name)
        samples.append((str(path if path.is_absolute() else base / path), label))
    if not samples:
        raise DataError(f"list file {list_file} names no images (expected lines '<path> <label>')")
    classes = [str(i) for i in range(max(label for _, label in samples) + 1)]
    return classes, samples


def scan_source(src: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names indexed by label, [(path, label)]) from an ImageFolder or a list file."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"source {src} does not exist (expected an ImageFolder directory or a '<path> <label>' list file)")
    if src.is_dir():
        return find_image_folder(src)
    return read_list_file(src)


# --------------------------------------------------------------------------------------------
# Validation, output, report
# --------------------------------------------------------------------------------------------

def validate_all(paths: Sequence[str], workers: int, progress: bool = True) -> list[tuple[str, str | None]]:
    """`validate_file` for every path, in order, over `workers` processes."""
    def bar(iterable):
        return progress_bar(iterable, total=len(paths), desc="validating", unit="img", enabled=progress)

    if workers <= 1 or len(paths) < 2:
        return [validate_file(p) for p in bar(paths)]
    chunksize = max(1, min(64, len(paths) // (workers * 8)))
    with Pool(min(workers, len(paths))) as pool:
        return list(bar(pool.imap(validate_file, paths, chunksize=chunksize)))


def report_path(dst: str | Path) -> Path:
    """Where `convert` writes the report of output `dst`."""
    dst = Path(dst)
    return dst.with_name(dst.name + ".report.json")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and make sure a file can be written there (DataError otherwise)."""
    try:
        ensure_writable_directory(directory)
    except OSError as err:
        raise DataError(f"cannot write into {directory} ({err.strerror or err}); choose an output on "
                        f"writable storage") from None


def install_output(tmp: Path, dst: Path) -> None:
    """Move the finished file or directory `tmp` to `dst`, replacing whatever `dst` is.

    A file over a file is one atomic rename. A directory cannot be renamed over anything, so
    the old `dst` is parked under a temporary name, the new one moved in, the old one dropped;
    if the second rename fails the old `dst` is put back.
    """
    if (dst.exists() or dst.is_symlink()) and not (tmp.is_file() and dst.is_file()):
        parked = temporary_name(dst)
        os.replace(dst, parked)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(parked, dst)
            raise
        _remove(parked)
    else:
        os.replace(tmp, dst)
    fsync_directory(dst.parent)


def _check_args(fmt: str, max_resolution: int, jpeg_quality: int, workers: int, shard_size: int) -> None:
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if max_resolution < 1:
        raise DataError(f"--max-resolution must be a positive number of pixels, got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise DataError(f"--jpeg-quality must lie in 1..100, got {jpeg_quality}")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")


def convert(src: str | Path, dst: str | Path, fmt: str, *, max_resolution: int = DEFAULT_MAX_RESOLUTION,
            jpeg_quality: int = DEFAULT_JPEG_QUALITY, workers: int | None = None, force: bool = False,
            shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict:
    """Validate SRC and write DST in `fmt`; returns the report (also written to `report_path(DST)`).

    `workers` defaults to `os.cpu_count()`; `shard_size` is samples per tar shard (dali only).
    Raises DataError (one-line message) for unusable arguments or input.
    """
    workers = workers if workers is not None else (os.cpu_count() or 1)
    _check_args(fmt, max_resolution, jpeg_quality, workers, shard_size)
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        if not force:
            raise DataError(f"output {dst} already exists; pass --force to overwrite it")
        resolved_src, resolved_dst = src.resolve(), dst.resolve()
        if resolved_src == resolved_dst or resolved_dst in resolved_src.parents:
            raise DataError(f"output {dst} contains the source {src}; refusing to overwrite it")
    classes, samples = scan_source(src)  # a missing source fails before anything is created
    check_writable(dst.parent)
    remove_orphaned_temporaries(dst.parent, (dst.name,))  # left by a conversion that was killed
    statuses = validate_all([path for path, _ in samples], workers, progress)

    kept: list[tuple[str, int]] = []
    files: list[dict] = []
    for (path, label), (status, reason) in zip(samples, statuses):
        if status != "skipped":
            kept.append((path, label))
        if status != "ok":
            files.append({"path": path, "status": status, "reason": reason})
    report = {
        "source": str(src), "output": str(dst), "format": fmt,
        "max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
        "written": len(kept), "skipped": len(samples) - len(kept),
        "converted": sum(1 for entry in files if entry["status"] == "converted"),
        "files": files,
    }
    if not kept:
        write_json(report_path(dst), report)
        raise DataError(f"no usable images in {src}: all {len(samples)} files were skipped (see {report_path(dst)})")

    cv2_module().setNumThreads(1)  # one image per worker process; no nested thread pools on shared cores
    prep = ImagePrep(max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    tmp = temporary_name(dst)
    try:
        if fmt == "dali":
            tmp.mkdir()
            write_dali(tmp, kept, prep, workers=workers, shard_size=shard_size, classes=classes,
                       show_progress=progress)
        else:
            write_ffcv(tmp, kept, prep, workers=workers)
        if (dst.exists() or dst.is_symlink()) and not force:  # appeared while we were writing
            raise DataError(f"output {dst} already exists; pass --force to overwrite it")
        install_output(tmp, dst)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
    write_json(report_path(dst), report)
    return report

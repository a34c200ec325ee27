"""Convert an ImageFolder or a `path label` list into an FFCV `.beton` or DALI webdataset shards.

    python -m tools.convert SRC DST --format ffcv|dali [--max-resolution N] [--jpeg-quality Q]
                            [--workers N] [--force] [--shard-size N]

SRC is an ImageFolder (SRC/<class>/<image>, labels = index of the sorted class names, exactly
as `pipelines.base.find_image_folder`) or a text file whose lines are `<path> <label>` (path
relative to the list file's directory or absolute, label a non-negative int; blank lines and
lines starting with '#' are ignored).

What happens, in order:

1. Every input is validated, in parallel (`--workers`, default `os.cpu_count()`), by fully
   decoding it with Pillow (JPEGs are decoded at 1/8 scale with libjpeg's DCT scaling, which
   still reads every byte of the entropy-coded data, so truncation is caught at a fraction of
   the cost). Zero-byte, missing, truncated, corrupt and non-image files are *skipped*.
2. Pixel modes other than 8-bit RGB are *converted* to RGB (see `to_rgb`):
     - 'L' / '1' grayscale: the channel is replicated (lossless).
     - 'I;16*' and 'I' (16-bit grayscale): scaled to 8 bits by 255/65535 with rounding
       (Pillow's own convert('L') would clip everything above 255 to white). An 'I' image
       with values outside [0, 65535] and float 'F' images have no defined 8-bit scaling
       and are skipped.
     - 'P' palette: expanded to RGB (lossless); with a transparency entry it is handled as RGBA.
     - 'RGBA' / 'LA' / 'PA' / premultiplied variants: if the alpha channel is fully opaque it
       is dropped (lossless); otherwise the image is composited over white (never skipped).
     - 'CMYK': Pillow's direct conversion (no ICC colour management).
     - 'YCbCr', 'RGBX' and any other mode Pillow can convert: converted; failure skips.
     - EXIF orientation other than 1 is applied (the pixels are rotated upright), as DALI's
       decoder would do; such files are listed as converted too.
3. Images whose *longer* side exceeds `--max-resolution` are shrunk to that longer side with
   OpenCV INTER_AREA and the same size rounding FFCV's `RGBImageField` uses, so both formats
   hold the same geometry and the FFCV writer's own resize becomes a no-op. Anything
   re-encoded is encoded with OpenCV at `--jpeg-quality`, exactly as FFCV encodes.
4. The output is written under a temporary name in DST's directory and renamed into place
   only when complete. An existing DST is kept unless `--force`.
5. A JSON report goes to `DST + '.report.json'`: counts and one `{path, status, reason}` entry
   per skipped or converted file.

Formats (writers in `tools/convert_ffcv.py` and `tools/convert_dali.py`):

- ffcv: DST is a `.beton` with fields `image` (RGBImageField, write_mode='jpg') and `label`
  (IntField), in source order. FFCV always re-encodes the JPEG it stores.
- dali: DST is a directory of webdataset tar shards plus DALI index files and `dataset.json`;
  see `tools/convert_dali.py` for the layout. A source file that is already a baseline or
  progressive RGB JPEG within the size limit and needs no EXIF rotation is stored
  byte-for-byte (no second lossy generation); everything else is re-encoded as above.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.base import DataError, find_image_folder

DEFAULT_MAX_RESOLUTION = 512
DEFAULT_JPEG_QUALITY = 90
DEFAULT_SHARD_SIZE = 1000
FORMATS = ("ffcv", "dali")
_ORIENTATION_TAG = 0x0112


class SkipImage(Exception):
    """This input cannot be used; `args[0]` says why (goes into the report)."""


# --------------------------------------------------------------------------------------------
# Decoding and mode conversion
# --------------------------------------------------------------------------------------------

def _composite_alpha(image: Image.Image, mode: str) -> tuple[Image.Image, str]:
    rgba = image.convert("RGBA")
    low, _ = rgba.getchannel("A").getextrema()
    if low == 255:
        return rgba.convert("RGB"), f"converted {mode} to RGB (alpha fully opaque, dropped)"
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return (Image.alpha_composite(white, rgba).convert("RGB"),
            f"converted {mode} to RGB (transparent pixels composited over white)")


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """An 8-bit RGB version of a decoded image and a note saying what was done (None: nothing).

    Raises SkipImage for modes without a defined 8-bit RGB meaning.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("L", "1"):
        return image.convert("RGB"), f"converted grayscale {mode} to RGB (channel replicated)"
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise SkipImage("32-bit integer image (mode I) with values outside 0..65535 has no defined 8-bit scaling")
        eight = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return (Image.fromarray(eight, "L").convert("RGB"),
                f"converted 16-bit grayscale {mode} to 8-bit RGB (scaled by 255/65535)")
    if mode == "F":
        raise SkipImage("floating-point image (mode F) has no defined 8-bit scaling")
    if mode == "P":
        if "transparency" in image.info:
            return _composite_alpha(image, "palette P with transparency")
        return image.convert("RGB"), "converted palette P to RGB"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode in ("RGBa", "La"):  # premultiplied: un-premultiply first
            image = image.convert("RGBA" if mode == "RGBa" else "LA")
        return _composite_alpha(image, mode)
    if mode == "CMYK":
        return image.convert("RGB"), "converted CMYK to RGB (no ICC colour management)"
    try:
        return image.convert("RGB"), f"converted {mode} to RGB"
    except (ValueError, OSError):
        raise SkipImage(f"unsupported pixel mode {mode}") from None


def load_rgb(source: str | BinaryIO, *, draft: bool = False) -> tuple[Image.Image, list[str]]:
    """Decode `source` fully, apply EXIF orientation and convert to RGB.

    Returns the RGB image and the list of conversion notes (empty if the file was plain RGB).
    `draft=True` decodes JPEGs at reduced scale (validation only: every byte is still read).
    Raises SkipImage, with a reason, for anything unusable.
    """
    if isinstance(source, str):
        try:
            size = os.path.getsize(source)
        except FileNotFoundError:
            raise SkipImage("file not found") from None
        except OSError as err:
            raise SkipImage(f"cannot read file: {err.strerror}") from None
        if size == 0:
            raise SkipImage("empty file (0 bytes)")
        if not os.path.isfile(source):
            raise SkipImage("not a regular file")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's EXIF/ICC chatter is not our business
            with Image.open(source) as image:
                if draft and image.format == "JPEG":
                    image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
                orientation = image.getexif().get(_ORIENTATION_TAG, 1)
                if orientation not in (None, 1):
                    transposed = ImageOps.exif_transpose(image)
                    notes.append(f"rotated upright per EXIF orientation {orientation}")
                else:
                    transposed = image.copy()
    except UnidentifiedImageError:
        raise SkipImage("not a recognised image file") from None
    except Image.DecompressionBombError as err:
        raise SkipImage(f"too large to decode safely: {err}") from None
    except SkipImage:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure means a corrupt input
        message = " ".join(str(err).split()) or type(err).__name__
        raise SkipImage(f"truncated or corrupt: {message}") from None
    if transposed.width < 1 or transposed.height < 1:
        raise SkipImage("image has no pixels")
    rgb, note = to_rgb(transposed)
    if note:
        notes.insert(0, note)
    return rgb, notes


def validate_file(path: str) -> tuple[str, str | None]:
    """('ok', None), ('converted', what was done) or ('skipped', why) for one input file."""
    try:
        _, notes = load_rgb(path, draft=True)
    except SkipImage as skip:
        return "skipped", str(skip)
    return ("converted", "; ".join(notes)) if notes else ("ok", None)


# --------------------------------------------------------------------------------------------
# The shared image preparation used by both writers
# --------------------------------------------------------------------------------------------

def _cv2():
    try:
        import cv2
    except ImportError:
        raise DataError("OpenCV (cv2) is needed for resizing and JPEG encoding; install opencv-python-headless") from None
    return cv2


@dataclass(frozen=True)
class ImagePrep:
    """Turns a validated source file into what a writer stores (picklable for worker pools).

    `pixels(path)`: RGB uint8 (H, W, 3), longer side capped at `max_resolution` (FFCV input).
    `jpeg(path)`:   JPEG bytes with the same pixels; original bytes when they qualify (DALI).
    """

    max_resolution: int = DEFAULT_MAX_RESOLUTION
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after capping the longer side; FFCV's rounding (truncation)."""
        ratio = self.max_resolution / max(width, height)
        if ratio >= 1:
            return width, height
        return max(1, int(ratio * width)), max(1, int(ratio * height))

    def _capped(self, image: Image.Image) -> np.ndarray:
        array = np.asarray(image, dtype=np.uint8)
        width, height = self.target_size(image.width, image.height)
        if (width, height) != image.size:
            array = _cv2().resize(array, (width, height), interpolation=_cv2().INTER_AREA)
        return np.ascontiguousarray(array)

    def pixels(self, path: str) -> np.ndarray:
        image, _ = load_rgb(path)
        return self._capped(image)

    def encode(self, array: np.ndarray) -> bytes:
        cv2 = _cv2()
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(array, cv2.COLOR_RGB2BGR),
                                   [int(cv2.IMWRITE_JPEG_QUALITY), self.jpeg_quality])
        if not ok:
            raise SkipImage("JPEG encoding failed")
        return encoded.tobytes()

    def passes_through(self, data: bytes) -> bool:
        """True if `data` is an RGB JPEG within the limit that needs no rotation."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as image:
                    return (image.format == "JPEG" and image.mode == "RGB"
                            and max(image.size) <= self.max_resolution
                            and image.getexif().get(_ORIENTATION_TAG, 1) in (None, 1))
        except Exception:  # noqa: BLE001 - not passable; the full path will report why
            return False

    def jpeg(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            data = handle.read()
        if self.passes_through(data):
            return data
        image, _ = load_rgb(io.BytesIO(data))
        return self.encode(self._capped(image))


@dataclass(frozen=True)
class WriteOptions:
    workers: int
    shard_size: int = DEFAULT_SHARD_SIZE
    classes: tuple[str, ...] = ()
    progress: bool = True


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def _read_list(list_file: Path) -> tuple[list[str], list[tuple[str, int]]]:
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
    return _read_list(src)


# --------------------------------------------------------------------------------------------
# Validation, atomic output, report
# --------------------------------------------------------------------------------------------

def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def validate_all(paths: Sequence[str], workers: int, progress: bool = True) -> list[tuple[str, str | None]]:
    """`validate_file` for every path, in order, over `workers` processes."""
    if workers <= 1 or len(paths) < 2:
        return [validate_file(p) for p in _progress(paths, len(paths), "validating", progress)]
    chunksize = max(1, min(64, len(paths) // (workers * 8)))
    with Pool(min(workers, len(paths))) as pool:
        return list(_progress(pool.imap(validate_file, paths, chunksize=chunksize), len(paths),
                              "validating", progress))


def report_path(dst: str | Path) -> Path:
    dst = Path(dst)
    return dst.with_name(dst.name + ".report.json")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path) -> None:
    """mkstemp/mkdtemp create owner-only entries; give the output the usual umask permissions."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def _install(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst`, replacing whatever `dst` is (the caller checked --force)."""
    _publish_mode(tmp)
    if not dst.exists() and not dst.is_symlink():
        os.replace(tmp, dst)
        return
    if tmp.is_file() and dst.is_file():
        os.replace(tmp, dst)  # atomic
        return
    # A directory cannot be replaced atomically: park the old one, move in the new, drop the old.
    trash = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
    parked = trash / "old"
    os.replace(dst, parked)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(parked, dst)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _write_json(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1)
            handle.write("\n")
        _publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        _remove(Path(tmp))
        raise


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
    """Validate SRC and write DST in `fmt`; returns the report (also written beside DST).

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
    if not dst.parent.is_dir():
        dst.parent.mkdir(parents=True, exist_ok=True)

    classes, samples = scan_source(src)
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
        _write_json(report_path(dst), report)
        raise DataError(f"no usable images in {src}: all {len(samples)} files were skipped (see {report_path(dst)})")

    from tools import convert_dali, convert_ffcv
    writer = convert_ffcv.write_ffcv if fmt == "ffcv" else convert_dali.write_dali
    _cv2().setNumThreads(1)  # one image per worker process; no nested thread pools on shared cores
    prep = ImagePrep(max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    options = WriteOptions(workers=workers, shard_size=shard_size, classes=tuple(classes), progress=progress)

    if fmt == "dali":
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    else:
        fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.tmp-")
        os.close(fd)
        tmp = Path(name)
    try:
        writer(tmp, kept, prep, options)
        if (dst.exists() or dst.is_symlink()) and not force:  # appeared while we were writing
            raise DataError(f"output {dst} already exists; pass --force to overwrite it")
        _install(tmp, dst)
    finally:
        if tmp.exists():
            _remove(tmp)
    _write_json(report_path(dst), report)
    return report


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tools.convert",
                     description="Convert an ImageFolder or '<path> <label>' list to FFCV .beton or DALI webdataset shards.")
    parser.add_argument("src", metavar="SRC", help="ImageFolder directory or '<path> <label>' list file")
    parser.add_argument("dst", metavar="DST", help="output .beton file (ffcv) or directory (dali)")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--max-resolution", type=int, default=DEFAULT_MAX_RESOLUTION,
                        help="cap on the longer image side in pixels (default %(default)s)")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                        help="JPEG quality for re-encoded images (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: os.cpu_count())")
    parser.add_argument("--force", action="store_true", help="overwrite an existing DST")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="samples per tar shard, dali only (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert(args.src, args.dst, args.fmt, max_resolution=args.max_resolution,
                         jpeg_quality=args.jpeg_quality, workers=args.workers, force=args.force,
                         shard_size=args.shard_size)
    except DataError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot write output{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    print(f"wrote {report['written']} images to {args.dst} ({report['skipped']} skipped, "
          f"{report['converted']} converted; report: {report_path(args.dst)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

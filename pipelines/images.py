"""Source images for the converter: decode, validate, convert to 8-bit RGB, cap and encode.

`decode_source_image` is the converter's decoder (EXIF rotation applied, every pixel mode
mapped to RGB, unusable files raise `SkipImage` with a reason). It is not
`pipelines.reference.load_rgb`, which opens a training image with Pillow's plain
convert('RGB') (no EXIF rotation, none of the rules below) and raises DataError if unreadable.

Pixel modes other than 8-bit RGB are converted (`to_rgb`):
  - 16-bit RGB / RGBA (PNG): Pillow opens them as 8-bit RGB / RGBA keeping each sample's high
    byte; this is noted, like the other conversions.
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
    decoder would do; such files count as converted too.

`ImagePrep` caps the longer side at `max_resolution` with OpenCV INTER_AREA and FFCV's
`RGBImageField` size rounding of the full size, so both output formats hold the same geometry,
and encodes with OpenCV at `jpeg_quality`, exactly as FFCV encodes. A JPEG at least four times
the cap is first decoded at a reduced DCT scale (libjpeg's 1/2, 1/4 or 1/8, never below twice
the capped size), which halves the cost of the few very large inputs and changes the capped
pixels by one to two levels on average, about what one JPEG generation at quality 90 changes.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.base import DataError

DEFAULT_MAX_RESOLUTION = 512
DEFAULT_JPEG_QUALITY = 90
_ORIENTATION_TAG = 0x0112


class SkipImage(Exception):
    """This input cannot be used; `args[0]` says why (goes into the report)."""


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


def capped_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) with the longer side capped at `max_side`; FFCV's rounding (truncation)."""
    ratio = max_side / max(width, height)
    if ratio >= 1:
        return width, height
    return max(1, int(ratio * width)), max(1, int(ratio * height))


def decode_source_image(source: str | BinaryIO, *, draft: bool = False) -> tuple[Image.Image, list[str]]:
    """Decode `source` fully, apply EXIF orientation and convert to RGB.

    Returns the RGB image and the list of conversion notes (empty if the file was plain RGB).
    `draft=True` decodes JPEGs at 1/8 scale with libjpeg's DCT scaling (validation only: every
    byte of the entropy-coded data is still read, so truncation is caught).
    Raises SkipImage, with a reason, for anything unusable.
    """
    image, notes, _ = _decode(source, draft=draft)
    return image, notes


def _decode(source: str | BinaryIO, *, draft: bool = False,
            reduce_to: int | None = None) -> tuple[Image.Image, list[str], tuple[int, int]]:
    """`decode_source_image`, plus the upright full size. With `reduce_to`, a JPEG at least four
    times that size is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still keeps twice
    its capped size: libjpeg skips most of the work, and the caller's INTER_AREA reduction of at
    least 2x then smooths what the DCT scaling does differently from it."""
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
                wide = _sixteen_bit_colour(image)
                full = image.size
                if draft and image.format == "JPEG":
                    image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
                elif reduce_to and image.format == "JPEG" and max(full) >= 4 * reduce_to:
                    image.draft(None, tuple(2 * side for side in capped_size(*full, reduce_to)))
                image.load()
                orientation = image.getexif().get(_ORIENTATION_TAG, 1)
                if orientation in (5, 6, 7, 8):  # a quarter turn
                    full = full[::-1]
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
    if wide:
        notes.insert(0, f"converted 16-bit {wide} to 8 bits (Pillow keeps the high byte of each sample)")
    return rgb, notes, full


def _sixteen_bit_colour(image: Image.Image) -> str | None:
    """'RGB' or 'RGBA' if `image` (not yet loaded) stores 16 bits per colour sample, which Pillow
    narrows to its 8-bit mode without saying so; None otherwise."""
    if image.mode not in ("RGB", "RGBA"):
        return None
    return image.mode if any(";16" in str(tile.args) for tile in getattr(image, "tile", ())) else None


def cv2_module():
    """OpenCV, or a DataError saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise DataError("OpenCV (cv2) is needed for resizing and JPEG encoding; install opencv-python-headless") from None
    return cv2


@dataclass(frozen=True)
class Prepared:
    """One source file made ready for a writer: status 'ok', 'converted' (reason says what was
    done) or 'skipped' (reason says why; no data)."""

    status: str
    reason: str | None
    data: bytes | None = None
    width: int = 0
    height: int = 0


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
        return capped_size(width, height, self.max_resolution)

    def _decode_capped(self, source: str | BinaryIO) -> tuple[np.ndarray, list[str]]:
        """RGB pixels at `target_size` of the full upright size, and the conversion notes."""
        image, notes, full = _decode(source, reduce_to=self.max_resolution)
        array = np.asarray(image, dtype=np.uint8)
        width, height = self.target_size(*full)
        if (width, height) != image.size:
            cv2 = cv2_module()
            array = cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(array), notes

    def pixels(self, path: str) -> np.ndarray:
        return self._decode_capped(path)[0]

    def encode(self, array: np.ndarray) -> bytes:
        cv2 = cv2_module()
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

    def stored(self, path: str, keep_original: bool) -> "Prepared":
        """Validate and prepare `path` in one decode: what a writer stores, or why it is skipped.

        The bytes are `jpeg(path)`'s when `keep_original` (DALI), else the capped pixels encoded
        (`encode(pixels(path))`, exactly what FFCV's `RGBImageField` stores for those pixels). A JPEG
        kept byte-for-byte is validated by a draft decode, which still reads all its entropy-coded data.
        """
        if not os.path.isfile(path) and os.path.exists(path):
            return Prepared("skipped", "not a regular file")
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return Prepared("skipped", "file not found")
        except OSError as err:
            return Prepared("skipped", f"cannot read file: {err.strerror}")
        try:
            if not data:
                raise SkipImage("empty file (0 bytes)")
            if keep_original and self.passes_through(data):
                decode_source_image(io.BytesIO(data), draft=True)
                with Image.open(io.BytesIO(data)) as image:
                    return Prepared("ok", None, data, image.width, image.height)
            pixels, notes = self._decode_capped(io.BytesIO(data))
            return Prepared("converted" if notes else "ok", "; ".join(notes) or None, self.encode(pixels),
                            pixels.shape[1], pixels.shape[0])
        except SkipImage as skip:
            return Prepared("skipped", str(skip))

    def jpeg(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            data = handle.read()
        if self.passes_through(data):
            return data
        return self.encode(self._decode_capped(io.BytesIO(data))[0])

"""Source images for the converter: decode, validate, convert to 8-bit RGB, cap and encode.

`decode_source_image` is the converter's decoder (EXIF rotation applied, every pixel mode
mapped to RGB, unusable files raise `SkipImage` with a reason). The reference pipeline and the
evaluations decode through it too (`pipelines.reference.load_rgb`), so a file gives every pipeline
the same pixels.

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

`ImagePrep.stored` keeps a baseline RGB JPEG within `max_resolution` that needs no rotation byte
for byte (`ImagePrep.passes_through`) after a validating decode at 1/8 scale. Anything else it
decodes (an upright colour JPEG with OpenCV straight into one BGR array, the same pixels as
Pillow's decode; any other file with Pillow and the rules above), caps on the longer side at
`max_resolution` with OpenCV's INTER_AREA bytes (`pipelines.area_resize`) and FFCV's
`RGBImageField` size rounding of the full size, so both output formats hold the same geometry, and
encodes with OpenCV at `jpeg_quality`, exactly as FFCV encodes. A JPEG at least four times the cap
is first decoded at a reduced DCT scale (libjpeg's 1/2, 1/4 or 1/8, never below twice the capped
size), which halves the cost of the few very large inputs and changes the capped pixels by one to two
levels on average, about what one JPEG generation at quality 90 changes.
"""
from __future__ import annotations

import io
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bt_fast.errors import DataError, flat_message
from pipelines.area_resize import resize_area

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
    if isinstance(source, str):
        _check_file(source)
    with _opened(source) as image:
        if draft and image.format == "JPEG":
            image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
        array, notes, _ = _decoded(image)
    return Image.fromarray(array), notes


def file_problem(path: str) -> str | None:
    """Why `path` is no image to read before any decoding ("empty file (0 bytes)", "file not found", ...), in
    the words of the converter's report; None for a non-empty regular file."""
    try:
        _check_file(path)
    except SkipImage as skip:
        return skip.args[0]
    return None


def _missing(path: str) -> str:
    """Why `path`, which could not be opened for want of a file, is missing."""
    return "broken symbolic link" if os.path.islink(path) else "file not found"


def _check_file(path: str) -> None:
    """SkipImage unless `path` is a non-empty regular file."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise SkipImage(_missing(path)) from None
    except OSError as err:
        raise SkipImage(f"cannot read file: {err.strerror}") from None
    if size == 0:
        raise SkipImage("empty file (0 bytes)")
    if not os.path.isfile(path):
        raise SkipImage("not a regular file")


@contextmanager
def _opened(source: str | BinaryIO) -> Iterator[Image.Image]:
    """`Image.open(source)` (headers parsed, nothing decoded); any failure while it is open, there
    or in the caller's block (a decode), becomes SkipImage with a reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's EXIF/ICC chatter is not our business
            with Image.open(source) as image:
                yield image
    except UnidentifiedImageError:
        raise SkipImage("not a recognised image file") from None
    except Image.DecompressionBombError as err:
        raise SkipImage(f"too large to decode safely: {err}") from None
    except SkipImage:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure means a corrupt input
        raise SkipImage(f"truncated or corrupt: {flat_message(err)}") from None


def _decoded(image: Image.Image, reduce_to: int | None = None) -> tuple[np.ndarray, list[str], tuple[int, int]]:
    """Decode the open `image`: its upright RGB pixels (H, W, 3), the conversion notes and the
    upright full size. With `reduce_to`, a JPEG at least four times that size is decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) that still keeps twice its capped size: libjpeg skips most
    of the work, and the caller's INTER_AREA reduction of at least 2x then smooths what the DCT
    scaling does differently from it."""
    notes: list[str] = []
    wide = _sixteen_bit_colour(image)
    full = image.size
    if reduce_to:
        _draft_for_cap(image, reduce_to)
    image.load()
    orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    if orientation in (5, 6, 7, 8):  # a quarter turn
        full = full[::-1]
    if orientation not in (None, 1):
        upright = ImageOps.exif_transpose(image)
        notes.append(f"rotated upright per EXIF orientation {orientation}")
    else:
        upright = image
    if upright.width < 1 or upright.height < 1:
        raise SkipImage("image has no pixels")
    rgb, note = to_rgb(upright)
    if note:
        notes.insert(0, note)
    if wide:
        notes.insert(0, f"converted 16-bit {wide} to 8 bits (Pillow keeps the high byte of each sample)")
    return np.asarray(rgb, dtype=np.uint8), notes, full


def _draft_for_cap(image: Image.Image, reduce_to: int) -> int:
    """Set up `image` (open, not loaded) for `_decoded`'s reduced decode; the DCT scale taken (1: none)."""
    if image.format != "JPEG" or max(image.size) < 4 * reduce_to:
        return 1
    image.draft(None, tuple(2 * side for side in capped_size(*image.size, reduce_to)))
    return image.decoderconfig[0]


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
    """Turns a source file into what a writer stores (picklable for worker pools): `stored(path)`,
    the same for both output formats."""

    max_resolution: int = DEFAULT_MAX_RESOLUTION
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after capping the longer side; FFCV's rounding (truncation)."""
        return capped_size(width, height, self.max_resolution)

    def _capped(self, array: np.ndarray, full: tuple[int, int]) -> np.ndarray:
        """`array` (decoded from an image whose upright full size is `full`) at `target_size(*full)`."""
        width, height = self.target_size(*full)
        if (width, height) != (array.shape[1], array.shape[0]):
            cv2_module()  # where OpenCV is missing, the DataError that says so
            array = resize_area(array, (width, height))
        return np.ascontiguousarray(array)

    def pixels(self, path: str) -> np.ndarray:
        """RGB uint8 (H, W, 3) of `path`, upright, longer side capped at `max_resolution`: what a
        re-encoded image stores (before the encode). Raises SkipImage for an unusable file."""
        _check_file(path)
        with _opened(path) as image:
            array, _, full = _decoded(image, reduce_to=self.max_resolution)
        return self._capped(array, full)

    def encode(self, array: np.ndarray) -> bytes:
        """`array` (RGB uint8) as JPEG bytes, encoded by OpenCV at `jpeg_quality` as FFCV encodes."""
        cv2 = cv2_module()
        return self._encoded_bgr(cv2.cvtColor(array, cv2.COLOR_RGB2BGR))

    def _encoded_bgr(self, bgr: np.ndarray) -> bytes:
        cv2 = cv2_module()
        ok, encoded = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), self.jpeg_quality])
        if not ok:
            raise SkipImage("JPEG encoding failed")
        return encoded.tobytes()

    def passes_through(self, image: Image.Image, data: bytes) -> bool:
        """True if the file `data`, open as `image` (nothing decoded yet), is stored byte for byte:
        a baseline (sequential, Huffman-coded) 8-bit RGB JPEG within `max_resolution` that needs
        no EXIF rotation.

        Progressive JPEGs are re-encoded once here instead: a progressive file costs a training run
        roughly twice the CPU of a baseline one on every epoch, and GPU hardware JPEG decoders
        (nvJPEG's hardware back end) take baseline files only.
        """
        return (image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= self.max_resolution
                and frame_marker(data) in _SEQUENTIAL_HUFFMAN
                and image.getexif().get(_ORIENTATION_TAG, 1) in (None, 1))

    def stored(self, path: str) -> "Prepared":
        """Validate and prepare `path`: what a writer stores (ffcv and dali alike), or why it is skipped.

        A file that `passes_through` is stored as its original bytes after a validating decode at
        1/8 scale (libjpeg's DCT scaling still reads every byte of the entropy-coded data, so a
        truncated file is caught, and skips most of the IDCT), by OpenCV to gray (`_decodes_cleanly`);
        a file on which libjpeg errs or warns there is decoded by Pillow, which accepts or refuses it.
        Its size is its own. Anything else is decoded once, converted, capped (`pixels`) and re-encoded
        (`encode`): exactly what FFCV's `RGBImageField` stores for those pixels.
        """
        if not os.path.isfile(path) and os.path.exists(path):  # a directory, a FIFO that would block
            return Prepared("skipped", "not a regular file")
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return Prepared("skipped", _missing(path))
        except OSError as err:
            return Prepared("skipped", f"cannot read file: {err.strerror}")
        try:
            if not data:
                raise SkipImage("empty file (0 bytes)")
            with _opened(io.BytesIO(data)) as image:
                if self.passes_through(image, data):
                    width, height = image.size
                    if not _decodes_cleanly(data):
                        image.draft(None, (max(1, width // 8), max(1, height // 8)))
                        image.load()  # raises where Pillow refuses the file
                    return Prepared("ok", None, data, width, height)
                if _plain_jpeg(image):
                    full = image.size
                    bgr = _opencv_decoded(data, _draft_for_cap(image, self.max_resolution))
                    if bgr is not None and bgr.shape[:2] == image.size[::-1]:  # the size Pillow would decode
                        bgr = self._capped(bgr, full)
                        return Prepared("ok", None, self._encoded_bgr(bgr), bgr.shape[1], bgr.shape[0])
                array, notes, full = _decoded(image, reduce_to=self.max_resolution)
            pixels = self._capped(array, full)
            return Prepared("converted" if notes else "ok", "; ".join(notes) or None, self.encode(pixels),
                            pixels.shape[1], pixels.shape[0])
        except SkipImage as skip:
            return Prepared("skipped", str(skip))


def _plain_jpeg(image: Image.Image) -> bool:
    """An 8-bit colour JPEG that needs no EXIF rotation: what OpenCV decodes to the same pixels as Pillow."""
    return (image.format == "JPEG" and image.mode == "RGB" and not _sixteen_bit_colour(image)
            and image.getexif().get(_ORIENTATION_TAG, 1) in (None, 1))


def _opencv_decoded(data: bytes, scale: int) -> np.ndarray | None:
    """The plain JPEG `data` decoded by OpenCV at DCT scale 1/`scale`: BGR uint8 (H, W, 3), the
    same pixels as Pillow's decode at that scale (both are libjpeg-turbo with its defaults), without
    Pillow's RGBX image and the copy out of it. None where OpenCV refuses the file (truncated, for
    one) or libjpeg warned about its data: Pillow then decodes it and accepts or refuses it, saying why.

    libjpeg prints its warnings on corrupt data itself, on stderr, and OpenCV decodes on past them
    (gray where the data broke off), where Pillow refuses some of those files ("broken data stream"):
    so fd 2 points at a scratch file while OpenCV decodes, and a warning hands the file to Pillow."""
    cv2 = cv2_module()
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
    return _silent_imdecode(data, flags)


def _decodes_cleanly(data: bytes) -> bool:
    """True if OpenCV decodes the JPEG `data` at 1/8 scale to gray without an error or a libjpeg
    warning: cheaper than Pillow's decode at that scale (no upsampling or colour conversion). Where it
    is False, Pillow's decode has the last word; on every damaged file tried, the two together accept
    what Pillow's decode alone accepts (docs/performance.md, conversion)."""
    cv2 = cv2_module()
    return _silent_imdecode(data, cv2.IMREAD_REDUCED_GRAYSCALE_8) is not None


def _silent_imdecode(data: bytes, flags: int) -> np.ndarray | None:
    """`cv2.imdecode(data, flags)` (EXIF orientation ignored), or None where it fails or libjpeg
    warns about the data (`_opencv_decoded`)."""
    cv2 = cv2_module()
    with _StderrCaught() as stderr:
        try:
            decoded = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
        except cv2.error:
            return None
    return None if stderr.written else decoded


class _StderrCaught:
    """For a `with` block: fd 2 points at a scratch file in memory; `written` says afterwards whether
    anything (a C library's own message) was written there."""

    written = False

    def __enter__(self) -> "_StderrCaught":
        if sys.stderr is not None:
            sys.stderr.flush()
        try:
            self._saved: int | None = os.dup(2)
        except OSError:  # fd 2 is closed: the scratch file takes its place for the block
            self._saved = None
        self._scratch = os.memfd_create("stderr-caught")
        os.dup2(self._scratch, 2)
        return self

    def __exit__(self, *exc) -> None:
        self.written = os.fstat(self._scratch).st_size > 0
        if self._saved is None:
            os.close(2)
        else:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        if self._scratch != 2:  # with fd 2 closed before, the scratch file may have been given fd 2 itself
            os.close(self._scratch)


_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # SOF0 baseline, SOF1 extended sequential
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RSTn: markers without a length


def frame_marker(data: bytes) -> int | None:
    """The second byte of the JPEG `data`'s first start-of-frame marker (0xC0 baseline, 0xC2
    progressive, 0xC9 arithmetic, ...), walking the marker segments from SOI; None if there is none
    before the first scan or the segments do not parse."""
    if data[:2] != b"\xff\xd8":
        return None
    at, end = 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            return marker
        if marker in (0xD9, 0xDA):  # EOI, SOS: no frame before the data
            return None
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return None

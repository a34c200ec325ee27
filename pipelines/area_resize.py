"""`resize_area`: OpenCV's INTER_AREA reduction, byte for byte, about four times as fast.

The converter caps every larger image with `cv2.resize(..., INTER_AREA)`, as FFCV's `RGBImageField`
does, and OpenCV's generic area path (a factor that is not whole) is scalar code: the largest cost of
the conversion beyond the decode (docs/performance.md, conversion). `area_resize.c` does the same
float32 operations in the same order, vectorised, so it gives the same bytes.

The C file is compiled once per machine and source with the system compiler (`$CC`, else `cc`) into
the first writable of this package's `__pycache__` and the user's cache directory, and loaded with
ctypes. It is used only on x86-64, where its bytes were checked against OpenCV's (another
architecture's OpenCV build may fuse multiply-adds), and only after it matched `cv2.resize` on a few
images in this process. Anything else (no compiler, a failed build, no writable cache, a mismatch, an
integer factor or an enlargement, which OpenCV does differently) goes to `cv2.resize`: the bytes are
the same either way, only the time differs; `load_kernel()` says which.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from bt_fast.errors import flat_message
from bt_fast.files import temporary_name

_SOURCE = Path(__file__).with_name("area_resize.c")
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
_DBL_EPSILON = sys.float_info.epsilon


def resize_area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`cv2.resize(image, size, interpolation=cv2.INTER_AREA)` of a uint8 (H, W[, C]) array, byte for byte."""
    import cv2

    width, height = size
    kernel = _kernel()
    if kernel is None or not _generic_reduction(image, width, height):
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    channels = 1 if image.ndim == 2 else image.shape[2]
    if image.strides[0] <= 0 or image.strides[1] != channels or image.strides[-1] != 1:  # rows may be apart, pixels not
        image = np.ascontiguousarray(image)
    out = _reduced(kernel, image, width, height)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA) if out is None else out


def _reduced(kernel, image: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """`kernel`'s reduction of `image` (rows a positive stride apart, each row's pixels contiguous) to
    `width` x `height`, shaped as cv2.resize shapes it; None where the kernel ran out of memory."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    out = np.empty((height, width, channels) if channels > 1 else (height, width), np.uint8)
    code = kernel(image.ctypes.data, image.shape[0], image.shape[1], channels, image.strides[0],
                  out.ctypes.data, height, width, out.strides[0])
    return out if code == 0 else None


def load_kernel() -> str | None:
    """Build the kernel (the first time on this machine) and load it into this process, as the first
    `resize_area` would: None where it is used, else why `cv2.resize` is used for every image."""
    return _load()[1]


def _generic_reduction(image: np.ndarray, width: int, height: int) -> bool:
    """True where cv2.resize takes its generic area path: uint8 with 1, 3 or 4 channels, reduced on both
    axes (or kept on one), and a factor that is not whole on at least one (cv::resize's test)."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        return False
    rows, cols = image.shape[:2]
    if not (0 < width <= cols and 0 < height <= rows) or (width, height) == (cols, rows):
        return False
    scale_x, scale_y = 1.0 / (width / cols), 1.0 / (height / rows)
    return not (abs(scale_x - round(scale_x)) < _DBL_EPSILON and abs(scale_y - round(scale_y)) < _DBL_EPSILON)


def _kernel():
    return _load()[0]


@functools.cache
def _load() -> tuple[object | None, str | None]:
    """(the C function, None), or (None, why not). Once per process; a forked worker inherits it."""
    if platform.machine() != "x86_64":
        return None, f"not checked on {platform.machine()}; cv2.resize is used"
    try:
        library = ctypes.CDLL(str(_built_library()))
    except (OSError, subprocess.SubprocessError, ValueError) as err:  # ValueError: $CC does not parse
        return None, f"could not build {_SOURCE.name}: {flat_message(err)[:300]}"
    function = library.area_resize
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
                         ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    mismatch = _first_mismatch(function)
    if mismatch:
        return None, f"differs from cv2.resize for {mismatch}; cv2.resize is used"
    return function, None


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _built_library() -> Path:
    """The shared library of `_SOURCE`, compiled now unless a cache holds it (keyed by source, compiler
    and flags). Written under a temporary name and renamed, so processes building it at once are safe."""
    compiler = _compiler()
    key = hashlib.sha256(_SOURCE.read_bytes() + repr((compiler, _FLAGS)).encode()).hexdigest()[:16]
    name = f"area_resize.{key}.{platform.machine()}.so"
    for directory in _cache_directories():
        if (directory / name).is_file():
            return directory / name
    failures = []
    for directory in _cache_directories():
        library = directory / name
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            failures.append(f"{directory}: {err.strerror}")
            continue
        if not os.access(directory, os.W_OK):
            failures.append(f"{directory}: not writable")
            continue
        partial = temporary_name(library)
        try:
            subprocess.run([*compiler, *_FLAGS, "-o", str(partial), str(_SOURCE), "-lm"], check=True,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
            os.replace(partial, library)
        except subprocess.CalledProcessError as err:
            raise subprocess.SubprocessError(f"{' '.join(compiler)} failed: {err.stderr.strip()}") from None
        finally:
            partial.unlink(missing_ok=True)
        return library
    raise OSError("no writable cache directory (" + "; ".join(failures) + ")")


def _cache_directories() -> list[Path]:
    """This package's `__pycache__`, then the user's cache directory: `$XDG_CACHE_HOME` where it is an
    absolute path (the XDG spec ignores a relative one), else `~/.cache`, left out where the home is unknown
    (no `$HOME` and no passwd entry, or a relative `$HOME`: never a cache in the working directory)."""
    directories = [Path(__file__).with_name("__pycache__")]
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # "Could not determine home directory."
            return directories
    return [*directories, Path(base) / "bt_fast"] if os.path.isabs(base) else directories


def _first_mismatch(function) -> str | None:
    """The first of a few images where `function` and cv2.resize differ, described, or None. The smooth
    one puts sums next to a rounding tie, where a fused multiply-add or another order shows."""
    import cv2

    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(120) * 0.37, np.arange(170) * 0.21)
    for image, (width, height) in ((np.stack([ramp, ramp * 1.7, ramp * 2.9 + 11], -1) % 256, (51, 36)),
                                   (rng.integers(0, 256, (40, 97, 1)), (97, 17)),
                                   (rng.integers(0, 256, (57, 45, 4)), (16, 21))):
        image = image.astype(np.uint8)
        got = _reduced(function, image, width, height)
        if got is None or not np.array_equal(got, cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)):
            rows, cols, channels = image.shape
            return f"{cols}x{rows}x{channels} to {width}x{height}"
    return None

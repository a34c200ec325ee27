"""Host stages of the device-crop FFCV pipeline: FFCV operations on the `image` field.

Both stages run inside FFCV's numba-compiled loader and leave cropping and resizing to the
device. A loader reads the `image` field through two outputs, e.g.::

    boxes = TwoCropBoxes(scale, ratio)
    pipelines = {"image": [PaddedDecoder(), ToTensor()],   # or [JPEGBytesDecoder(layout.max_bytes), ...]
                 "label": None,
                 "boxes": PipelineSpec("image", decoder=boxes, transforms=[ToTensor()])}

and each batch is then `(images, rows)`:

- `PaddedDecoder` (host decode): (B, Hmax, Wmax, 3) uint8; sample i's image is
  `images[i, :H, :W]`, decoded once by libjpeg-turbo straight into its slot.
- `JPEGBytesDecoder` (device decode): (B, max_bytes) uint8; sample i's stored JPEG is
  `images[i, :stored_bytes]`, for TorchCodec's `decode_jpeg` on the device.
- `TwoCropBoxes`: (B, 11) int32 rows `[H, W, stored_bytes, top1, left1, h1, w1, top2, left2, h2, w2]`
  (`ROW_FIELDS`); `rows[:, BOXES].view(B, 2, 4)` are both views' (top, left, h, w) boxes.

The decoders subclass FFCV's `SimpleRGBImageDecoder` only so that FFCV takes them as the
field's decoder when they open a plain pipeline list.

Slots are reused batch after batch and never cleared: whatever lies outside a sample's
(H, W) or `stored_bytes` is left over from earlier batches (or uninitialised), and downstream code
must read only inside those bounds. The boxes are those `pipelines.ffcv_host_crop.TwoCropRGBDecoder`
samples (same per-sample seed, same `random_resized_crop` calls in the same order), so a
batch crops the same regions in every mode.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

import pipelines.ffcv_import  # noqa: F401 - first: FFCV's import side effects, undone
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.reader import Reader

from bt_fast.errors import DataError
from pipelines.crop_sampling import random_resized_crop, sample_seed
from pipelines.ffcv_compile import code_once, compile_cached, compile_once

__all__ = ["BOXES", "ROW_FIELDS", "JPEGBytesDecoder", "PaddedDecoder", "PaddedLayout", "TwoCropBoxes",
           "decode_into", "raise_if_failed", "stored_bytes"]

ROW_FIELDS = ("height", "width", "stored_bytes", "top1", "left1", "h1", "w1", "top2", "left2", "h2", "w2")
BOXES = slice(3, 11)
_ROW_BYTES = 4 * len(ROW_FIELDS)
_UINT8 = np.dtype("<u1")
_JPG = IMAGE_MODES["jpg"]
_DECODE_FAILED = ("an image stored in the dataset cannot be decoded (a damaged JPEG, or a raw image whose size "
                  "disagrees with its record); reconvert it with `python -m tools.convert`")
compile_cached(random_resized_crop)
compile_cached(sample_seed)


def turbojpeg_in(maps: Iterable[str]) -> str | None:
    """The libturbojpeg among a process's mappings (lines of /proc/<pid>/maps), if one is mapped: the
    system's `libturbojpeg.so.0`, or the renamed copy an auditwheel-repaired FFCV wheel bundles in
    `ffcv.libs/` (docs/offline_install.md), which no search for the soname finds."""
    for line in maps:
        path = line.split()[-1] if line.strip() else ""
        if Path(path).name.startswith("libturbojpeg"):
            return path
    return None


def _loaded_turbojpeg() -> str:
    try:
        with open("/proc/self/maps") as maps:  # FFCV's extension, imported above, has loaded it
            return turbojpeg_in(maps) or "libturbojpeg.so.0"
    except OSError:
        return "libturbojpeg.so.0"


# libjpeg-turbo's TurboJPEG API, the library FFCV's own decoder is linked against. Called
# directly because FFCV's `imdecode` cannot write with a row pitch (the padded slot's width).
_turbojpeg = ctypes.CDLL(_loaded_turbojpeg())
_tj_init = _turbojpeg.tjInitDecompress
_tj_init.argtypes, _tj_init.restype = [], ctypes.c_void_p
_tj_destroy = _turbojpeg.tjDestroy
_tj_destroy.argtypes, _tj_destroy.restype = [ctypes.c_void_p], ctypes.c_int
_tj_decompress = _turbojpeg.tjDecompress2
_tj_decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                           ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
_tj_decompress.restype = ctypes.c_int
_TJPF_RGB = 0
_TJ_FLAGS = 2048 | 1024  # TJFLAG_FASTDCT | TJFLAG_NOREALLOC: FFCV's `imdecode` flags, so pixels match it


@compile_once
def decode_into(jpeg, slot, height, width):
    """Decode `jpeg` (1-D uint8) into `slot[:height, :width]` of a C-contiguous (Hmax, Wmax, 3) slot.

    Returns 0 on success. A decompressor per call (well under a microsecond) keeps
    concurrent loader threads from ever sharing one.
    """
    handle = _tj_init()
    if not handle:
        return -1
    result = _tj_decompress(handle, jpeg.ctypes.data, jpeg.size, slot.ctypes.data,
                            width, slot.shape[1] * 3, height, _TJPF_RGB, _TJ_FLAGS)
    _tj_destroy(handle)
    return result


@compile_cached
def copy_raw(data, slot, height, width):
    """Copy a raw sample's height * width * 3 bytes into `slot[:height, :width]`; 0 on success, -1 (nothing
    copied) if the sample holds another number of bytes.

    A loop: numba compiles a slice assignment between arrays with its shape-mismatch message, string
    formatting that costs seconds of compile in every process (its time to the first batch).
    """
    if data.size != height * width * 3:
        return -1
    i = 0
    for y in range(height):
        for x in range(width):
            for c in range(3):
                slot[y, x, c] = data[i]
                i += 1
    return 0


@compile_cached
def raise_if_failed(status, count):
    """Raise for a failed sample (`status[i, 0]` not 0) among the first `count`, after the parallel loop
    that wrote the statuses (a raise inside it makes numba run it serially)."""
    for dst_ix in range(count):
        if status[dst_ix, 0] != 0:
            raise ValueError(_DECODE_FAILED)


# --------------------------------------------------------------------------------------------
# Sizes, memory and the cap
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PaddedLayout:
    """The padded per-sample slots a `.beton`'s `image` field needs."""

    max_height: int
    max_width: int
    max_bytes: int

    @classmethod
    def of(cls, reader: Reader, field: str = "image") -> "PaddedLayout":
        metadata = reader.metadata[f"f{list(reader.handlers).index(field)}"]
        return cls(int(metadata["height"].max()), int(metadata["width"].max()),
                   int(stored_bytes(reader, field).max()))

    def host_bytes_per_batch(self, batch_size: int, decode: str) -> int:
        """Host bytes of one batch: image (`decode='host'`) or JPEG (`'device'`) slots plus box rows."""
        if decode not in ("host", "device"):
            raise ValueError(f"decode must be 'host' or 'device', got {decode!r}")
        slot = self.image_bytes if decode == "host" else self.max_bytes
        return batch_size * (slot + _ROW_BYTES)

    def device_bytes_per_batch(self, batch_size: int) -> int:
        """Device bytes of one batch before cropping: padded images (decoded there or copied) plus box rows."""
        return batch_size * (self.image_bytes + _ROW_BYTES)

    @property
    def image_bytes(self) -> int:
        return self.max_height * self.max_width * 3

    def check_side(self, path: str | Path, max_side: int) -> None:
        """DataError if the padded slot's longer side exceeds `max_side` pixels."""
        side = max(self.max_height, self.max_width)
        if side > max_side:
            raise DataError(f"FFCV dataset {path} pads every image to {self.max_height}x{self.max_width} "
                            f"(its largest height and width), above the cap of {max_side} px; reconvert it with "
                            f"`python -m tools.convert SRC {path} --format ffcv --max-resolution {max_side} --force`")


def stored_bytes(reader: Reader, field: str = "image") -> np.ndarray:
    """Each sample's stored size of `field` in bytes, from the `.beton`'s allocation table."""
    pointers = reader.metadata[f"f{list(reader.handlers).index(field)}"]["data_ptr"]
    table = reader.alloc_table
    order = np.argsort(table["ptr"])
    where = order[np.searchsorted(table["ptr"], pointers, sorter=order)]
    return table["size"][where].astype(np.int64)


# --------------------------------------------------------------------------------------------
# The operations
# --------------------------------------------------------------------------------------------

class TwoCropBoxes(Operation):
    """Both views' random-resized-crop boxes per sample, from the field metadata (no pixel is read).

    Parameters
    ----------
    scale, ratio : (low, high)
        torchvision's RandomResizedCrop area scale and aspect ratio ranges.

    Output: (11,) int32 per sample, laid out as `ROW_FIELDS`. The epoch's crop seed is read
    at run time from a buffer that `set_epoch_seed` fills before each epoch starts.
    """

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float]):
        super().__init__()
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"crop scale {scale} and ratio {ratio} must be positive (low, high) pairs")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def declare_state_and_memory(self, previous_state: State):
        row = (len(ROW_FIELDS),)
        int32 = np.dtype("<i4")
        return (State(jit_mode=True, device=previous_state.device, shape=row, dtype=int32),
                (AllocationQuery(row, int32), AllocationQuery((1,), np.dtype("<i8"))))

    def set_epoch_seed(self, graph, memory_allocations: dict, seed: int) -> None:
        """Write the epoch's crop seed into an `EpochIterator`'s buffers (before its thread starts)."""
        for node in graph.operation_to_node[self]:
            memory_allocations["operation"][node.id][1][...] = seed

    def generate_code(self) -> Callable:
        return _boxes_code(self.memory_read, Compiler.compile(random_resized_crop), Compiler.compile(sample_seed),
                           Compiler.get_iterator(), self.scale, self.ratio)


@code_once
def _boxes_code(mem_read, crop_box, seed_of, sample_range, scale, ratio) -> Callable:
    scale_low, scale_high = scale
    ratio_min, ratio_max = ratio
    log_low, log_high = math.log(ratio_min), math.log(ratio_max)

    def boxes(batch_indices, my_storage, metadata, storage_state):
        rows, seeds = my_storage
        count = len(batch_indices)
        epoch_seed = seeds[0, 0]
        for dst_ix in sample_range(count):
            source_ix = batch_indices[dst_ix]
            field = metadata[source_ix]
            height = np.int64(field["height"])
            width = np.int64(field["width"])
            row = rows[dst_ix]
            row[0] = height
            row[1] = width
            row[2] = mem_read(field["data_ptr"], storage_state).size
            np.random.seed(seed_of(epoch_seed, source_ix))
            for view in range(2):
                top, left, h, w = crop_box(height, width, scale_low, scale_high, log_low, log_high,
                                           ratio_min, ratio_max)
                row[3 + 4 * view] = top
                row[4 + 4 * view] = left
                row[5 + 4 * view] = h
                row[6 + 4 * view] = w
        return rows[:count]

    boxes.is_parallel = True
    return boxes


class PaddedDecoder(SimpleRGBImageDecoder):
    """Decode each stored image once into its (Hmax, Wmax, 3) uint8 slot, top-left aligned.

    JPEGs are decoded by libjpeg-turbo with FFCV's flags (so pixels equal FFCV's
    `SimpleRGBImageDecoder`), raw samples copied. Hmax, Wmax: the field's largest stored
    height and width. A sample that fails to decode raises ValueError after the batch.
    """

    def declare_state_and_memory(self, previous_state: State):
        shape = (int(self.metadata["height"].max()), int(self.metadata["width"].max()), 3)
        return (State(jit_mode=True, device=previous_state.device, shape=shape, dtype=_UINT8),
                (AllocationQuery(shape, _UINT8), AllocationQuery((1,), np.dtype("<i4"))))

    def generate_code(self) -> Callable:
        return _padded_decode_code(self.memory_read, Compiler.compile(decode_into), Compiler.compile(copy_raw),
                                   Compiler.compile(raise_if_failed), Compiler.get_iterator())


@code_once
def _padded_decode_code(mem_read, decode_jpeg, copy_raw_sample, raise_failed, sample_range) -> Callable:
    def decode(batch_indices, my_storage, metadata, storage_state):
        destination, status = my_storage
        count = len(batch_indices)
        for dst_ix in sample_range(count):
            field = metadata[batch_indices[dst_ix]]
            height = np.int64(field["height"])
            width = np.int64(field["width"])
            data = mem_read(field["data_ptr"], storage_state)
            slot = destination[dst_ix]
            if field["mode"] == _JPG:
                status[dst_ix, 0] = decode_jpeg(data, slot, height, width)
            else:
                status[dst_ix, 0] = copy_raw_sample(data, slot, height, width)
        raise_failed(status, count)
        return destination[:count]

    decode.is_parallel = True
    return decode


class JPEGBytesDecoder(SimpleRGBImageDecoder):
    """Copy each sample's stored JPEG bytes into its (max_bytes,) uint8 slot; decoding is left to the device.

    Parameters
    ----------
    max_bytes : int
        Slot size: the field's largest stored sample (`PaddedLayout.of(reader).max_bytes`).
    path : str or Path
        The `.beton`, for the error that refuses raw samples ('' for an unnamed one).

    Only the JPEG start-of-image marker is checked here (ValueError after the batch); raw
    samples cannot be device-decoded and are refused when the loader is built.
    """

    def __init__(self, max_bytes: int, path: str | Path = ""):
        super().__init__()
        self.max_bytes = int(max_bytes)
        self.path = path

    def declare_state_and_memory(self, previous_state: State):
        if (self.metadata["mode"] != _JPG).any():
            dataset = f"FFCV dataset {self.path}" if self.path else "the FFCV dataset"
            raise DataError(f"{dataset} stores some images uncompressed (raw), which cannot be decoded on the "
                            f"device; use ffcv.decode=host or reconvert it with `python -m tools.convert`")
        shape = (self.max_bytes,)
        return (State(jit_mode=True, device=previous_state.device, shape=shape, dtype=_UINT8),
                (AllocationQuery(shape, _UINT8), AllocationQuery((1,), np.dtype("<i4"))))

    def generate_code(self) -> Callable:
        return _copy_bytes_code(self.memory_read, Compiler.compile(raise_if_failed), Compiler.get_iterator(),
                                self.max_bytes)


@code_once
def _copy_bytes_code(mem_read, raise_failed, sample_range, max_bytes) -> Callable:
    def copy_bytes(batch_indices, my_storage, metadata, storage_state):
        destination, status = my_storage
        count = len(batch_indices)
        for dst_ix in sample_range(count):
            data = mem_read(metadata[batch_indices[dst_ix]]["data_ptr"], storage_state)
            size = data.size
            valid = 2 <= size <= max_bytes and data[0] == 0xFF and data[1] == 0xD8
            status[dst_ix, 0] = 0 if valid else 1
            if valid:  # a loop, not a slice assignment: see copy_raw
                slot = destination[dst_ix]
                for i in range(size):
                    slot[i] = data[i]
        raise_failed(status, count)
        return destination[:count]

    copy_bytes.is_parallel = True
    return copy_bytes

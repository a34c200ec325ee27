"""The FFCV `.beton` format: where it lives, how the converter writes it, and how it is opened.

A `.beton` written here has fields `image` (`RGBImageField(write_mode='jpg',
max_resolution=N, jpeg_quality=Q)`) and `label` (`IntField`), samples in the order given.
The stored JPEGs are `ImagePrep.stored(path)`: a baseline RGB JPEG within N that needs no
rotation is stored byte for byte, with its own width and height (what FFCV's decoders need);
anything else is capped to N on the longer side and encoded with OpenCV at quality Q, which is
what FFCV's `RGBImageField` stores for those pixels. The converter writes the data region in place,
one resumable part after another (`BetonPart`), then the tables before and after it
(`finish_beton`), in FFCV 1.0.2's layout; FFCV's own `Reader` and `Loader` read it.
The converter writes the layout from its own description of it (`HEADER`, ... below) and never
imports FFCV; reading a `.beton` (`open_beton`) does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Sequence

import numpy as np

from bt_fast.config import Config
from bt_fast.errors import DataError, flat_message
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
    return beton_beside(config.data)


def beton_is_a_directory(path: Path) -> DataError:
    """The error for an `ffcv.beton` that names a directory (the converter would replace an empty one)."""
    return DataError(f"FFCV dataset {path} is a directory, not a .beton file; point ffcv.beton at a .beton file "
                     f"(written there from data= on first use)")


def missing_beton(path: Path) -> DataError:
    """The error for an `ffcv.beton` that does not exist where no `data` is given to convert."""
    return DataError(f"FFCV dataset {path} does not exist; fix ffcv.beton or pass data=<ImageFolder> to convert it")


def unwritable_beton(path: Path, data: str, err: OSError) -> DataError:
    """The error for a first-use conversion of `data` that cannot write `path` (`err`: why)."""
    return DataError(f"cannot write the FFCV dataset {path} ({err.strerror or err}): convert it elsewhere with "
                     f"`python -m tools.convert {data} DST.beton --format ffcv` and pass ffcv.beton=DST.beton")


def beton_beside(folder: str | Path) -> Path:
    """Where an ImageFolder's first-use conversion goes: `<folder>.beton`, beside it."""
    return Path(str(folder).rstrip("/") + ".beton")


def open_beton(path: Path) -> "Reader":
    """Read and check the header: a DataError naming the file if it is not an FFCV image dataset."""
    import pipelines.ffcv_import  # noqa: F401 - first: FFCV's import side effects, undone
    from ffcv.fields.rgb_image import RGBImageField
    from ffcv.reader import Reader

    size = path.stat().st_size
    try:
        reader = Reader(str(path))
    except Exception as err:  # noqa: BLE001 - FFCV raises anything from AssertionError to IndexError
        raise _unreadable(path, _ends_before_table(path, size) or flat_message(err)) from None
    cut_short = _cut_short(reader, size)
    if cut_short:
        raise _unreadable(path, cut_short)
    if not isinstance(reader.handlers.get("image"), RGBImageField):
        raise DataError(f"FFCV dataset {path} has no RGB 'image' field (fields: {', '.join(reader.handlers)}); "
                        f"write it with `python -m tools.convert SRC {path} --format ffcv`")
    if reader.num_samples == 0:
        raise DataError(f"FFCV dataset {path} holds no samples; reconvert it from a non-empty ImageFolder")
    return reader


def _unreadable(path: Path, reason: str) -> DataError:
    return DataError(f"cannot read FFCV dataset {path} ({reason}); write it again from its images with `python -m "
                     f"tools.convert SRC {path} --format ffcv --force` (or delete it: a run whose data= is the image "
                     f"folder converts it on first use)")


def _ends_before_table(path: Path, size: int) -> str | None:
    """Why FFCV's `Reader` failed if the file of `size` bytes ends before its header's allocation table."""
    header = np.fromfile(path, dtype=HEADER, count=1)
    if not len(header):
        return f"{size} bytes, shorter than its header"
    if int(header[0]["alloc_table_ptr"]) > size:
        return f"{size} bytes, cut short before its allocation table at byte {int(header[0]['alloc_table_ptr'])}"
    return None


def _cut_short(reader: "Reader", size: int) -> str | None:
    """Why a file of `size` bytes does not hold everything `reader`'s header and tables point to (the
    sample table, the allocation table, each sample's bytes); None if it does. Reads no sample.

    FFCV's `Reader` takes what the file holds of each table without complaint (`np.fromfile` stops at
    the end), so a file cut short opens and fails later, deep in whatever looks a sample up.
    """
    tables_end = HEADER.itemsize + reader.field_descriptors.nbytes + reader.num_samples * reader.metadata_type.itemsize
    if size < tables_end:
        return f"{size} bytes, cut short inside its sample table, which ends at byte {tables_end}"
    table_at, row = int(reader.header["alloc_table_ptr"]), ALLOCATION.itemsize
    if table_at < tables_end:
        return f"its allocation table at byte {table_at} overlaps its sample table, which ends at byte {tables_end}"
    if table_at > size or (size - table_at) % row:
        return f"{size} bytes, cut short inside its allocation table at byte {table_at}"
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_at:
        return f"a sample's bytes run past the data region, which ends at byte {table_at}"
    allocated = _sorted(table["ptr"])
    for name in reader.metadata.dtype.names:
        field = reader.metadata[name]
        if field.dtype.names and "data_ptr" in field.dtype.names:
            missing = _count_missing(field["data_ptr"], allocated)
            if missing:
                return f"{size} bytes, cut short: its allocation table lacks {missing} sample(s)"
    return None


def _sorted(values: np.ndarray) -> np.ndarray:
    """`values` in ascending order; as given where they already are (the tables this project writes)."""
    return values if np.all(values[1:] >= values[:-1]) else np.sort(values)


def _count_missing(wanted: np.ndarray, ascending: np.ndarray) -> int:
    """How many of `wanted` are not in `ascending`: a binary search each (`np.isin` sorted both tables on every
    open, which a run does twice before its first step: seconds at ImageNet's size, docs/performance.md)."""
    if not len(ascending):
        return len(wanted)
    at = np.minimum(np.searchsorted(ascending, wanted), len(ascending) - 1)
    return int(np.count_nonzero(ascending[at] != wanted))


def page_size_for(max_resolution: int) -> int:
    """A power-of-two page that holds any JPEG of a capped image (FFCV cannot split a sample)."""
    worst = 2 * 3 * max_resolution * max_resolution  # a JPEG at q100 of noise stays below 2x raw
    page = _DEFAULT_PAGE
    while page < worst and page < _MAX_PAGE:
        page *= 2
    return page


# FFCV 1.0.2's file layout (ffcv/types.py, ffcv/fields), for the two fields written here; written
# without importing FFCV, which brings torch and numba (seconds, and most of 800 MB). Checked against
# FFCV's own definitions and its DatasetWriter's bytes in tests/test_convert.py.
BETON_VERSION = 2
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                   ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESCRIPTOR = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                            align=True)
ALLOCATION = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
IMAGE_METADATA = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
LABEL_METADATA = np.dtype("<i8")
SAMPLE_METADATA = np.dtype([("", IMAGE_METADATA), ("", LABEL_METADATA)], align=True)
FIELD_TYPE_IDS = {"image": 2, "label": 1}  # RGBImageField, IntField; neither has arguments (all zeros)
JPEG_MODE = 0  # the `mode` of a sample stored as JPEG (ffcv.fields.rgb_image.IMAGE_MODES["jpg"])

PART_ROW = np.dtype([("width", "<u2"), ("height", "<u2"), ("ptr", "<u8"), ("size", "<u8"), ("label", "<i8")])


class BetonPart:
    """A run of consecutive samples of a `.beton`, written as FFCV's `DatasetWriter` with one worker
    writes its data region: each sample's JPEG goes into the current page if it fits, else into a
    new zero-filled page (a sample never spans pages), and every page is whole.

    The pages go to `handle` from its current position, a page boundary, with nothing after it in the
    file: a page's unused end is skipped, not written, so it reads as zeros and takes no disk where the
    file system keeps holes (a page of a large `max_resolution` is up to 2 GiB; docs/performance.md).
    `close()` returns one `PART_ROW` per sample with `ptr` relative to the part's first page and leaves
    `handle` open, at the file's end after the part's last page. `finish_beton` writes the tables that
    make the pages a `.beton`.
    """

    def __init__(self, handle: BinaryIO, page_size: int):
        self.page_size = page_size
        self.handle = handle
        self.used = 0  # bytes of the current page written
        self.pages_written = 0
        self.rows: list[tuple[int, int, int, int, int]] = []

    def _end_page(self) -> None:
        self.handle.seek(self.page_size - self.used, os.SEEK_CUR)
        self.pages_written += 1
        self.used = 0

    def add(self, jpeg: bytes, width: int, height: int, label: int) -> None:
        if len(jpeg) > self.page_size:
            raise DataError(f"a {len(jpeg)}-byte JPEG does not fit FFCV's {self.page_size}-byte page")
        if self.rows and self.used + len(jpeg) > self.page_size:
            self._end_page()
        self.rows.append((width, height, self.pages_written * self.page_size + self.used, len(jpeg), label))
        self.handle.write(jpeg)
        self.used += len(jpeg)

    def close(self) -> np.ndarray:
        if self.rows:
            self._end_page()
            self.handle.truncate()  # a seek alone does not move the file's end
        return np.array(self.rows, dtype=PART_ROW)


def data_start(num_samples: int, page_size: int) -> int:
    """Where the data region of a `.beton` with a table of `num_samples` rows begins: the first page
    boundary after the header, the field descriptors and the table (FFCV's `DatasetWriter`)."""
    tables = HEADER.itemsize + len(FIELD_TYPE_IDS) * FIELD_DESCRIPTOR.itemsize + num_samples * SAMPLE_METADATA.itemsize
    return -(-tables // page_size) * page_size


def finish_beton(handle: BinaryIO, data_end: int, parts: Sequence[Path], prep: ImagePrep) -> int:
    """Make the file `handle`, whose data region ends at `data_end`, a `.beton`; returns its sample count.

    The pages of `parts` (their rows `.npy` files, in order) lie back to back from the data region's
    start, which `data_start` placed for at least as many samples as the rows hold. Writes the
    allocation table at `data_end` (anything after it is cut off first, so this may be redone), then the
    header, the field descriptors and one metadata row per sample at the start. One part's rows, and its
    rows of the two tables, are in memory at a time: memory does not grow with the sample count. With
    the data region where `data_start` puts it for the rows' own count (no sample listed but skipped, or
    too few to move it by a page), the file is byte-identical to what FFCV 1.0.2's `DatasetWriter` with
    one worker writes for the same images when they fit in one part; each further part starts on a fresh
    page. FFCV's reader takes the table by count from the header and the samples by pointer, so unused
    table room before the data is never read.
    """
    page_size = page_size_for(prep.max_resolution)
    mapped = [np.load(rows, mmap_mode="r") for rows in parts]
    total = sum(len(rows) for rows in mapped)
    offset = data_end - sum(part_bytes(rows, page_size) for rows in mapped)  # where the first part's pages begin
    del mapped
    if offset < data_start(total, page_size):
        raise DataError("the parts' pages overlap the .beton's tables; run the same command again to convert "
                        "from the start")
    header = np.zeros(1, dtype=HEADER)[0]
    header["version"], header["num_fields"] = BETON_VERSION, len(FIELD_TYPE_IDS)
    header["page_size"], header["num_samples"] = page_size, total
    descriptors = np.zeros(len(FIELD_TYPE_IDS), dtype=FIELD_DESCRIPTOR)
    for i, (name, type_id) in enumerate(FIELD_TYPE_IDS.items()):
        descriptors[i]["type_id"] = type_id
        descriptors[i]["name"][:len(name)] = np.frombuffer(name.encode("ascii"), dtype="<u1")
    handle.truncate(data_end)
    header["alloc_table_ptr"] = data_end
    metadata_start = HEADER.itemsize + descriptors.nbytes
    at = 0
    for rows_file in parts:  # each part's rows of both tables, written in place
        rows = np.load(rows_file)
        metadata = np.zeros(len(rows), dtype=SAMPLE_METADATA)
        image, label = metadata.dtype.names
        metadata[image]["mode"] = JPEG_MODE
        metadata[image]["width"], metadata[image]["height"] = rows["width"], rows["height"]
        metadata[image]["data_ptr"] = rows["ptr"] + offset
        metadata[label] = rows["label"]
        alloc = np.zeros(len(rows), dtype=ALLOCATION)
        alloc["sample_id"] = np.arange(at, at + len(rows))
        alloc["ptr"], alloc["size"] = rows["ptr"] + offset, rows["size"]
        handle.seek(metadata_start + at * SAMPLE_METADATA.itemsize)
        handle.write(metadata.data)
        handle.seek(data_end + at * ALLOCATION.itemsize)
        handle.write(alloc.data)
        at += len(rows)
        offset += part_bytes(rows, page_size)
    handle.seek(0)
    handle.write(header.tobytes())
    handle.write(descriptors.data)
    handle.flush()
    return total


def part_bytes(rows: np.ndarray, page_size: int) -> int:
    """The bytes `BetonPart` wrote for `rows`: whole pages up to its last sample's."""
    if not len(rows):
        return 0
    end = int(rows["ptr"][-1] + rows["size"][-1])
    return -(-end // page_size) * page_size


def beton_samples(path: Path) -> int | None:
    """The sample count of `path` if it is a `.beton` laid out as the converter writes it (fields
    `image` and `label`); None for anything else. Reads the header only."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(HEADER.itemsize + 2 * FIELD_DESCRIPTOR.itemsize)
    except OSError:
        return None
    if len(raw) < HEADER.itemsize + 2 * FIELD_DESCRIPTOR.itemsize:
        return None
    header = np.frombuffer(raw, dtype=HEADER, count=1)[0]
    descriptors = np.frombuffer(raw, dtype=FIELD_DESCRIPTOR, count=2, offset=HEADER.itemsize)
    names = [bytes(d["name"]).rstrip(b"\0") for d in descriptors]
    if header["version"] != BETON_VERSION or header["num_fields"] != 2 or names != [b"image", b"label"]:
        return None
    return int(header["num_samples"])

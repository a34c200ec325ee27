"""The DALI webdataset format the converter writes: tar shards with DALI index files.

Layout of the output directory:

    dataset.json          description (below); paths in it are relative to this directory
    shard-00000.tar       POSIX ustar archive of samples 0 .. shard_size-1
    shard-00000.idx       DALI webdataset index of shard-00000.tar
    shard-00001.tar ...

Each sample is two tar members sharing a key: `<key>.jpg` (JPEG bytes) and `<key>.cls` (the
label as ASCII decimal, no newline). Keys are the zero-padded global sample number
of the sample's position in the shuffled source order (`00000000`, ...; a skipped source
file leaves a gap), so they are unique across shards and contain no dot. Members are written
with mtime 0, uid/gid 0 and mode 0644, so the same input gives byte-identical shards.

Samples are written in a fixed pseudo-random order of the source (`shuffled_order`, seed
`SHUFFLE_SEED`), not class-sorted, because `fn.readers.webdataset(random_shuffle=True)` only
shuffles within a buffer of `initial_fill` samples and would otherwise see long runs of one
class. Shard k holds the usable files among positions k * shard_size .. (k + 1) * shard_size - 1
of that order (so a shard may hold fewer than shard_size samples, and a shard left empty is not
written), which lets the converter finish and keep one shard at a time.

Index files follow the format DALI's `wds2idx` writes and `fn.readers.webdataset` parses
(version v1.2): a first line `v1.2 <number of samples>`, then one line per sample listing,
for each of its members in tar order, `<ext> <data offset> <size> <member name>` separated
by single spaces, where the data offset is the byte position of the member's data (just past
its 512-byte header) and so a multiple of 512.

dataset.json keys: format ("webdataset"), index_version ("v1.2"), num_samples, num_classes,
classes (names indexed by label), extensions ({"image": "jpg", "label": "cls"}),
max_resolution, jpeg_quality, shuffle_seed, shards (list of {"tar", "index", "num_samples"}).

Reading it (CPU shown; pass device_id for GPU decoding with device="mixed"):

    meta = json.load(open(f"{root}/dataset.json"))
    jpegs, cls = fn.readers.webdataset(
        paths=[f"{root}/{s['tar']}" for s in meta["shards"]],
        index_paths=[f"{root}/{s['index']}" for s in meta["shards"]],
        ext=["jpg", "cls"], missing_component_behavior="error", name="reader")
    images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    # cls is a uint8 tensor of ASCII digits: int(bytes(cls).decode()) on the host
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np

from bt_fast.files import write_json
from pipelines.images import ImagePrep

INDEX_VERSION = "v1.2"
SHUFFLE_SEED = 0
IMAGE_EXT, LABEL_EXT = "jpg", "cls"
_BLOCK = 512


def _stdlib_header(name: str, size: int) -> bytes:
    """The USTAR header `tarfile` writes for a member `name` of `size` bytes with this format's fields."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


_HEADER = _stdlib_header("", 0)  # every field but the name (bytes 0-99), size (124-135) and checksum (148-155)
_NAME, _SIZE, _CHECKSUM = slice(0, 100), slice(124, 136), slice(148, 156)
_SUM_WITHOUT_NAME_AND_SIZE = (sum(_HEADER) - sum(_HEADER[_NAME]) - sum(_HEADER[_SIZE])
                              - sum(_HEADER[_CHECKSUM]) + 8 * ord(" "))  # the checksum counts its field as spaces


def _header(name: str, size: int) -> bytes:
    """`_stdlib_header(name, size)`, filled into `_HEADER`: a short ASCII name (a key and an extension)."""
    encoded = name.encode("ascii")
    if len(encoded) > 100 or size >= 8 ** 11:  # tarfile would split the name or refuse the size: let it
        return _stdlib_header(name, size)
    header = bytearray(_HEADER)
    header[:len(encoded)] = encoded
    header[_SIZE] = b"%011o\0" % size
    header[_CHECKSUM] = b"%06o\0 " % (_SUM_WITHOUT_NAME_AND_SIZE + sum(encoded) + sum(header[_SIZE]))
    return bytes(header)


class ShardWriter:
    """One tar shard being written, with the DALI index entries of its samples.

    The bytes are those `tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)` with `addfile`
    writes (each member's header as `TarInfo.tobuf` makes it, its data padded to 512 bytes, two
    zero blocks and padding to tarfile's 10240-byte record at the end), written straight to the
    file. The converter's main process writes every sample, so its cost per sample bounds the
    conversion on many cores: no `TarFile.addfile` with its copying, and each header is `_HEADER`
    with the name, size and checksum filled in, not one built by `TarInfo.tobuf` (figures:
    docs/performance.md, conversion).
    """

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "wb")
        self.offset = 0
        self.lines: list[str] = []

    def _add(self, name: str, data: bytes) -> str:
        header = _header(name, len(data))
        data_at = self.offset + len(header)
        padding = -len(data) % _BLOCK
        self.handle.write(header)
        self.handle.write(data)
        self.handle.write(bytes(padding))
        self.offset = data_at + len(data) + padding
        ext = name.split(".", 1)[1]
        return f"{ext} {data_at} {len(data)} {name}"

    def add_sample(self, key: str, jpeg: bytes, label: int) -> None:
        parts = [self._add(f"{key}.{IMAGE_EXT}", jpeg),
                 self._add(f"{key}.{LABEL_EXT}", str(int(label)).encode("ascii"))]
        self.lines.append(" ".join(parts))

    def close(self) -> dict:
        end = self.offset + 2 * _BLOCK
        self.handle.write(bytes(2 * _BLOCK + -end % tarfile.RECORDSIZE))
        self.handle.close()
        index = self.path.with_suffix(".idx")
        with open(index, "w") as handle:
            handle.write(f"{INDEX_VERSION} {len(self.lines)}\n")
            handle.writelines(line + "\n" for line in self.lines)
        return {"tar": self.path.name, "index": index.name, "num_samples": len(self.lines)}


def write_meta(dst: Path, shards: Sequence[dict], classes: Sequence[str], prep: ImagePrep) -> None:
    """dataset.json of the directory `dst` holding `shards` (`ShardWriter.close()` results, in order)."""
    meta = {
        "format": "webdataset",
        "index_version": INDEX_VERSION,
        "num_samples": sum(shard["num_samples"] for shard in shards),
        "num_classes": len(classes),
        "classes": list(classes),
        "extensions": {"image": IMAGE_EXT, "label": LABEL_EXT},
        "max_resolution": prep.max_resolution,
        "jpeg_quality": prep.jpeg_quality,
        "shuffle_seed": SHUFFLE_SEED,
        "shards": list(shards),
    }
    write_json(dst / "dataset.json", meta)


def names_records(data: str | Path) -> bool:
    """Whether the directory `data` holds records written by `tools.convert --format dali` (their dataset.json
    and shards) rather than an ImageFolder, whose class directories may sit beside a dataset.json of its own."""
    root = Path(data)
    return root.is_dir() and (root / "dataset.json").is_file() and not any(
        entry.is_dir() and not entry.name.startswith(".") for entry in root.iterdir())


def written_files(root: Path) -> tuple[list[str], int] | None:
    """(names of the files a previous conversion wrote into `root`, its sample count) if `root`
    holds a readable dataset.json of this format; None otherwise."""
    try:
        meta = json.loads((root / "dataset.json").read_text())
        shards = meta["shards"]
        names = ["dataset.json"] + [name for shard in shards for name in (shard["tar"], shard["index"])]
        if meta.get("format") != "webdataset" or any("/" in name or name.startswith(".") for name in names):
            return None
        return names, int(meta["num_samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def index_problem(path: Path, num_samples: int) -> str | None:
    """Why `path` is not the index of a shard of `num_samples` samples: its first line must be
    `v1.2 <num_samples>`, then one whole line per sample; None if it is. Counts lines, parses no entry."""
    data = path.read_bytes()
    first, _, entries = data.partition(b"\n")
    expected = f"{INDEX_VERSION} {num_samples}"
    if first.decode("utf-8", "replace").strip() != expected:
        return f"its first line is {first[:40].decode('utf-8', 'replace')!r}, not '{expected}'"
    lines = entries.count(b"\n")
    if lines != num_samples or not data.endswith(b"\n"):
        return f"it holds {lines} whole lines of samples, not {num_samples}"
    return None


def shuffled_order(num_samples: int) -> np.ndarray:
    """The source positions in the order the shards store them (fixed seed `SHUFFLE_SEED`)."""
    return np.random.default_rng(SHUFFLE_SEED).permutation(num_samples)

"""The DALI webdataset format the converter writes: tar shards with DALI index files.

Layout of the output directory:

    dataset.json          description (below); paths in it are relative to this directory
    shard-00000.tar       POSIX ustar archive of samples 0 .. shard_size-1
    shard-00000.idx       DALI webdataset index of shard-00000.tar
    shard-00001.tar ...

Each sample is two tar members sharing a key: `<key>.jpg` (JPEG bytes) and `<key>.cls` (the
label as ASCII decimal, no newline). Keys are the zero-padded global sample number
(`00000000`, ...), so they are unique across shards and contain no dot. Members are written
with mtime 0, uid/gid 0 and mode 0644, so the same input gives byte-identical shards.

Samples are written in a fixed pseudo-random order (seed `SHUFFLE_SEED`), not class-sorted,
because `fn.readers.webdataset(random_shuffle=True)` only shuffles within a buffer of
`initial_fill` samples and would otherwise see long runs of one class.

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

import io
import random
import tarfile
from multiprocessing import Pool
from pathlib import Path
from typing import Sequence

from bt_fast.files import write_json
from bt_fast.progress import progress
from pipelines.base import DataError
from pipelines.images import ImagePrep

INDEX_VERSION = "v1.2"
SHUFFLE_SEED = 0
IMAGE_EXT, LABEL_EXT = "jpg", "cls"
_BLOCK = 512


def _encode_job(job: tuple[ImagePrep, str]) -> tuple[bytes | None, str | None]:
    prep, path = job
    try:
        return prep.jpeg(path), None
    except Exception as err:  # noqa: BLE001 - reported by write_dali
        return None, " ".join(str(err).split()) or type(err).__name__


class _ShardWriter:
    """One tar shard being written, with the DALI index entries of its samples."""

    def __init__(self, path: Path):
        self.path = path
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.lines: list[str] = []

    def _add(self, name: str, data: bytes) -> str:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header_at = self.tar.offset
        self.tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // _BLOCK) * _BLOCK
        data_at = self.tar.offset - padded  # the header(s) precede the data
        if data_at % _BLOCK or data_at <= header_at:
            raise AssertionError(f"unexpected tar layout for {name} in {self.path}")
        ext = name.split(".", 1)[1]
        return f"{ext} {data_at} {len(data)} {name}"

    def add_sample(self, key: str, jpeg: bytes, label: int) -> None:
        parts = [self._add(f"{key}.{IMAGE_EXT}", jpeg),
                 self._add(f"{key}.{LABEL_EXT}", str(int(label)).encode("ascii"))]
        self.lines.append(" ".join(parts))

    def close(self) -> dict:
        self.tar.close()
        index = self.path.with_suffix(".idx")
        with open(index, "w") as handle:
            handle.write(f"{INDEX_VERSION} {len(self.lines)}\n")
            handle.writelines(line + "\n" for line in self.lines)
        return {"tar": self.path.name, "index": index.name, "num_samples": len(self.lines)}


def write_dali(dst: Path, samples: Sequence[tuple[str, int]], prep: ImagePrep, *, workers: int, shard_size: int,
               classes: Sequence[str], show_progress: bool = True) -> None:
    """Write `samples` (validated (path, label)) as shards of `shard_size` samples, their indices
    and dataset.json (`classes`: names indexed by label) into the existing empty directory `dst`,
    encoding over `workers` processes.

    Raises DataError if any image fails to prepare (e.g. the file changed since validation).
    """
    order = list(range(len(samples)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    ordered = [samples[i] for i in order]
    jobs = [(prep, path) for path, _ in ordered]
    workers = max(1, min(workers, len(jobs)))

    shards: list[dict] = []
    shard: _ShardWriter | None = None
    pool = Pool(workers) if workers > 1 else None
    try:
        results = (pool.imap(_encode_job, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 8))))
                   if pool else map(_encode_job, jobs))
        for number, ((path, label), (jpeg, error)) in enumerate(
                progress(zip(ordered, results), total=len(jobs), desc="writing shards", unit="img",
                         enabled=show_progress)):
            if error is not None:
                raise DataError(f"{path} failed while writing: {error}; did the source change during "
                                "conversion? nothing was written")
            if number % shard_size == 0:
                if shard is not None:
                    shards.append(shard.close())
                shard = _ShardWriter(dst / f"shard-{len(shards):05d}.tar")
            shard.add_sample(f"{number:08d}", jpeg, label)
        if shard is not None:
            shards.append(shard.close())
            shard = None
    finally:
        if shard is not None:
            shard.tar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    meta = {
        "format": "webdataset",
        "index_version": INDEX_VERSION,
        "num_samples": len(ordered),
        "num_classes": len(classes),
        "classes": list(classes),
        "extensions": {"image": IMAGE_EXT, "label": LABEL_EXT},
        "max_resolution": prep.max_resolution,
        "jpeg_quality": prep.jpeg_quality,
        "shuffle_seed": SHUFFLE_SEED,
        "shards": shards,
    }
    write_json(dst / "dataset.json", meta)

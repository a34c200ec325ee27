"""The converter's unit of work that survives a kill: the work directory beside DST and its parts.

`pipelines.convert` lists the source and splits it into parts of consecutive output positions; here
each part is filled from the stream of prepared images (`prepared`, over `worker_pool`'s processes)
and kept, data first and its report last, in `WorkDir`, so that a rerun with the same job redoes
only the parts that have no report yet.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from bt_fast.errors import DataError, option_flag
from bt_fast.files import remove_path, write_json
from bt_fast.host import HeapTrim
from bt_fast.worker_pool import WorkerPool
from pipelines.area_resize import load_kernel
from pipelines.dali_format import ShardWriter
from pipelines.ffcv_format import BetonPart, data_start, page_size_for
from pipelines.images import ImagePrep, Prepared, cv2_module


def _differences(previous: dict, job: dict) -> list[str]:
    """What differs between two jobs, in the command's terms: '--part-size 500 -> 1000', 'the source's images'.
    Another format is all it says of a job in the other format, whose part size is another option."""
    if previous.get("format") != job.get("format"):
        return [f"--format {previous.get('format')} -> {job.get('format')}"]
    named = {"part_size": "shard_size" if job.get("format") == "dali" else "part_size"}
    differences = []
    for key in job:
        if previous.get(key) == job.get(key):
            continue
        if key in ("num_samples", "listing_sha256"):
            difference = "the source's images"
        elif key == "source":
            difference = f"another source, {previous.get(key)}"
        elif key == "beton":
            difference = "parts an earlier version of the converter wrote"
        else:
            difference = f"{option_flag(named.get(key, key))} {previous.get(key)} -> {job.get(key)}"
        if difference not in differences:
            differences.append(difference)
    return differences


def work_dir(dst: str | Path) -> Path:
    """Where `convert` keeps the finished parts of output `dst` until it is complete."""
    dst = Path(dst)
    return dst.with_name(f".{dst.name}.parts")


class WorkDir:
    """`work_dir(dst)`: `job.json` (what is being converted) and, per finished part k, `part-k.json`
    (its report, written last) beside its data. dali: the shard's `.tar` and `.idx`. ffcv: the part's
    pages in `beton`, the `.beton` being written in place, and the part's rows (`part-k.rows.npy`)
    for its tables."""

    def __init__(self, dst: Path, job: dict):
        self.root = work_dir(dst)
        self.job = job
        self.removed: tuple[int, list[str]] = (0, [])  # finished parts of another job removed, and what differed
        self.root.mkdir(exist_ok=True)
        self.lock = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            raise DataError(f"another conversion to {dst} is running (it holds {self.root}); wait for it") from None
        try:
            previous = json.loads((self.root / "job.json").read_text())
        except (OSError, ValueError):
            previous = None
        if previous != job:  # other arguments or another source: nothing here can be reused
            if isinstance(previous, dict):
                self.removed = (len(list(self.root.glob("part-*.json"))), _differences(previous, job))
            for entry in self.root.iterdir():
                if entry.name != ".lock":
                    remove_path(entry)
            write_json(self.root / "job.json", job)

    def part(self, k: int, suffix: str) -> Path:
        return self.root / f"part-{k:05d}{suffix}"

    def shard(self, k: int) -> Path:
        """Part `k`'s tar shard (dali); its index is beside it as `.idx`."""
        return self.root / f"shard-{k:05d}.tar"

    @property
    def beton(self) -> Path:
        """ffcv: the `.beton` the parts are written into, one after another, before it becomes DST."""
        return self.root / "output.beton"

    def discard(self, k: int) -> None:
        """Remove what the unfinished part `k` has written so far: it only takes room."""
        for path in (self.part(k, ".json"), self.part(k, ".rows.npy"), self.shard(k), self.shard(k).with_suffix(".idx")):
            path.unlink(missing_ok=True)
        if self.beton.is_file() and self.beton.stat().st_size > self.data_end(k):
            os.truncate(self.beton, self.data_end(k))

    def kept_after_fault(self, writing: int | None, parts: int) -> int:
        """After a fault: the unfinished part `writing`'s data removed (it only takes room), how many
        of the `parts` are finished and kept for the rerun."""
        if writing is not None:
            self.discard(writing)
        return len(self.finished(parts))

    def bytes_still_needed(self, parts: int) -> int | None:
        """About how many bytes the rest of the conversion writes: the disk the finished parts among the first
        `parts` take per image (input position) times the positions left; None before a part is finished."""
        reports = self.finished(parts)
        done = sum(report["written"] + report["skipped"] for report in reports.values())
        if not done:
            return None
        if self.job["format"] == "ffcv":  # one file; its pages' unused ends are holes, which take no disk
            used = self.beton.stat().st_blocks * 512
        else:
            used = sum((self.root / name).stat().st_blocks * 512 for report in reports.values() if report["shard"]
                       for name in (report["shard"]["tar"], report["shard"]["index"]))
        return round(used / done * (self.job["num_samples"] - done))

    def finished(self, parts: int) -> dict[int, dict]:
        """The reports of the finished parts among the first `parts`, by part: those whose data is all
        here. The parts of a `.beton` lie back to back in it, so there they are the first few."""
        reports = {}
        for k in range(parts):
            try:
                report = json.loads(self.part(k, ".json").read_text())
            except (OSError, ValueError):
                report = None
            if report is not None and "shard" in report:
                files = [report["shard"]["tar"], report["shard"]["index"]] if report["shard"] else []
                if all((self.root / name).is_file() for name in files):
                    reports[k] = report
            elif (report is not None and self.part(k, ".rows.npy").is_file() and self.beton.is_file()
                  and self.beton.stat().st_size >= report.get("beton_end", float("inf"))):
                reports[k] = report
            elif self.job["format"] == "ffcv":
                break
        return reports

    def data_end(self, k: int) -> int:
        """ffcv: where the data region of `beton` ends after the first `k` parts (its start for k = 0)."""
        if k:
            return json.loads(self.part(k - 1, ".json").read_text())["beton_end"]
        return data_start(self.job["num_samples"], page_size_for(self.job["max_resolution"]))

    def close(self, remove: bool) -> None:
        self.lock.close()
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def job_fingerprint(src: Path, samples: Sequence[tuple[str, int]]) -> str:
    """sha256 of the resolved source and its (path, label) samples: what a work directory's parts were made of,
    the same however the source is spelled (relative, from another directory). An ImageFolder's paths are taken
    below it (`listing_digest`); a list file's as they resolve from here (it may name absolute paths too)."""
    head = str(src.resolve()).encode("utf-8", "surrogateescape")
    if src.is_dir():
        return _samples_digest(samples, head, skip=_prefix_length(src))
    return _samples_digest(((os.path.abspath(path), label) for path, label in samples), head)


def listing_digest(src: str | Path, samples: Sequence[tuple[str, int]]) -> str:
    """sha256 of an ImageFolder's (path below `src`, label) samples: the same for the same listing however
    `src` is spelled, and another when an image was added, removed, renamed or moved to another class."""
    return _samples_digest(samples, skip=_prefix_length(src))


def _prefix_length(src: str | Path) -> int:
    """The length of the prefix an ImageFolder listing of `src` puts before every path ('.': none)."""
    return len(str(Path(src) / "_")) - 1


def _samples_digest(samples: Iterable[tuple[str, int]], head: bytes = b"", skip: int = 0) -> str:
    digest = hashlib.sha256(head)
    for path, label in samples:
        digest.update(f"{path[skip:]}\0{label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


_heap = HeapTrim()  # each worker process's own, from its first job


def _prepare_job(job: tuple[ImagePrep, str]) -> Prepared:
    prep, path = job
    result = prep.stored(path)
    _heap.after_task()  # a large image's memory does not stay with the worker (HeapTrim)
    return result


@contextmanager
def worker_pool(workers: int) -> Iterator[WorkerPool | None]:
    """`workers` processes for `prepared`, or None for one (this process prepares the images).

    Start it before listing the source: a worker forked later maps the whole listing (a `SampleList`,
    about 70 bytes per image, 83 MiB for ImageNet) into its own memory.
    """
    cv2_module().setNumThreads(1)  # one image per process; no nested thread pools on shared cores
    load_kernel()  # built and loaded once here; the forked workers inherit it
    if workers <= 1:
        yield None
        return
    Image.init()  # PIL's decoders too: imported here, not in each worker (WorkerPool)
    with WorkerPool(workers) as pool:  # leaving the block stops the workers
        yield pool


@contextmanager
def prepared(jobs: Iterator[tuple[ImagePrep, str]], count: int, pool: WorkerPool | None,
              workers: int) -> Iterator[Iterator[Prepared]]:
    """`_prepare_job` of every job, in order, over the `workers` processes of `pool` (here if None).

    At most `window` jobs are out at a time: while the caller pauses (an fsync at the end of a
    part) the workers stop instead of piling up finished images in this process's memory.
    """
    if pool is None or count < 2:
        yield map(_prepare_job, jobs)
        return
    chunksize = max(1, min(16, count // (workers * 8)))
    window = 4 * chunksize * workers
    free = threading.Semaphore(window)
    closing = threading.Event()

    def throttled() -> Iterator[tuple[ImagePrep, str]]:
        for job in jobs:  # runs in the pool's task thread
            free.acquire()
            if closing.is_set():  # stop feeding: the pool's shutdown joins this thread
                return
            yield job

    def consumed(results: Iterator[Prepared]) -> Iterator[Prepared]:
        received = HeapTrim(4 << 20)  # the results' bytes pass through this process's heap too
        for result in results:
            free.release()
            received.after_task()
            yield result

    try:
        yield consumed(pool.imap(_prepare_job, throttled(), chunksize=chunksize))
    finally:
        closing.set()
        free.release()  # the task thread may be waiting for a slot: it wakes, sees `closing` and ends


@contextmanager
def _closed_on_error(handle) -> Iterator[None]:
    try:
        yield
    except BaseException:
        handle.close()
        raise


def _sync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_part(work: WorkDir, k: int, start: int, positions: np.ndarray, samples: Sequence[tuple[str, int]],
                results: Iterator[Prepared], prep: ImagePrep, beton: BinaryIO | None) -> dict:
    """Write part `k` (output positions start.., holding the samples `positions`) from `results`
    and its report; returns the report. ffcv: into `beton`, open at the end of part k - 1."""
    files: list[dict] = []
    written = 0
    fmt = work.job["format"]
    if fmt == "dali":
        writer = ShardWriter(work.shard(k))
    else:
        writer = BetonPart(beton, page_size=page_size_for(prep.max_resolution))
    # dali: an unlinked shard that is still open keeps its room (ffcv: the part's pages are cut off the file)
    with _closed_on_error(writer.handle) if fmt == "dali" else nullcontext():
        for offset, position in enumerate(positions):
            path, label = samples[int(position)]
            result = next(results)
            if result.status != "ok":
                files.append({"path": path, "status": result.status, "reason": result.reason})
            if result.status == "skipped":
                continue
            written += 1
            if fmt == "dali":
                writer.add_sample(f"{start + offset:08d}", result.data, label)
            else:
                writer.add(result.data, result.width, result.height, label)
        finished = writer.close()  # dali: the shard's description; ffcv: the rows
    report = {"written": written, "skipped": len(positions) - written,
              "converted": sum(1 for entry in files if entry["status"] == "converted"), "files": files}
    if fmt == "dali":
        shard = finished
        if shard["num_samples"]:
            _sync(work.root / shard["tar"])
            _sync(work.root / shard["index"])
        else:
            remove_path(work.root / shard["tar"])
            remove_path(work.root / shard["index"])
        report["shard"] = shard if shard["num_samples"] else None
    else:
        beton.flush()
        os.fsync(beton.fileno())
        report["beton_end"] = beton.tell()
        np.save(work.part(k, ".rows.npy"), finished)
        _sync(work.part(k, ".rows.npy"))
    write_json(work.part(k, ".json"), report)
    return report


@contextmanager
def open_beton(work: WorkDir, todo: Sequence[int]) -> Iterator[BinaryIO | None]:
    """ffcv: the `.beton` being written, open at the end of the finished parts (whatever an unfinished
    part left after them cut off) for the parts `todo` to follow; dali: None."""
    if work.job["format"] != "ffcv" or not todo:
        yield None
        return
    end = work.data_end(todo[0])
    with open(work.beton, "r+b" if work.beton.is_file() else "w+b") as beton:
        beton.truncate(end)  # from the start: a hole (zeros) where the tables go last
        beton.seek(end)
        yield beton

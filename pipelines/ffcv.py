"""FFCV pipeline: each stored JPEG is decoded once and cut into both views' random-resized crops.

Three modes (`ffcv.decode`, `ffcv.crop`), each delivering the same (view1, view2):

- decode=host, crop=device (crop=auto on CUDA): FFCV's numba-compiled loader decodes each JPEG with
  libjpeg-turbo into a padded (B, Hmax, Wmax, 3) uint8 slot (`PaddedDecoder`) and draws both
  views' boxes (`TwoCropBoxes`); the device cuts and resizes both crops in one batched pass
  (`pipelines.device_crop.resized_crops`, torchvision's antialiased bicubic `resized_crop`).
- decode=device (crop=device): the loader only copies each sample's stored bytes
  (`JPEGBytesDecoder`); the device decodes them (`pipelines.device_decode`), then crops the same way.
- crop=host (decode=host; crop=auto on the CPU): the loader decodes and resizes both crops with
  OpenCV INTER_AREA (`pipelines.ffcv_host_crop.TwoCropRGBDecoder`). On a CPU-only machine this is
  the cheapest in total (docs/pipelines.md).

The boxes are the same in every mode: torchvision's RandomResizedCrop sampling seeded by (seed,
epoch, sample index) (`pipelines.crop_sampling`), so they do not change with the number of
workers or ranks. Host buffers reach the device through FFCV `ToDevice` (pinned, non-blocking,
on a side stream on CUDA), and `pipelines.augment.TwoViewAugment` does flip, colour jitter,
grayscale, blur, solarize and normalisation there. FFCV would allocate its batch buffers anew
every epoch; the loader here keeps them, stopping the previous epoch's thread before the next
starts (batches handed out are valid until a few batches later, as within an epoch).

Sharding: FFCV 1.0.2's `distributed=True` needs an initialised torch.distributed group,
pads the epoch with repeated samples and has no quasi-random order, so the epoch order is
`pipelines.epochs`' convention: a global order from (seed, epoch), the same on every rank,
rank r reading its r-th contiguous block. For `order: quasi_random` the global order is FFCV's
page-local quasi-random order of all samples. Each image goes to at most one rank per epoch,
and the ranks' batch counts are equal.
"""
from __future__ import annotations

import fcntl
import os
import queue
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator

import numba
import numpy as np
import torch

import pipelines.ffcv_import  # noqa: F401 - first: FFCV's import side effects, undone
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import ToDevice, ToTensor
from ffcv.traversal_order.quasi_random import generate_order_inner

from bt_fast.config import AugmentSpec, Config, ConfigError
from bt_fast.errors import DataError, flat_message
from bt_fast.host import usable_cores
from pipelines.augment import TwoViewAugment
from pipelines.base import EpochPipeline, Placement
from pipelines.convert import (ConversionSignals, convert, kept_after_interrupt, outcome, report_path, source_change,
                              stopped)
from pipelines.device_crop import resized_crops
from pipelines.device_decode import decode_padded
from pipelines.epochs import epoch_seed, rank_block, rank_indices, samples_per_rank
from pipelines.ffcv_decoders import BOXES, JPEGBytesDecoder, PaddedDecoder, PaddedLayout, TwoCropBoxes
from pipelines.ffcv_format import beton_is_a_directory, beton_path, missing_beton, open_beton, unwritable_beton
from pipelines.ffcv_host_crop import TwoCropRGBDecoder
from pipelines.ffcv_memory import lazy_page_tables
from pipelines.prefetch import run_ahead


# --------------------------------------------------------------------------------------------
# Epoch order and the loader
# --------------------------------------------------------------------------------------------

# Streams of `epoch_seed` (stream 0 is `pipelines.epochs`' random order).
QUASI_RANDOM_STREAM, CROP_STREAM, AUGMENT_STREAM = 1, 2, 3  # AUGMENT_STREAM + rank: the device augmentation


class EpochSharding:
    """This rank's sample order for each epoch (`pipelines.epochs`: a global order, one contiguous block per rank)."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, order: str = "random",
                 page_to_samples: dict | None = None, batch_size: int = 1):
        if order not in ("random", "quasi_random"):
            raise DataError(f"config key 'ffcv.order' must be random or quasi_random, got '{order}'")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.order, self.batch_size = seed, order, batch_size
        self.per_rank = num_samples // world_size
        if order == "quasi_random":
            if not page_to_samples:
                raise DataError("ffcv.order=quasi_random needs a .beton whose samples span pages; use order=random")
            pages = int(max(page_to_samples)) + 1
            self._page_sizes = np.zeros(pages, dtype=np.int64)
            self._pages = np.zeros((pages, max(len(s) for s in page_to_samples.values())), dtype=np.int64)
            for page, samples in page_to_samples.items():
                members = sorted(int(s) for s in samples)
                self._pages[page, :len(members)] = members
                self._page_sizes[page] = len(members)

    def indices(self, epoch: int) -> np.ndarray:
        if self.order == "random":
            return rank_indices(self.num_samples, self.seed, epoch, self.rank, self.world_size).astype(np.uint64)
        # FFCV's page-buffered shuffle of all samples (same on every rank); a copy of the page
        # table each time so an epoch's order does not depend on earlier epochs.
        order = np.zeros(self.num_samples, dtype=np.int64)
        generate_order_inner(epoch_seed(self.seed, epoch, QUASI_RANDOM_STREAM), self._pages.copy(), self._page_sizes,
                             order, 2 * self.batch_size)
        return rank_block(order, self.rank, self.world_size).astype(np.uint64)


class _Stopped(Exception):
    """The epoch was closed: its thread ends before its next batch."""


class _SeededEpochIterator(EpochIterator):
    """FFCV's epoch thread, with the operation's crop seed written before the thread starts.

    An exception in FFCV's thread would otherwise end it silently and leave the consumer
    waiting forever; here it ends the epoch and is raised in the consumer. A closed epoch's thread
    ends before its next batch (FFCV's own looks at its stop flag only while its queue is full).
    """

    def __init__(self, loader: "_TwoCropLoader", order: np.ndarray, crop_seed: int):
        self._crop_seed = crop_seed
        self._error: BaseException | None = None
        super().__init__(loader, order)

    def start(self) -> None:  # called at the end of EpochIterator.__init__, once buffers exist
        self.loader.seeded.set_epoch_seed(self.loader.graph, self.memory_allocations, self._crop_seed)
        super().start()

    def run(self) -> None:
        if self.loader.device.type == "cuda":  # GPU only: FFCV's thread would otherwise work on (and create a context on) cuda:0
            torch.cuda.set_device(self.loader.device)
        try:
            super().run()
        except _Stopped:
            return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._error = err
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(None, timeout=0.5)
                    return
                except queue.Full:
                    pass

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        if self.terminate_event.is_set():
            raise _Stopped
        # FFCV only makes the slot's stream wait for the consumer's last use of the slot, while its
        # compiled code rewrites the slot's pinned host buffers at once: wait on the host (in this
        # thread, batches_ahead + 1 batches later) so no copy from them can still be in flight.
        if cuda_event is not None:  # GPU only
            cuda_event.synchronize()
        return super().run_pipeline(b_ix, batch_indices, batch_slot, None)

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self._error is not None:
                kind, message = type(self._error).__name__, flat_message(self._error)
                raise DataError(f"the FFCV loader of {self.loader.fname} failed: "
                                f"{kind if message == kind else f'{kind}: {message}'}") from self._error
            raise


def wait_os_thread_exit(thread: threading.Thread, timeout: float = 2.0) -> None:
    """Return once the joined `thread` has left the OS as well (Linux; elsewhere at once).

    `Thread.join` returns before the thread's C-level thread-local destructors run. TBB detaches a
    thread that ran numba's parallel code in one of them, and until it has, a fork (the k-NN
    monitor's DataLoader workers) makes numba print "Unable to join threads to shut down before fork()".
    """
    task = f"/proc/self/task/{thread.native_id}"
    deadline = time.monotonic() + timeout
    while os.path.exists(task) and time.monotonic() < deadline:
        time.sleep(0.001)


class _TwoCropLoader(Loader):
    """FFCV Loader with our epoch order (`EpochSharding`) from any batch of it, per-epoch crop seeds, batch
    buffers kept across epochs and page tables built only if read (`pipelines.ffcv_memory`).

    `pipelines` maps output names to FFCV pipelines or `PipelineSpec`s (unnamed fields are not
    read); `seeded` is the operation that draws the boxes (it has `set_epoch_seed`).
    """

    def __init__(self, fname: str, batch_size: int, num_workers: int, os_cache: bool, pipelines: dict,
                 seeded, device: torch.device, batches_ahead: int = 3):
        self.seeded = seeded
        self.device = device
        self.sharding: EpochSharding | None = None
        self.crop_seed_base = 0
        self.start_batch = 0  # the next epoch starts at this batch (a resumed run's position)
        self._epoch: _SeededEpochIterator | None = None
        self._buffers = None
        with lazy_page_tables():
            super().__init__(fname, batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                             order=OrderOption.SEQUENTIAL, distributed=False, seed=0,
                             pipelines={**{name: None for name in Reader(fname).handlers}, **pipelines},
                             drop_last=True, batches_ahead=batches_ahead)
        self._allocate = self.graph.allocate_memory
        self.graph.allocate_memory = self._kept_buffers  # EpochIterator.__init__ asks the graph each epoch

    def _kept_buffers(self, batch_size: int, slots: int):
        if self._buffers is None:
            self._buffers = self._allocate(batch_size, slots)
        return self._buffers

    def stop_epoch(self) -> None:
        """End the last epoch's thread (it may be mid-epoch) so that nothing writes the kept buffers any more."""
        if self._epoch is None:
            return
        epoch, self._epoch = self._epoch, None
        epoch.terminate_event.set()
        while epoch.is_alive():
            with suppress(queue.Empty):  # room for the end marker, which FFCV puts without a timeout
                while True:
                    epoch.output_queue.get_nowait()
            epoch.join(timeout=0.05)
        wait_os_thread_exit(epoch)
        epoch.close()  # after the thread: with os_cache=false this also stops the page readers it used
        if self.device.type == "cuda":  # GPU only: the consumer's last reads are done, and so are the copies
            # of batches never taken (an epoch closed early), whose slots the next epoch rewrites
            torch.cuda.synchronize(self.device)

    def __len__(self) -> int:
        if self.sharding is None:
            return super().__len__()
        return self.sharding.per_rank // self.batch_size

    def __iter__(self) -> EpochIterator:
        Compiler.set_num_threads(self.num_workers)
        epoch = self.next_epoch
        self.next_epoch += 1
        order = self.sharding.indices(epoch)[self.start_batch * self.batch_size:len(self) * self.batch_size]
        if self.code is None or self.recompile:
            self.generate_code()
        self.stop_epoch()
        self._epoch = _SeededEpochIterator(self, order, epoch_seed(self.crop_seed_base, epoch, CROP_STREAM))
        return self._epoch


# --------------------------------------------------------------------------------------------
# The .beton: convert on first use
# --------------------------------------------------------------------------------------------

def _host_workers(config: Config) -> int:
    """The host processes or threads of FFCV's loader and first-use conversion: `workers`, at most the usable
    cores; all of them for 0."""
    return min(config.workers, usable_cores()) if config.workers > 0 else usable_cores()


def _run_identity() -> str:
    """What the ranks of one distributed run share and no other run does (torchrun's run id and the rank 0
    address it rendezvoused at); "" for a single process."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"{run}@{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}" if run else ""


@contextmanager
def _file_lock(path: Path, data: str, waiting: Callable[[str], None] | None = None):
    """Exclusive lock beside `path`, so ranks sharing a filesystem convert once; removed afterwards. Where
    another run holds it, `waiting` (if given) is told so in one line before this one waits: the conversion
    it waits for may take hours, and the run would seem to hang without a word. The holder writes its
    `_run_identity` into the lock file, so that a rank waiting for its own run's converting rank says nothing.

    A rank that still waits on the removed lock file finds the .beton written when it gets the lock.
    """
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as tools.convert makes its output's folder
        handle = open(lock_path, "a+")  # not "w": the holder's identity stays readable
    except OSError as err:
        raise unwritable_beton(path, data, err) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read()
            if waiting is not None and not (holder and holder == _run_identity()):
                waiting(f"waiting for another process converting {data} to {path} (it holds {lock_path}); this "
                        f"run goes on once that conversion has finished")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write(_run_identity())
        handle.flush()
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_beton(config: Config, log: Callable[[str], None] | None = None, *, warn: bool = True) -> Path:
    """The .beton to read, converting `config.data` with `pipelines.convert` if it does not exist yet; a
    directory there is a DataError (the converter would replace an empty one, or refuse another in its own
    terms). With `warn` (one rank of a run), an existing .beton whose folder changed since is a warning, and
    a wait for another process's conversion of it is said. Ctrl-C or a stop signal meanwhile (the
    conversion's, or the wait's) is an `Interrupted` error saying what is kept, exit 128 + the signal."""
    path = beton_path(config)
    if path.is_file():
        if warn:
            _warn_if_stale(path, config.data)
        return path
    if path.is_dir():
        raise beton_is_a_directory(path)
    if not config.data:
        raise missing_beton(path)
    if not Path(config.data).exists():
        raise DataError(f"data directory {config.data} does not exist, nor does {path}; give an ImageFolder that "
                        f"exists (converted to {path} on first use) or point ffcv.beton at a .beton")
    say = log or (lambda message: print(message, file=sys.stderr))
    report, locked = None, False
    try:
        with ConversionSignals(), _file_lock(path, config.data, say if warn else None):
            locked = True
            if not path.is_file():  # another rank may have finished while we waited
                report = convert(config.data, path, "ffcv", max_resolution=config.ffcv.max_resolution,
                                 jpeg_quality=config.ffcv.jpeg_quality,
                                 workers=_host_workers(config),
                                 starting=lambda: say(f"converting {config.data} to {path} for the FFCV pipeline "
                                                      f"(first use)"))
    except KeyboardInterrupt as stop:  # Ctrl-C, or a stop signal (`pipelines.convert.StopSignal`)
        if path.is_file():  # just written, here or by the process waited for
            raise stopped(stop, f" once {path} was written; nothing is lost: the same command reads it") from None
        if not locked:
            raise stopped(stop, f" while waiting for another process converting {config.data} to {path}; that "
                                f"conversion goes on, and the same command uses {path} once it is written") from None
        raise stopped(stop, f" while converting {config.data} to {path} (first use); "
                            f"{kept_after_interrupt(path)}") from None
    if report is not None:
        say(outcome(report))
        if report["skipped"]:
            say(f"warning: {report['skipped']} of {report['written'] + report['skipped']} images in "
                f"{config.data} are unreadable and were left out; they are listed in {report_path(path)}")
    return path


def _warn_if_stale(path: Path, data: str) -> None:
    """A .beton converted from `data` whose images have since changed would silently train on the old set
    (`pipelines.convert.source_change`)."""
    change = source_change(path, data)
    if change:
        print(f"warning: {change}; delete {path} to reconvert", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

def resolve_crop(config: Config, device: torch.device) -> str:
    """`ffcv.crop`, with auto resolved: the device crop on CUDA, where it is cheap, and wherever the host crop
    cannot serve (decode=device, a resolution schedule); the host crop on the CPU, where it costs less in total."""
    if config.ffcv.crop != "auto":
        return config.ffcv.crop
    if device.type == "cuda" or config.ffcv.decode == "device" or config.augment.progressive:
        return "device"
    return "host"


def device_crop_dtype(device: torch.device) -> torch.dtype:
    """The dtype the device crop cuts in: float16 on CUDA (its matmuls are exact enough there), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32  # GPU only: half


def host_crop_size(spec: AugmentSpec) -> int:
    """The output side of `TwoCropRGBDecoder`, which FFCV compiles for one size: no resolution schedule."""
    if spec.progressive:
        raise ConfigError(f"config key 'augment.start_image_size' ({spec.start_image_size}) sets a resolution "
                          f"schedule, but FFCV's host crop has one output size, fixed when FFCV compiles its "
                          f"loader; set ffcv.crop=device to crop on the device")
    return spec.image_size


class FFCVPipeline(EpochPipeline):
    """`.beton` -> host stage (FFCV's loader) -> both views' crops -> device augmentations -> (view1, view2).

    The mode comes from `config.ffcv.decode` and `config.ffcv.crop` (module docstring).
    """

    def __init__(self, config: Config, placement: Placement, batch_size: int, *, batches_ahead: int = 3):
        super().__init__(config, placement, batch_size)
        self.decode, self.crop = config.ffcv.decode, resolve_crop(config, placement.device)
        self.path = ensure_beton(config, warn=placement.rank == 0)
        reader = open_beton(self.path)
        self.num_samples = int(reader.num_samples)
        samples_per_rank(int(reader.num_samples), batch_size, placement.world_size, f"FFCV dataset {self.path}")
        if self.crop == "device":
            self.layout = PaddedLayout.of(reader)
            self.layout.check_side(self.path, config.ffcv.max_padded_side)
            if placement.rank == 0:
                print(self.memory_line(), file=sys.stderr)
        pipelines, seeded = self._host_stage()
        # numba cannot run more threads than it started with (NUMBA_NUM_THREADS, the core count).
        workers = max(1, min(_host_workers(config), numba.config.NUMBA_NUM_THREADS))
        threads = torch.get_num_threads()
        try:
            self.loader = _TwoCropLoader(str(self.path), batch_size, workers, config.ffcv.os_cache, pipelines,
                                         seeded, placement.device, batches_ahead)
        finally:
            torch.set_num_threads(threads)  # FFCV sets torch's thread count to its worker count
        self.loader.crop_seed_base = self.seed
        page_to_samples = self.loader.memory_manager.page_to_samples if config.ffcv.order == "quasi_random" else None
        self.loader.sharding = EpochSharding(int(reader.num_samples), placement.rank, placement.world_size,
                                             self.seed, config.ffcv.order, page_to_samples, batch_size)
        self.augment = TwoViewAugment(self.spec, placement.dtype, backend=config.augment.backend)
        self.generator = torch.Generator(device=placement.device)
        self.crop_dtype = device_crop_dtype(placement.device)

    def _host_stage(self) -> tuple[dict, object]:
        """FFCV pipelines of this mode's loader outputs, and the operation that draws the boxes."""
        scale, ratio = self.spec.crop_scale, self.spec.crop_ratio
        if self.crop == "host":
            decoder = TwoCropRGBDecoder(host_crop_size(self.spec), scale, ratio, self.batch_size)
            return {"image": [decoder, ToTensor(), *self._to_device()]}, decoder
        boxes = TwoCropBoxes(scale, ratio)
        if self.decode == "host":
            image, moved = PaddedDecoder(), self._to_device
        else:  # decode_jpeg reads the bytes from the host whatever its device
            image, moved = JPEGBytesDecoder(self.layout.max_bytes, self.path), list
        return {"image": [image, ToTensor(), *moved()],
                "boxes": PipelineSpec("image", decoder=boxes, transforms=[ToTensor(), *moved()])}, boxes

    def _to_device(self) -> list:
        """[ToDevice] on CUDA (pinned host slots, non-blocking, on FFCV's side stream), else []."""
        if self.placement.device.type == "cuda":  # GPU only
            return [ToDevice(self.placement.device, non_blocking=True)]
        return []

    def memory_line(self) -> str:
        """One line: the padded batch buffers' host and device bytes (crop=device)."""
        host = self.layout.host_bytes_per_batch(self.batch_size, self.decode)
        device = self.layout.device_bytes_per_batch(self.batch_size)
        return (f"ffcv: {self.path} pads each image to {self.layout.max_height}x{self.layout.max_width}: "
                f"{host / 2**20:.2f} MiB on the host and {device / 2**20:.2f} MiB on the device per batch of "
                f"{self.batch_size} (decode={self.decode}, crop=device)")

    def __len__(self) -> int:
        return len(self.loader)

    def _size(self, epoch: int) -> int:
        """Output side of the crops in `epoch` (the resolution schedule's, when one is set)."""
        return self.spec.image_size_at(epoch, self.config.epochs)

    def epoch_indices(self) -> np.ndarray:
        """Sample indices this rank reads in the current epoch, in order (all full batches)."""
        return self.loader.sharding.indices(self.epoch)[:len(self) * self.batch_size]

    def host_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """The current epoch's host-stage outputs per batch from `start_batch` on, before any device work.

        crop=host: `(crops,)`, uint8 (B, 2, S, S, 3). crop=device: `(pixels, rows)`, `rows` the
        int32 (B, 11) `pipelines.ffcv_decoders.ROW_FIELDS`, `pixels` the padded uint8 images
        (B, Hmax, Wmax, 3) (decode=host) or stored JPEG bytes (B, max_bytes) (decode=device). On
        CUDA they are on the device, except decode=device's, which `decode_jpeg` reads from the
        host. A batch is a view of FFCV's buffers, valid until a few batches later.
        Closing the generator early (a run that stops mid-epoch) ends FFCV's epoch thread before it returns.
        """
        self.loader.next_epoch, self.loader.start_batch = self.epoch, self.start_batch
        threads = torch.get_num_threads()
        try:
            iterator = iter(self.loader)
        finally:
            torch.set_num_threads(threads)
        try:
            for index, batch in enumerate(iterator):
                if index == 0:  # FFCV's thread set torch's (global) thread count to `workers` as it started
                    torch.set_num_threads(threads)
                yield batch
        finally:
            # The epoch thread ran numba's TBB pool: while it lives, a fork (the k-NN monitor's DataLoader
            # workers) cannot shut TBB down and numba warns "Unable to join threads to shut down before fork()".
            self.loader.stop_epoch()

    def device_crops(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Both views' crops of one host batch on the device: (B, 2, 3, S, S), a channels-last view.

        uint8 for crop=host; otherwise float in [0, 1] (float16 on CUDA), torchvision's
        `resized_crop` (bicubic, antialiased) of each box.
        """
        device = self.placement.device
        if self.crop == "host":
            (crops,) = batch
            return crops.to(device, non_blocking=True).permute(0, 1, 4, 2, 3)
        pixels, rows = batch
        if self.decode == "device":
            sizes = [tuple(row) for row in rows[:, :3].tolist()]
            pixels = decode_padded(pixels, sizes, self.layout.max_height, self.layout.max_width, device, self.path)
        boxes = rows[:, BOXES].view(-1, 2, 4).to(device, non_blocking=True)
        return resized_crops(pixels.to(device, non_blocking=True), boxes, self._size(self.epoch),
                             dtype=self.crop_dtype)

    def views(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The device stage of one host batch: both views' crops, then their distortions."""
        crops = self.device_crops(batch)
        return self.augment(crops[:, 0], crops[:, 1], self.generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch, AUGMENT_STREAM + self.placement.rank))
        self.augment.skip(self.start_batch, self.batch_size, self.generator, self.placement.device)
        return run_ahead(self.host_batches(), self.views, self.config.prefetch, self.placement.device)

"""FFCV pipeline: each JPEG is decoded once and cut into both views' random-resized crops.

Host side (inside FFCV's numba-compiled loader): `TwoCropRGBDecoder` decodes the stored
JPEG with libjpeg-turbo (`ffcv.libffcv.imdecode`) into a per-thread scratch buffer, then
cuts two independent crops with torchvision's RandomResizedCrop sampling (scale/ratio of
the `AugmentSpec`, 10 attempts then the centre-crop fallback) and resizes each to
`image_size` with FFCV's OpenCV INTER_AREA resize. A batch is one uint8 array
(B, 2, S, S, 3). Crop boxes depend only on (seed, epoch, sample index): each sample
reseeds the (thread-local) Mersenne Twister, so they do not change with the number of
workers or ranks.

Device side: the uint8 batch goes to the device (FFCV `ToDevice`, pinned host buffers and
a side stream on CUDA) and `pipelines.augment.TwoViewAugment` does flip, colour jitter,
grayscale, blur, solarize and normalisation there.

Sharding: FFCV 1.0.2's `distributed=True` needs an initialised torch.distributed group,
pads the epoch with repeated samples and has no quasi-random order, so the epoch order is
`pipelines.epochs`' convention: a global order from (seed, epoch), the same on every rank,
rank r reading its r-th contiguous block. For `order: quasi_random` the global order is FFCV's
page-local quasi-random order of all samples. Each image goes to at most one rank per epoch,
and the ranks' batch counts are equal.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import queue
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numba
import numpy as np
import torch

_TORCH_THREADS = torch.get_num_threads()  # importing FFCV sets torch's thread count to 1; undone below
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.loader.epoch_iterator import EpochIterator  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import ToDevice, ToTensor  # noqa: E402
from ffcv.traversal_order.quasi_random import generate_order_inner  # noqa: E402

torch.set_num_threads(_TORCH_THREADS)

from bt_fast.config import AugmentSpec, Config  # noqa: E402
from pipelines.augment import TwoViewAugment  # noqa: E402
from pipelines.base import DataError, Placement, find_image_folder  # noqa: E402
from pipelines.convert import convert, report_path  # noqa: E402
from pipelines.ffcv_format import beton_path, open_beton  # noqa: E402
from pipelines.epochs import epoch_seed, rank_block, rank_indices, samples_per_rank  # noqa: E402

_SEED_MODULUS = 2147483647  # 2**31 - 1 (prime): per-sample seeds stay exact in numba and Python


# --------------------------------------------------------------------------------------------
# Crop sampling (compiled by numba inside the decoder; plain Python when FFCV's compiler is off)
# --------------------------------------------------------------------------------------------

def sample_seed(epoch_seed, sample_index):
    """The Mersenne Twister seed of one sample in one epoch (< 2**31, no overflow anywhere)."""
    a = np.int64(epoch_seed) % _SEED_MODULUS
    b = np.int64(sample_index) % _SEED_MODULUS
    return ((a * 1103515245) % _SEED_MODULUS + (b * 2654435761) % _SEED_MODULUS + 12345) % _SEED_MODULUS


def random_resized_crop(height, width, scale_low, scale_high, log_ratio_low, log_ratio_high, ratio_min, ratio_max):
    """torchvision's `RandomResizedCrop.get_params` with numpy's global (or numba's thread) RNG.

    Returns (top, left, crop_height, crop_width).
    """
    area = height * width
    for _ in range(10):
        target_area = area * (scale_low + (scale_high - scale_low) * np.random.random())
        aspect_ratio = np.exp(log_ratio_low + (log_ratio_high - log_ratio_low) * np.random.random())
        w = int(round(np.sqrt(target_area * aspect_ratio)))
        h = int(round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(np.random.random() * (height - h + 1))
            left = int(np.random.random() * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio_min:
        w = width
        h = int(round(w / ratio_min))
    elif in_ratio > ratio_max:
        h = height
        w = int(round(h * ratio_max))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


class TwoCropRGBDecoder(SimpleRGBImageDecoder):
    """Decode an `RGBImageField` once and emit two random-resized crops: (2, S, S, 3) uint8 per sample.

    Scratch space is one full-size image per parallel lane (not per sample, as FFCV's own
    crop decoders allocate). The epoch's crop seed is read at run time from a small
    buffer that `_SeededEpochIterator` fills before each epoch starts.
    """

    VIEWS = 2

    def __init__(self, output_size: int, scale: tuple[float, float], ratio: tuple[float, float], batch_size: int):
        super().__init__()
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"crop scale {scale} and ratio {ratio} must be positive (low, high) pairs")
        self.output_size = int(output_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.batch_size = int(batch_size)

    def _lanes(self) -> int:
        return max(1, min(Compiler.num_threads, self.batch_size))

    def declare_state_and_memory(self, previous_state: State):
        heights, widths = self.metadata["height"], self.metadata["width"]
        self.max_pixels = int(heights.astype(np.int64).max()) * int(widths.astype(np.int64).max()) * 3
        # Lanes * one image of scratch, spread over the per-sample rows FFCV allocates.
        self.scratch_per_sample = math.ceil(self._lanes() * self.max_pixels / self.batch_size)
        shape = (self.VIEWS, self.output_size, self.output_size, 3)
        uint8 = np.dtype("<u1")
        return (
            State(jit_mode=True, device=previous_state.device, shape=shape, dtype=uint8),
            (AllocationQuery(shape, uint8),
             AllocationQuery((self.scratch_per_sample,), uint8),
             AllocationQuery((2,), np.dtype("<i8"))),  # [0, 0]: epoch crop seed; [i, 1]: decode status
        )

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        # Fresh dispatchers per loader, as FFCV does: numba dispatchers shared between
        # loader threads can race while compiling.
        decode_jpeg = Compiler.compile(imdecode)
        resize = Compiler.compile(resize_crop)
        crop_box = Compiler.compile(random_resized_crop)
        seed_of = Compiler.compile(sample_seed)
        lane_range = Compiler.get_iterator()
        lanes = self._lanes()
        max_pixels = self.max_pixels
        per_sample = self.scratch_per_sample
        views = self.VIEWS
        jpg = IMAGE_MODES["jpg"]
        scale_low, scale_high = self.scale
        ratio_min, ratio_max = self.ratio
        log_low, log_high = math.log(ratio_min), math.log(ratio_max)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch, seeds = my_storage
            count = len(batch_indices)
            usable = min(lanes, (count * per_sample) // max_pixels)
            if usable < 1:
                raise ValueError("TwoCropRGBDecoder: batch smaller than the scratch layout (use drop_last)")
            flat = scratch.reshape(-1)
            epoch_seed = seeds[0, 0]
            for lane in lane_range(usable):
                buffer = flat[lane * max_pixels:(lane + 1) * max_pixels]
                for dst_ix in range(lane, count, usable):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    height = np.int64(field["height"])
                    width = np.int64(field["width"])
                    data = mem_read(field["data_ptr"], storage_state)
                    if field["mode"] == jpg:
                        # (no raise inside the parallel loop: numba would run it serially)
                        seeds[dst_ix, 1] = decode_jpeg(data, buffer, height, width, height, width,
                                                       0, 0, 1, 1, False, False)
                        image = buffer[:height * width * 3].reshape(height, width, 3)
                    else:
                        seeds[dst_ix, 1] = 0
                        image = data.reshape(height, width, 3)
                    np.random.seed(seed_of(epoch_seed, source_ix))
                    for view in range(views):
                        top, left, h, w = crop_box(height, width, scale_low, scale_high, log_low, log_high,
                                                   ratio_min, ratio_max)
                        resize(image, top, top + h, left, left + w, destination[dst_ix, view])
            for dst_ix in range(count):
                if seeds[dst_ix, 1] != 0:
                    raise ValueError("a JPEG stored in the dataset cannot be decoded; "
                                     "reconvert it with `python -m tools.convert`")
            return destination[:count]

        decode.is_parallel = True
        return decode


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


class _SeededEpochIterator(EpochIterator):
    """FFCV's epoch thread, with the decoder's crop seed written before the thread starts.

    An exception in FFCV's thread would otherwise end it silently and leave the consumer
    waiting forever; here it ends the epoch and is raised in the consumer.
    """

    def __init__(self, loader: "_TwoCropLoader", order: np.ndarray, crop_seed: int):
        self._crop_seed = crop_seed
        self._error: BaseException | None = None
        super().__init__(loader, order)

    def start(self) -> None:  # called at the end of EpochIterator.__init__, once buffers exist
        node = self.loader.graph.operation_to_node[self.loader.decoder][0]
        self.memory_allocations["operation"][node.id][2][..., 0] = self._crop_seed
        super().start()

    def run(self) -> None:
        try:
            super().run()
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._error = err
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(None, timeout=0.5)
                    return
                except queue.Full:
                    pass

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self._error is not None:
                raise DataError(f"the FFCV loader of {self.loader.fname} failed: "
                                f"{type(self._error).__name__}: {' '.join(str(self._error).split())}") from self._error
            raise


class _TwoCropLoader(Loader):
    """FFCV Loader with our epoch order (`EpochSharding`) and per-epoch crop seeds."""

    def __init__(self, fname: str, batch_size: int, num_workers: int, os_cache: bool,
                 decoder: TwoCropRGBDecoder, pipeline: list, batches_ahead: int = 3):
        fields = Reader(fname).handlers
        pipelines = {name: None for name in fields}
        pipelines["image"] = pipeline
        self.decoder = decoder
        self.sharding: EpochSharding | None = None
        self.crop_seed_base = 0
        super().__init__(fname, batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                         order=OrderOption.SEQUENTIAL, distributed=False, seed=0, pipelines=pipelines,
                         drop_last=True, batches_ahead=batches_ahead)

    def __len__(self) -> int:
        if self.sharding is None:
            return super().__len__()
        return self.sharding.per_rank // self.batch_size

    def __iter__(self) -> EpochIterator:
        Compiler.set_num_threads(self.num_workers)
        epoch = self.next_epoch
        self.next_epoch += 1
        order = self.sharding.indices(epoch)[:len(self) * self.batch_size]
        if self.code is None or self.recompile:
            self.generate_code()
        return _SeededEpochIterator(self, order, epoch_seed(self.crop_seed_base, epoch, CROP_STREAM))


# --------------------------------------------------------------------------------------------
# The .beton: convert on first use
# --------------------------------------------------------------------------------------------

@contextmanager
def _file_lock(path: Path, data: str):
    """Exclusive lock beside `path`, so ranks sharing a filesystem convert once; removed afterwards.

    A rank that still waits on the removed lock file finds the .beton written when it gets the lock.
    """
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        handle = open(lock_path, "w")
    except OSError as err:
        raise DataError(f"cannot write the FFCV dataset {path} beside {data} ({err.strerror or err}): convert it "
                        f"elsewhere with `python -m tools.convert {data} DST.beton --format ffcv` and pass "
                        f"ffcv.beton=DST.beton") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_beton(config: Config, log: Callable[[str], None] | None = None) -> Path:
    """The .beton to read, converting `config.data` with `pipelines.convert` if it does not exist yet."""
    path = beton_path(config)
    if path.is_file():
        _warn_if_stale(path, config.data)
        return path
    if not config.data:
        raise DataError(f"FFCV dataset {path} does not exist; fix ffcv.beton or pass data=<ImageFolder> to convert it")
    if not Path(config.data).exists():
        raise DataError(f"data directory {config.data} does not exist; pass DATA=/path/to/imagefolder (converted to "
                        f"{path} on first use) or omit it for the demo")
    say = log or (lambda message: print(message, file=sys.stderr))
    with _file_lock(path, config.data):
        if not path.is_file():  # another rank may have finished while we waited
            say(f"converting {config.data} to {path} for the FFCV pipeline (first use)")
            report = convert(config.data, path, "ffcv", max_resolution=config.ffcv.max_resolution,
                             jpeg_quality=config.ffcv.jpeg_quality,
                             workers=max(1, min(config.workers, os.cpu_count() or 1)), progress=False)
            if report["skipped"]:
                say(f"warning: {report['skipped']} of {report['written'] + report['skipped']} images in "
                    f"{config.data} are unreadable and were left out; they are listed in {report_path(path)}")
    return path


def _warn_if_stale(path: Path, data: str) -> None:
    """A .beton converted from `data` that has since gained or lost images would silently train on the old set."""
    try:
        report = json.loads(report_path(path).read_text())
    except (OSError, ValueError):
        return
    if not data or Path(report.get("source", "")) != Path(data) or not Path(data).is_dir():
        return
    converted = report.get("written", 0) + report.get("skipped", 0)
    current = len(find_image_folder(data)[1])
    if current != converted:
        print(f"warning: {data} now holds {current} images but {path} was converted from {converted}; "
              f"delete {path} to reconvert", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

class FFCVPipeline:
    """`.beton` -> decode once, two crops (host, numba) -> device augmentations -> (view1, view2)."""

    def __init__(self, config: Config, placement: Placement, batch_size: int, *,
                 compile_augment: bool = False, batches_ahead: int = 3):
        self.config = config
        self.spec: AugmentSpec = config.augment
        self.placement = placement
        self.batch_size = batch_size
        self.seed = config.seed
        self.epoch = 0
        self.path = ensure_beton(config)
        reader = open_beton(self.path)
        samples_per_rank(int(reader.num_samples), batch_size, placement.world_size, f"FFCV dataset {self.path}")
        # numba cannot run more threads than it started with (NUMBA_NUM_THREADS, the core count).
        workers = max(1, min(config.workers if config.workers > 0 else os.cpu_count() or 1,
                             numba.config.NUMBA_NUM_THREADS))
        self.decoder = TwoCropRGBDecoder(self.spec.image_size, self.spec.crop_scale, self.spec.crop_ratio, batch_size)
        pipeline = [self.decoder, ToTensor()]
        if placement.device.type == "cuda":  # GPU only: pinned host slots -> device on FFCV's side stream
            pipeline.append(ToDevice(placement.device, non_blocking=True))
        threads = torch.get_num_threads()
        try:
            self.loader = _TwoCropLoader(str(self.path), batch_size, workers, config.ffcv.os_cache, self.decoder,
                                         pipeline, batches_ahead)
        finally:
            torch.set_num_threads(threads)  # FFCV sets torch's thread count to its worker count
        self.loader.crop_seed_base = self.seed
        self.loader.sharding = EpochSharding(int(reader.num_samples), placement.rank, placement.world_size,
                                             self.seed, config.ffcv.order,
                                             self.loader.memory_manager.page_to_samples, batch_size)
        self.augment = TwoViewAugment(self.spec, placement.dtype, compile=compile_augment)
        self.generator = torch.Generator(device=placement.device)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> np.ndarray:
        """Sample indices this rank reads in the current epoch, in order (all full batches)."""
        return self.loader.sharding.indices(self.epoch)[:len(self) * self.batch_size]

    def crops(self) -> Iterator[torch.Tensor]:
        """The current epoch's uint8 crop batches (B, 2, S, S, 3) on the device, before augmentation.

        On CPU a batch is a view of FFCV's buffer, valid until a few batches later.
        """
        self.loader.next_epoch = self.epoch
        threads = torch.get_num_threads()
        try:
            iterator = iter(self.loader)
        finally:
            torch.set_num_threads(threads)
        for index, (batch,) in enumerate(iterator):
            if index == 0:  # FFCV's thread set torch's (global) thread count to `workers` as it started
                torch.set_num_threads(threads)
            yield batch.to(self.placement.device, non_blocking=True)  # no-op when ToDevice already moved it

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch, AUGMENT_STREAM + self.placement.rank))
        for batch in self.crops():
            crops1 = batch[:, 0].permute(0, 3, 1, 2)  # (B, 3, S, S) views of the HWC crops
            crops2 = batch[:, 1].permute(0, 3, 1, 2)
            yield self.augment(crops1, crops2, self.generator)

"""DALI pipeline: read, decode, crop and distort both views inside one NVIDIA DALI graph.

On CUDA the JPEG decoder runs with `device="mixed"` (nvJPEG) and every image operator on the
GPU; without a GPU the same graph runs on the CPU (`device_id=None`). The few GPU-only lines
are marked `# GPU only`.

Graph, per sample (one read and one decode feed both views):

    read -> peek shape -> decode once -> per view: random crop window -> cubic resize to S x S
         -> brightness/contrast (jitter) -> hue/saturation/grayscale -> Gaussian blur
         -> solarize -> normalise + flip -> (S, S, 3) float16/float32, HWC

Every coin (flip, jitter, grayscale, blur, solarize) is drawn per sample and view with the
`AugmentSpec`'s probability (`blur_p[view]`, `solarize_p[view]`). `decode="roi"` decodes each
view's crop window instead of the whole image once. How each operator compares with the
reference pipeline, and what it costs, is in docs/pipelines.md.

Output: each view as an NCHW tensor in channels-last memory (DALI's HWC buffer, permuted
without a copy), FLOAT16 for a float16 placement and FLOAT otherwise (torch casts to bfloat16).

Epochs: a DALI reader cannot be reseeded after the pipeline is built, so the pipeline is rebuilt
for every epoch with everything derived from (config.seed, epoch):
- ImageFolder: this rank's samples as `pipelines.epochs` deals them, handed to the reader as
  its file list and read in that order.
- Webdataset records (`config.dali.records`, written by `python -m tools.convert SRC DST
  --format dali`): DALI's own sharding (`shard_id`, `num_shards=world_size`, contiguous) over
  the tar shards in an order permuted per epoch, the shard index rotated per epoch, and a
  shuffle buffer of up to `INITIAL_FILL` samples.
- Every rank reads a disjoint part of the data; `len(pipeline)` = (N // world_size) //
  batch_size full batches on every rank (the reader pads its shard, so it never wraps into the
  next epoch's data).
- The graph's seed is derived from (seed, epoch, rank): an epoch is reproducible (same ids and
  pixels).
- Its readers and random operators draw in sequence from that seed, so a graph cannot start
  mid-epoch on its own. A checkpoint taken mid-epoch keeps the graph's state instead
  (`position_state`: DALI's pipeline checkpoint, the readers' positions and the generators'
  states), and the resumed run's graph starts from it (`restore_position`): it reads none of the
  batches before. Without that state (a checkpoint from another DALI version, another world size)
  those batches are run and dropped.
- The graph is built with the epoch's spec (`AugmentSpec.at_epoch`): its crop size, and the blur
  window that follows it, come from the resolution schedule when one is set.

Corrupt files: when DALI fails on an ImageFolder file, the files of the failing and prefetched
batches are checked with PIL and the error becomes a DataError naming them.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bt_fast.config import AugmentSpec, Config
from bt_fast.errors import DataError, flat_message
from pipelines.base import EpochPipeline, Placement
from pipelines.convert import source_change
from pipelines.dali_format import index_problem, names_records
from pipelines.image_folder import find_image_folder
from pipelines.images import file_problem

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError as err:  # pragma: no cover - the venv has DALI
    raise DataError(f"pipeline 'dali' needs NVIDIA DALI ({err}); install nvidia-dali-cuda* or choose another pipeline") from None

from pipelines import dali_debug  # noqa: E402 - needs DALI too
from pipelines.epochs import epoch_seed, rank_indices, samples_per_rank  # noqa: E402

DECODE_STRATEGIES = ("once", "roi")
READER = "reader"
INITIAL_FILL = 1024
LUMA = (0.299, 0.587, 0.114)  # PIL convert("L") and DALI's YIQ luma


# Streams of `epoch_seed` (stream 0 is `pipelines.epochs`' sample order).
TAR_ORDER_STREAM, GRAPH_STREAM = 1, 2  # GRAPH_STREAM + rank: the graph's seed


# --------------------------------------------------------------------------------------------
# Sources: what an epoch reads on one rank
# --------------------------------------------------------------------------------------------

class FolderSource:
    """An ImageFolder read file by file (`fn.readers.file`); a sample's id is its index in
    `samples` (sorted as `find_image_folder` returns them)."""

    kind = "folder"

    def __init__(self, root: str):
        self.root = root
        self.classes, self.samples = find_image_folder(root)
        bad = self.samples.first_not_utf8()
        if bad is not None:  # DALI takes file names as UTF-8 text and refuses the list in a traceback
            name = os.fsencode(self.samples[bad][0]).decode("utf-8", "backslashreplace")
            raise DataError(f"DALI cannot open {name}: its name is not valid UTF-8; rename it, or convert the folder "
                            f"with `python -m tools.convert {root} DST --format dali` and set dali.records=DST")

    def __len__(self) -> int:
        return len(self.samples)

    def block(self, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
        """Sample ids rank `rank` reads in `epoch`, in reading order."""
        return rank_indices(len(self.samples), seed, epoch, rank, world_size)

    def paths(self, ids: np.ndarray) -> list[str]:
        return self.samples.paths(ids)

    def read(self, plan: "EpochPlan"):
        jpegs, labels = fn.readers.file(
            files=plan.files, labels=plan.block.tolist(),
            random_shuffle=False, shard_id=0, num_shards=1, pad_last_batch=True, stick_to_shard=True,
            name=READER)
        return jpegs, labels


class RecordSource:
    """Webdataset shards written by `python -m tools.convert SRC DST --format dali`."""

    kind = "webdataset"

    def __init__(self, root: str):
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise DataError(f"dali.records={root}: {meta_path} not found; write the records with "
                            f"`python -m tools.convert SRC {root} --format dali`")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{meta_path} is not readable JSON ({err}); rewrite the records with tools.convert") from None
        if meta.get("format") != "webdataset" or not meta.get("shards"):
            raise DataError(f"{meta_path} does not describe webdataset shards (format "
                            f"{meta.get('format')!r}); rewrite the records with tools.convert --format dali")
        self.meta = meta
        self.classes = list(meta.get("classes", []))
        ext = meta.get("extensions", {})
        self.image_ext, self.label_ext = ext.get("image", "jpg"), ext.get("label", "cls")
        self.shards = []
        for shard in meta["shards"]:
            tar, index = self.root / shard["tar"], self.root / shard["index"]
            for path in (tar, index):
                if not path.is_file():
                    raise DataError(f"{path} listed in {meta_path} is missing; rewrite the records with tools.convert")
            problem = index_problem(index, int(shard["num_samples"]))
            if problem:  # DALI would refuse it while building the graph, in a traceback
                raise DataError(f"{index} is not the DALI index of its shard ({problem}); reconvert the records "
                                f"with `python -m tools.convert SRC {root} --format dali --force`")
            self.shards.append((str(tar), str(index), int(shard["num_samples"])))
        self.num_samples = sum(n for _, _, n in self.shards)
        if self.num_samples != int(meta.get("num_samples", self.num_samples)):
            raise DataError(f"{meta_path}: shards hold {self.num_samples} samples, num_samples says "
                            f"{meta['num_samples']}; rewrite the records with tools.convert")

    def __len__(self) -> int:
        return self.num_samples

    def tar_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed & 0xFFFFFFFF, epoch, TAR_ORDER_STREAM]).permutation(len(self.shards))

    def read(self, plan: "EpochPlan"):
        order = self.tar_order(plan.seed, plan.epoch)
        jpegs, _ = fn.readers.webdataset(
            paths=[self.shards[i][0] for i in order], index_paths=[self.shards[i][1] for i in order],
            ext=[self.image_ext, self.label_ext], missing_component_behavior="error",
            shard_id=(plan.rank + plan.epoch) % plan.world_size, num_shards=plan.world_size,
            random_shuffle=True, initial_fill=max(1, min(INITIAL_FILL, self.num_samples // plan.world_size)),
            pad_last_batch=True, stick_to_shard=True, name=READER)
        return jpegs, None


@dataclass(frozen=True)
class EpochPlan:
    seed: int
    epoch: int
    rank: int
    world_size: int
    block: np.ndarray | None = None  # FolderSource: the ids this rank reads, in order
    # ... and their paths, listed here: inside the graph's function DALI's autograph would run the
    # loop one converted call per sample (2-3 s per 100,000 files, every epoch)
    files: list[str] | None = None


# --------------------------------------------------------------------------------------------
# The augmentation graph
# --------------------------------------------------------------------------------------------

def _factor(amount: float, centre: float):
    """ColorJitter's per-sample factor: U[max(0, c - a), c + a] (hue: U[-a, a]); a constant when a == 0."""
    if amount < 0:
        raise DataError(f"colour jitter amount must be non-negative, got {amount}")
    if amount == 0:
        return float(centre)
    low = max(0.0, centre - amount) if centre else -amount
    return fn.random.uniform(range=[low, centre + amount], dtype=types.FLOAT)


def _coin(p: float):
    """A per-sample bool with P(True) = p, or a Python bool when p is 0 or 1."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    return fn.random.coin_flip(probability=float(p), dtype=types.BOOL)


@dataclass(frozen=True)
class GraphOptions:
    """How the graph is built: decode strategy, where it runs, output dtype, debug outputs."""

    decode: str
    gpu: bool
    out_dtype: object  # a DALI types.DALIDataType
    debug: bool

    @property
    def decoding(self) -> dict:
        """The keyword arguments of both JPEG decoders (whole image, slice): RGB, nvJPEG on CUDA ("mixed"). nvJPEG's
        chroma upsampling differs from libjpeg-turbo's (the CPU backend's, PIL's) unless the decoder asks for
        libjpeg's "fancy" one, which nvJPEG's hardware back end also does (DALI PR 4662)."""
        return {"device": "mixed" if self.gpu else "cpu", "output_type": types.RGB,  # GPU only: mixed
                "jpeg_fancy_upsampling": True}


def _crop_resize(jpegs, images, shape, spec: AugmentSpec, options: GraphOptions, choices: dict):
    """A random-resized crop (torchvision's sampling) to S x S, cubic with antialiasing."""
    size = spec.image_size
    anchor, extent = fn.random_crop_generator(shape, random_area=list(spec.crop_scale),
                                              random_aspect_ratio=list(spec.crop_ratio), num_attempts=10)
    choices.update(anchor=anchor, extent=extent)
    if options.decode == "once":
        start = fn.cast(anchor, dtype=types.FLOAT)
        return fn.resize(images, size=[size, size], roi_start=start, roi_end=start + fn.cast(extent, dtype=types.FLOAT),
                         interp_type=types.INTERP_CUBIC, antialias=True)
    crop = fn.decoders.image_slice(jpegs, start=anchor, shape=extent, axis_names="HW", **options.decoding)
    return fn.resize(crop, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)


def brightness_contrast(x, brightness, contrast):
    """PIL's brightness and contrast of uint8 HWC images, per sample, computed where `x` lives.

    out = b * (m + c * (x - m)) = x * (b c) + b (1 - c) m, rounded to nearest and clamped to uint8
    (as `fn.brightness_contrast`), with m the rounded mean luma of `x` (PIL's contrast centre, taken
    before brightness). `brightness` and `contrast` are per-sample host values or Python floats.

    Written as DALI arithmetic rather than `fn.brightness_contrast`: that operator takes its centre
    as an argument input, which DALI keeps on the host, while m is a reduction of `x`; on the GPU
    it would have to be copied back, a GPU->host synchronisation in every iteration. Here m stays
    on the device and only the host factors b c and b (1 - c) travel to it.
    """
    means = fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT)
    centre = dmath.floor(means[0] * LUMA[0] + means[1] * LUMA[1] + means[2] * LUMA[2] + 0.5)
    scale, shift = brightness * contrast, brightness * (1.0 - contrast)
    return fn.cast(x * scale + shift * centre, dtype=types.UINT8)


def _colour(x, spec: AugmentSpec, choices: dict):
    """Colour jitter (p jitter_p) and grayscale (p grayscale_p); identity factors where a coin says no."""
    jitter = _coin(spec.jitter_p)
    gain = 0.0 if jitter is False else (1.0 if jitter is True else fn.cast(jitter, dtype=types.FLOAT))
    brightness = 1.0 + gain * (_factor(spec.brightness, 1.0) - 1.0)
    contrast = 1.0 + gain * (_factor(spec.contrast, 1.0) - 1.0)
    saturation = 1.0 + gain * (_factor(spec.saturation, 1.0) - 1.0)
    hue = gain * _factor(spec.hue, 0.0)
    gray = _coin(spec.grayscale_p)
    choices.update(jitter=jitter, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                   grayscale=gray)
    if jitter is False and gray is False:
        return x
    if jitter is not False:
        x = brightness_contrast(x, brightness, contrast)
    keep_colour = 1.0 - (1.0 if gray is True else (0.0 if gray is False else fn.cast(gray, dtype=types.FLOAT)))
    return fn.hsv(x, hue=hue * 360.0, saturation=saturation * keep_colour)


def _blur(x, spec: AugmentSpec, view: int, choices: dict):
    """Gaussian blur (p blur_p[view]) with sigma ~ U(blur_sigma) (a constant where its ends are equal), the
    window cut where the taps vanish."""
    blur = _coin(spec.blur_p[view])
    low, high = spec.blur_sigma
    # Taps beyond 4 sigma weigh < 1e-4 of the kernel: min(k, 2 ceil(4 sigma) + 1) taps stay within
    # rounding of torchvision's k-tap kernel.
    if low == high:  # one sigma: DALI's uniform refuses an empty range [low, high)
        sigma = float(low)
        window = min(2 * math.ceil(4.0 * sigma) + 1, spec.blur_kernel_size)
    else:
        sigma = fn.random.uniform(range=[low, high], dtype=types.FLOAT)
        window = dmath.min(fn.cast(dmath.ceil(sigma * 4.0), dtype=types.INT32) * 2 + 1, spec.blur_kernel_size)
    choices.update(blur=blur, sigma=sigma)
    if blur:  # a Python bool (p is 0 or 1) or a per-sample DALI conditional
        x = fn.gaussian_blur(x, window_size=window, sigma=sigma)
    return x


def _solarize(x, spec: AugmentSpec, view: int, choices: dict):
    """Solarize (p solarize_p[view]): x -> 255 - x for x >= round(255 * threshold), as PIL."""
    solarize = _coin(spec.solarize_p[view])
    choices.update(solarize=solarize)
    threshold = int(round(spec.solarize_threshold * 255))
    if solarize:
        x = fn.lookup_table(x, keys=list(range(256)), values=[k if k < threshold else 255 - k for k in range(256)],
                            dtype=types.UINT8)
    return x


def _normalise_flip(x, spec: AugmentSpec, options: GraphOptions, choices: dict):
    """Normalise with the spec's mean/std and flip (p flip_p), HWC in the output dtype.

    Flipping last equals torchvision's flip first: every earlier step is symmetric under it.
    """
    flip = _coin(spec.flip_p)
    choices.update(flip=flip)
    mirror = int(flip) if isinstance(flip, bool) else fn.cast(flip, dtype=types.INT32)
    return fn.crop_mirror_normalize(x, dtype=options.out_dtype, output_layout="HWC", mirror=mirror,
                                    mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std])


def _view(jpegs, images, shape, spec: AugmentSpec, view: int, options: GraphOptions):
    """One distorted view (S, S, 3) HWC, and the per-sample choices drawn for it."""
    choices: dict = {}
    x = _crop_resize(jpegs, images, shape, spec, options, choices)
    x = _colour(x, spec, choices)
    x = _blur(x, spec, view, choices)
    x = _solarize(x, spec, view, choices)
    return _normalise_flip(x, spec, options, choices), choices


@pipeline_def(enable_conditionals=True)
def two_view_graph(source, plan: EpochPlan, spec: AugmentSpec, options: GraphOptions):
    """The DALI graph: (view1, view2), plus (ids, image shape, choices of each view) when debugging."""
    jpegs, labels = source.read(plan)
    shape = fn.peek_image_shape(jpegs, dtype=types.INT32)
    images = fn.decoders.image(jpegs, **options.decoding) if options.decode == "once" else None
    view1, choices1 = _view(jpegs, images, shape, spec, 0, options)
    view2, choices2 = _view(jpegs, images, shape, spec, 1, options)
    if not options.debug:
        return view1, view2
    ids = labels if labels is not None else fn.get_property(jpegs, key="source_info")
    return (view1, view2, ids, shape) + dali_debug.choice_outputs(choices1) + dali_debug.choice_outputs(choices2)


# --------------------------------------------------------------------------------------------
# The TwoViewPipeline
# --------------------------------------------------------------------------------------------

def _unreadable(path: str) -> str | None:
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - any failure is the answer
        return file_problem(path) or flat_message(err)
    return None


def _warn_if_stale(records: str, data: str) -> None:
    """Records converted from the ImageFolder `data` whose images have since changed would silently train on
    the old set (`pipelines.convert.source_change`)."""
    change = source_change(records, data)
    if change:
        print(f"warning: {change}; rewrite them with `python -m tools.convert {data} {records} --format dali "
              f"--force`", file=sys.stderr)


class DALIPipeline(EpochPipeline):
    """ImageFolder or webdataset records -> DALI (decode once, two distorted views) -> torch."""

    def __init__(self, config: Config, placement: Placement, batch_size: int, *, decode: str = "once",
                 debug: bool = False):
        if decode not in DECODE_STRATEGIES:
            raise DataError(f"DALI decode strategy must be one of {DECODE_STRATEGIES}, got {decode!r}")
        super().__init__(config, placement, batch_size)
        self.gpu = placement.device.type == "cuda"
        # data= may name converted records itself, as it may name a .beton for ffcv
        records = config.dali.records or (config.data if config.data and names_records(config.data) else "")
        self.source = RecordSource(records) if records else FolderSource(config.data)
        if records and placement.rank == 0:
            _warn_if_stale(records, config.data)
        self.num_samples = len(self.source)
        self.per_rank = samples_per_rank(len(self.source), batch_size, placement.world_size, records or config.data)
        out_dtype = types.FLOAT16 if placement.dtype == torch.float16 else types.FLOAT
        self.options = GraphOptions(decode, self.gpu, out_dtype, debug)
        self.torch_dtype = torch.float16 if placement.dtype == torch.float16 else torch.float32
        self.threads = max(1, config.workers)
        self._live: tuple | None = None  # (graph, its position key) while an epoch is iterated
        self._batches_run = 0  # by that graph, counted from the epoch's start
        self._restore: dict | None = None

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        p = self.placement
        if not isinstance(self.source, FolderSource):
            return EpochPlan(self.seed, epoch, p.rank, p.world_size)
        block = self.source.block(self.seed, epoch, p.rank, p.world_size)
        return EpochPlan(self.seed, epoch, p.rank, p.world_size, block, self.source.paths(block))

    def epoch_spec(self, epoch: int | None = None) -> AugmentSpec:
        """The spec the graph of `epoch` (default: the current one) applies: its crop size is the schedule's."""
        return self.spec.at_epoch(self.epoch if epoch is None else epoch, self.config.epochs)

    def build(self, plan: EpochPlan, checkpoint: bytes | None = None):
        """The epoch's graph, built; with `checkpoint` (from `position_state`), in the state it was taken in."""
        device_id = None
        if self.gpu:  # GPU only
            device_id = self.placement.device.index if self.placement.device.index is not None else torch.cuda.current_device()
        pipe = two_view_graph(
            self.source, plan, self.epoch_spec(plan.epoch), self.options,
            batch_size=self.batch_size, num_threads=self.threads, device_id=device_id,
            seed=epoch_seed(self.seed, plan.epoch, GRAPH_STREAM + plan.rank),
            prefetch_queue_depth=max(1, self.config.dali.prefetch), enable_checkpointing=True, checkpoint=checkpoint)
        pipe.build()
        return pipe

    def _position_key(self, plan: EpochPlan) -> dict:
        """What a saved graph state must match to be used: the same graph (seed, epoch, shard, samples, and the
        settings its operators are built from)."""
        return {"seed": epoch_seed(self.seed, plan.epoch, GRAPH_STREAM + plan.rank), "epoch": plan.epoch,
                "rank": plan.rank, "world_size": plan.world_size, "samples": len(self.source),
                "batch_size": self.batch_size, "graph": repr((self.epoch_spec(plan.epoch), self.options))}

    def position_state(self) -> dict | None:
        """The iterated epoch's graph state after the batches it has delivered (None between epochs). If
        DALI cannot save it, the state says so (`"dali": None`: a resume replays) and a warning why."""
        if self._live is None:
            return None
        pipe, key = self._live
        try:
            saved = pipe.checkpoint()
        except Exception as err:  # noqa: BLE001 - a checkpoint of the run matters more than DALI's part of it
            reason = flat_message(err, 200)
            print(f"warning: DALI cannot save its graph state ({reason}); a run resumed from this checkpoint runs "
                  f"the epoch's first {self._batches_run} batches again", file=sys.stderr)
            saved = None
        return {**key, "batch": self._batches_run, "dali": saved}

    def restore_position(self, state: dict | None) -> None:
        self._restore = state

    def _start(self, plan: EpochPlan):
        """The epoch's graph and the batch it delivers first: from a restored state at `start_batch`, or
        from batch 0 (the caller drops the batches before `start_batch`)."""
        state, self._restore = self._restore, None
        key = self._position_key(plan)
        usable = state and state.get("dali") is not None and state.get("batch") == self.start_batch
        if usable and state.get("graph", key["graph"]) != key["graph"]:  # an older checkpoint's has none: tried
            print(f"warning: the checkpoint's DALI state is of another graph (augmentation settings, dtype or "
                  f"device changed); running the epoch's first {self.start_batch} batches again", file=sys.stderr)
        elif usable and all(state.get(k) == v for k, v in key.items() if k != "graph"):
            try:
                return self.build(plan, checkpoint=state["dali"]), self.start_batch
            except Exception as err:  # noqa: BLE001 - any refusal of the saved state means: start over
                reason = flat_message(err, 200)
                print(f"warning: DALI cannot restore its state from the checkpoint ({reason}); running the "
                      f"epoch's first {self.start_batch} batches again", file=sys.stderr)
        try:
            return self.build(plan), 0
        except RuntimeError as err:
            if not isinstance(self.source, RecordSource):
                raise
            raise self._error(err, plan, 0) from None  # DALI parses every index entry here (a malformed one)

    def _consumer_stream(self) -> torch.cuda.Stream | None:
        """The stream that reads the graph's outputs: torch's current one on CUDA (None on the CPU). DALI
        binds its outputs to it, so `pipe.run` returns without waiting on the host for the batch."""
        return torch.cuda.current_stream(self.placement.device) if self.gpu else None  # GPU only

    def _to_torch(self, tensor_list) -> torch.Tensor:
        batch = tensor_list.as_tensor()
        out = torch.empty(tuple(batch.shape()), dtype=self.torch_dtype, device=self.placement.device)  # (B, S, S, 3)
        feed_ndarray(batch, out, cuda_stream=self._consumer_stream())
        view = out.permute(0, 3, 1, 2)  # NCHW shape, channels-last memory: no copy
        return view if view.dtype == self.placement.dtype else view.to(self.placement.dtype)

    def _error(self, err: Exception, plan: EpochPlan, batch: int) -> DataError:
        text = str(err)
        if isinstance(self.source, RecordSource):
            return DataError(f"DALI failed reading records {self.source.root} in epoch {plan.epoch}: "
                             f"{_dali_reason(text)}; rewrite them with tools.convert")
        named = [m for m in re.findall(r"(?:sample #\d+ : |mapping failed: )(\S+)", text)]
        # The reader reads the block in order; the failing batch is this one or one being prefetched.
        depth = max(1, self.config.dali.prefetch) + 2
        paths = plan.files[batch * self.batch_size:(batch + 1 + depth) * self.batch_size]
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            reasons = list(pool.map(_unreadable, paths))
        bad = {path: reason for path, reason in zip(paths, reasons) if reason}
        for path in named:
            bad.setdefault(path, "DALI cannot decode it")
        if bad:
            listed = "; ".join(f"{path}: {reason}" for path, reason in bad.items())
            return DataError(f"cannot read image(s) in {self.source.root}: {listed}. Remove or replace them, or convert "
                             f"the folder with `python -m tools.convert SRC DST --format dali` (it skips unreadable "
                             f"files) and set dali.records=DST")
        return DataError(f"DALI failed in epoch {plan.epoch} near batch {batch} of {self.source.root}: "
                         f"{_dali_reason(text)} (the {len(paths)} files of the batches in flight decode with PIL)")

    def _run(self) -> Iterator:
        """The epoch's batches from `start_batch` on: (view1, view2), or DebugBatches when built with debug=True.

        A graph restored from `restore_position`'s state starts there; any other runs the batches before
        `start_batch` and drops them (its random draws come in sequence from the graph's seed).
        """
        plan = self.plan()
        pipe, first = self._start(plan)
        self._live, self._batches_run = (pipe, self._position_key(plan)), first
        try:
            for batch in range(first, len(self)):
                try:
                    outputs = pipe.run(self._consumer_stream())
                except RuntimeError as err:
                    raise self._error(err, plan, batch) from None
                self._batches_run = batch + 1
                if batch < self.start_batch:
                    continue
                views = (self._to_torch(outputs[0]), self._to_torch(outputs[1]))
                if self.options.debug:
                    yield dali_debug.debug_batch(views, outputs, isinstance(self.source, RecordSource))
                else:
                    yield views
        finally:
            self._live = None
            del pipe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for item in self._run():
            yield (item.view1, item.view2) if self.options.debug else item

    def debug_batches(self) -> Iterator[dali_debug.DebugBatch]:
        """The current epoch's batches with ids and per-sample choices (needs `debug=True`)."""
        if not self.options.debug:
            raise ValueError("construct DALIPipeline(..., debug=True) to get debug batches")
        return self._run()


def _dali_reason(text: str) -> str:
    """The informative lines of a DALI error: the operator that failed and what it reported, without the
    pipeline traceback (lines of the graph's source) that DALI puts between the two."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    operator = next((found[1] for found in map(re.compile(r"operator `(?:nvidia\.dali\.)?([^`]+)`").search, lines)
                     if found), None)
    reported = lines[len(lines) - lines[::-1].index("encountered:"):] if "encountered:" in lines else lines
    keep = [line for line in reported if not line.startswith(("Critical error", "Error in", "which was used", "File ",
                                                               "encountered:", "Current pipeline", "C++ context"))
            and not line.startswith(("return ", "x = ", "jpegs"))]
    reason = " ".join(keep[-3:]) or (lines[-1] if lines else "unknown error")
    return f"{operator}: {reason}" if operator else reason

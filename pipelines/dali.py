"""DALI pipeline: read, decode, crop and distort both views inside one NVIDIA DALI graph.

On CUDA the JPEG decoder runs with `device="mixed"` (nvJPEG) and every image operator on the
GPU; here, without a GPU, the same graph runs on the CPU (`device_id=None`). The few
GPU-only lines are marked `# GPU only`.

Graph, per sample (one read and one decode feed both views):

    read -> peek shape -> decode once -> per view: random crop window -> cubic resize to S x S
         -> brightness/contrast (jitter) -> hue/saturation/grayscale -> Gaussian blur
         -> solarize -> normalise + flip -> (S, S, 3) float16/float32, HWC

Decode strategy: decode once, crop twice (`decoders.image` + `resize` with a ROI per view),
not `decoders.image_random_crop` twice. Measured here (2 shared cores, demo data: 500x375
JPEGs, batch 64, 2 threads; CPU ms per image for both views, median of interleaved runs;
`python -m tools.dali_semantics --speed`):

                               decode once   ROI decode twice
    decode + crops only, 224 px    4.9 ms         5.2 ms
    decode + crops only,  64 px    2.6 ms         2.8 ms
    whole pipeline,      224 px   15.5 ms        16.2 ms
    whole pipeline,       64 px    3.9 ms         4.0 ms

Decoding the whole image costs ~0.8 ms; two ROI decodes cost ~1.4 ms (libjpeg must still
entropy-decode every row down to the bottom of each crop, and the two views' crops overlap).
The resize is the same in both and costs the most (~3.8 ms at 224 px). On the GPU the case is
stronger: nvJPEG's hybrid path does the Huffman stage on the host, so decoding twice doubles
host work, while a second GPU resize costs almost nothing. Both strategies use the same crop
sampler (`fn.random_crop_generator` on the peeked image shape), so `decode="roi"` (kept for
the measurement) draws windows from the same distribution. The Gaussian blur costs the most
after the resize (~9 ms per 224 px image with the full 23-tap kernel). Its window is cut to
min(k, 2 ceil(4 sigma) + 1) taps: ~2x cheaper and, against torchvision's full
k-tap kernel, < 0.001 grey levels mean |diff|, every pixel within 1 (rounding).

Semantics against the reference (`pipelines/reference.py`: PIL + torchvision, uint8 after
every step). `python -m tools.dali_semantics` measures each item on the demo data. At
224 px, 1024 samples per view:
- Same choices replayed with PIL: 0.13 grey levels mean |diff| without jitter; 2.4 with
  jitter and small hue; 8.3 with |hue| > 0.07.
- Per-image colour statistics (channel means and stds, luma, saturation, value) of DALI
  against the reference: the means differ by 0.2-1.6 levels (saturation 0.2-0.3 %); between
  two reference runs they differ by 0.1-1.0.
- Choice rates and crop area/aspect distributions match the spec and torchvision.
- PIL's `ImageEnhance` truncates to uint8 after every enhancement, which makes it about
  0.5 level darker per step; DALI rounds.

Per operator:

- Crop: DALI's random crop generator draws area ~ U(scale) and log aspect ratio ~ U(log ratio)
  with 10 attempts and a whole-image fallback clamped to the ratio range, as torchvision does;
  it also rejects attempts whose *rounded* w/h leaves the ratio range (torchvision does not).
- Resize: DALI's cubic with antialiasing against PIL's bicubic (also antialiased when
  shrinking): about 0.2 grey levels mean absolute difference on the same box. With
  `decode="once"` the resize may read pixels just outside the crop box for the filter support
  at the box edges; PIL crops first. Linear would cost less but differs by ~1-2 levels.
- Brightness and contrast: one `fn.brightness_contrast` with the contrast centre set per
  sample to the rounded mean luma of the cropped image, as PIL's `ImageEnhance.Contrast` does
  (DALI's default centre, 128, differs by several levels on dark or bright images). With the
  centre taken from the image before brightness, out = b * (m + c * (x - m)) is exactly
  torchvision's brightness-then-contrast and contrast-then-brightness (both orders agree
  without the intermediate clamp).
- Saturation, hue and grayscale: one `fn.hsv`, a linear map in YIQ space (rotate and scale
  the chroma plane, keep luma Y = 0.299 R + 0.587 G + 0.114 B). Saturation is the same blend
  with luma as torchvision's; grayscale is saturation 0 and gives PIL's `convert("L")` luma;
  hue is a rotation by `factor * 360` degrees of the YIQ chroma, which keeps luma, where
  torchvision's HSV shift keeps max(R, G, B) and min(R, G, B). Same direction and range, but
  a pure red shifted by +36 degrees becomes (196, 64, 0) here and (255, 150, 0) in torchvision.
  This is the largest measured difference.
- Jitter order: torchvision applies the four jitter ops in a random order per sample; DALI has
  no per-sample operator order, so it is fixed: brightness/contrast, then saturation/hue. In
  exact arithmetic these maps commute here (all are affine maps that keep or scale luma and
  its mean), so the order only shows through the clamps between steps and through
  torchvision's non-linear HSV hue.
- Blur: `fn.gaussian_blur`, sigma ~ U(blur_sigma) per sample. It uses the same normalised
  Gaussian and the same border (reflect-101, torch's "reflect") as torchvision. With the full
  `spec.blur_kernel_size` window every pixel is within 1 grey level of
  `torchvision.transforms.functional.gaussian_blur` (mean difference < 1e-4). The window is
  cut at 4 sigma (the dropped taps weigh < 1e-4 of the kernel). That changes the result by
  < 0.001 levels on average, every pixel still within 1.
- Solarize: a 256-entry lookup table, x -> 255 - x for x >= round(255 * threshold), as PIL.
- Probabilities: every coin (flip, jitter, grayscale, blur, solarize) is drawn per sample and
  view with the spec's probability; blur and solarize use `blur_p[view]` and
  `solarize_p[view]`, so view 1 is always blurred and never solarized by default. Blur and
  solarize run only for their samples (DALI conditionals). Jitter and grayscale always run,
  with identity factors for samples that were not picked (hsv with hue 0 and saturation 1 is
  exact). Probabilities of 0 or 1 remove the coin from the graph.
- Normalisation and flip: `fn.crop_mirror_normalize` with mean/std scaled to 0..255, the flip
  as its per-sample `mirror`, output HWC. Flipping last equals torchvision's flip-first
  because every later step is symmetric under a horizontal flip.

Layout: DALI writes each view as (B, S, S, 3); `permute(0, 3, 1, 2)` of that buffer is already
an NCHW tensor in channels-last memory format, so no transposing copy is made (emitting CHW
and calling `.to(memory_format=torch.channels_last)` would add one). Output is FLOAT16 for a
float16 placement and FLOAT otherwise (DALI has no bfloat16; torch casts).

Epochs, shuffling and sharding: a DALI reader cannot be reseeded after the pipeline is built,
and its own per-epoch reshuffle (`shuffle_after_epoch`) continues from an internal state, so a
resumed run could not reproduce epoch k. The pipeline is therefore rebuilt for every epoch
with everything derived from (config.seed, epoch):

- ImageFolder (`config.dali.records` empty): one permutation of all samples per epoch, the
  same on every rank; rank r reads the r-th contiguous block of `N // world_size` of it (what
  DALI's `shard_id=r, num_shards=world_size` does with that list, but each rank is handed only
  its block: building a reader over the full list costs ~2.8 s per epoch at ImageNet size,
  its block ~0.35 s on 8 ranks). The reader reads it in order (`random_shuffle=False`: a
  buffer shuffle on top of a full permutation adds nothing but fill latency).
- Webdataset records (`config.dali.records` = output of `python -m tools.convert SRC DST
  --format dali`): DALI's own sharding (`shard_id`, `num_shards=world_size`) over the tar
  shards in an order permuted per epoch, with the shard index rotated per epoch (what
  `stick_to_shard=False` does, made reproducible), and `random_shuffle=True` with a buffer
  of up to `initial_fill` = 1024 samples. The converter stores samples in a shuffled order,
  so contiguous blocks are class-mixed. The buffer shuffles only locally; that is DALI's
  design for container formats.
- Every rank reads a disjoint block in every epoch; `len(pipeline)` = (N // world_size) //
  batch_size full batches on every rank and the partial last batch is dropped (the reader
  pads its shard, `pad_last_batch=True`, so it never wraps into the next epoch's data).
- Augmentation randomness: the pipeline seed is derived from (seed, epoch, rank). An epoch
  is reproducible (same ids and same pixels), so a run resumed mid-epoch (the trainer skips
  the first batches) continues exactly where it stopped. The skipped batches are still
  computed.

Corrupt files: the converter validates and skips them. The ImageFolder path does not decode
everything up front (a full pass over ImageNet at every start); every file is read in the
first epoch, and when DALI fails on one the error becomes a DataError naming the file: the
files of the failing and prefetched batches (known exactly, as the reader reads the epoch's
list in order) are checked with PIL.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bt_fast.config import AugmentSpec, Config
from pipelines.base import DataError, Placement, find_image_folder

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError as err:  # pragma: no cover - the venv has DALI
    raise DataError(f"pipeline 'dali' needs NVIDIA DALI ({err}); install nvidia-dali-cuda* or choose another pipeline") from None

DECODE_STRATEGIES = ("once", "roi")
READER = "reader"
INITIAL_FILL = 1024
LUMA = (0.299, 0.587, 0.114)  # PIL convert("L") and DALI's YIQ luma
FLAG_NAMES = ("flip", "jitter", "grayscale", "blur", "solarize")
PARAM_NAMES = ("brightness", "contrast", "saturation", "hue", "sigma")


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 31-bit seed for (seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, stream]).generate_state(1)[0]) & 0x7FFFFFFF


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

    def __len__(self) -> int:
        return len(self.samples)

    def block(self, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
        """Sample ids rank `rank` reads in `epoch`, in reading order."""
        per_rank = len(self.samples) // world_size
        order = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0]).permutation(len(self.samples))
        return order[rank * per_rank:(rank + 1) * per_rank]

    def read(self, plan: "EpochPlan"):
        ids = plan.block
        jpegs, labels = fn.readers.file(
            files=[self.samples[i][0] for i in ids], labels=[int(i) for i in ids],
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
            self.shards.append((str(tar), str(index), int(shard["num_samples"])))
        self.num_samples = sum(n for _, _, n in self.shards)
        if self.num_samples != int(meta.get("num_samples", self.num_samples)):
            raise DataError(f"{meta_path}: shards hold {self.num_samples} samples, num_samples says "
                            f"{meta['num_samples']}; rewrite the records with tools.convert")

    def __len__(self) -> int:
        return self.num_samples

    def tar_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed & 0xFFFFFFFF, epoch, 1]).permutation(len(self.shards))

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


def sample_key(source_info: str) -> int:
    """The converter's global sample number from a webdataset source_info ('.../shard.tar:offset:KEY.jpg')."""
    name = source_info.rsplit(":", 1)[-1]
    return int(name.split(".", 1)[0])


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


def _as_int(flag):
    return int(flag) if isinstance(flag, bool) else fn.cast(flag, dtype=types.INT32)


def _solarize_table(threshold: int) -> list[int]:
    return [k if k < threshold else 255 - k for k in range(256)]


def _view(jpegs, images, shape, spec: AugmentSpec, view: int, decode: str, decoder: str, gpu: bool,
          out_dtype, debug: bool):
    """One distorted view (S, S, 3) HWC in `out_dtype`, and its per-sample choices when `debug`."""
    size = spec.image_size
    anchor, extent = fn.random_crop_generator(shape, random_area=list(spec.crop_scale),
                                              random_aspect_ratio=list(spec.crop_ratio), num_attempts=10)
    if decode == "once":
        start = fn.cast(anchor, dtype=types.FLOAT)
        x = fn.resize(images, size=[size, size], roi_start=start, roi_end=start + fn.cast(extent, dtype=types.FLOAT),
                      interp_type=types.INTERP_CUBIC, antialias=True)
    else:
        crop = fn.decoders.image_slice(jpegs, start=anchor, shape=extent, axis_names="HW", device=decoder,
                                       output_type=types.RGB)
        x = fn.resize(crop, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)

    # Colour jitter: factors are identities for samples without jitter (conditional math).
    jitter = _coin(spec.jitter_p)
    gain = 0.0 if jitter is False else (1.0 if jitter is True else fn.cast(jitter, dtype=types.FLOAT))
    brightness = 1.0 + gain * (_factor(spec.brightness, 1.0) - 1.0)
    contrast = 1.0 + gain * (_factor(spec.contrast, 1.0) - 1.0)
    saturation = 1.0 + gain * (_factor(spec.saturation, 1.0) - 1.0)
    hue = gain * _factor(spec.hue, 0.0)
    gray = _coin(spec.grayscale_p)
    if not (jitter is False and gray is False):
        if jitter is not False:
            means = fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT)
            if gpu:  # GPU only: argument inputs live on the host
                means = means.cpu()
            centre = dmath.floor(means[0] * LUMA[0] + means[1] * LUMA[1] + means[2] * LUMA[2] + 0.5)
            x = fn.brightness_contrast(x, brightness=brightness, contrast=contrast, contrast_center=centre)
        keep_colour = 1.0 - (1.0 if gray is True else (0.0 if gray is False else fn.cast(gray, dtype=types.FLOAT)))
        x = fn.hsv(x, hue=hue * 360.0, saturation=saturation * keep_colour)

    blur = _coin(spec.blur_p[view])
    sigma = fn.random.uniform(range=list(spec.blur_sigma), dtype=types.FLOAT)
    # Taps beyond 4 sigma weigh < 1e-4 of the kernel: a window of min(k, 2 ceil(4 sigma) + 1) stays within
    # rounding of torchvision's k-tap kernel (< 0.001 levels mean |diff|) and is ~2x cheaper on average.
    window = dmath.min(fn.cast(dmath.ceil(sigma * 4.0), dtype=types.INT32) * 2 + 1, spec.blur_kernel_size)
    if blur:  # a Python bool (p is 0 or 1) or a per-sample DALI conditional
        x = fn.gaussian_blur(x, window_size=window, sigma=sigma)

    solarize = _coin(spec.solarize_p[view])
    table = _solarize_table(int(round(spec.solarize_threshold * 255)))
    if solarize:
        x = fn.lookup_table(x, keys=list(range(256)), values=table, dtype=types.UINT8)

    flip = _coin(spec.flip_p)
    out = fn.crop_mirror_normalize(x, dtype=out_dtype, output_layout="HWC", mirror=_as_int(flip),
                                   mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std])
    if not debug:
        return out, ()

    def scalar(value, dtype=types.FLOAT):
        # A per-sample value even where the spec made it a Python constant.
        if isinstance(value, (bool, int, float)):
            return fn.constant(fdata=float(value), shape=[], dtype=dtype)
        return fn.cast(value, dtype=dtype)

    extras = tuple(scalar(flag, types.INT32) for flag in (flip, jitter, gray, blur, solarize))
    extras += (scalar(brightness), scalar(contrast), scalar(saturation), scalar(hue), scalar(sigma),
               fn.cast(anchor, dtype=types.INT32), fn.cast(extent, dtype=types.INT32))
    return out, extras


@pipeline_def(enable_conditionals=True)
def two_view_graph(source, plan: EpochPlan, spec: AugmentSpec, decode: str, gpu: bool, out_dtype, debug: bool):
    """The DALI graph: (view1, view2[, ids, image shape, per-view choices...])."""
    decoder = "mixed" if gpu else "cpu"  # GPU only: nvJPEG decoding
    jpegs, labels = source.read(plan)
    shape = fn.peek_image_shape(jpegs, dtype=types.INT32)
    images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB) if decode == "once" else None
    view1, extras1 = _view(jpegs, images, shape, spec, 0, decode, decoder, gpu, out_dtype, debug)
    view2, extras2 = _view(jpegs, images, shape, spec, 1, decode, decoder, gpu, out_dtype, debug)
    if not debug:
        return view1, view2
    ids = labels if labels is not None else fn.get_property(jpegs, key="source_info")
    return (view1, view2, ids, shape) + extras1 + extras2


# --------------------------------------------------------------------------------------------
# The TwoViewPipeline
# --------------------------------------------------------------------------------------------

@dataclass
class DebugBatch:
    """One batch with what the graph chose for it (numpy arrays, one row per sample)."""

    view1: torch.Tensor
    view2: torch.Tensor
    ids: np.ndarray                 # sample ids (FolderSource index, or the converter's sample number)
    image_shape: np.ndarray         # (B, 3) decoded H, W, C
    choices: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # per view: FLAG_NAMES, PARAM_NAMES, anchor, extent


def _unreadable(path: str) -> str | None:
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - any failure is the answer
        return " ".join(str(err).split()) or type(err).__name__
    return None


class DALIPipeline:
    """ImageFolder or webdataset records -> DALI (decode once, two distorted views) -> torch."""

    def __init__(self, config: Config, placement: Placement, batch_size: int, *, decode: str = "once",
                 debug: bool = False):
        if decode not in DECODE_STRATEGIES:
            raise DataError(f"DALI decode strategy must be one of {DECODE_STRATEGIES}, got {decode!r}")
        self.config = config
        self.spec: AugmentSpec = config.augment
        self.placement = placement
        self.batch_size = batch_size
        self.decode = decode
        self.debug = debug
        self.seed = config.seed
        self.epoch = 0
        self.gpu = placement.device.type == "cuda"
        self.source = RecordSource(config.dali.records) if config.dali.records else FolderSource(config.data)
        where = config.dali.records or config.data
        self.per_rank = len(self.source) // placement.world_size
        if self.per_rank < batch_size:
            raise DataError(f"{where} has {len(self.source)} images: too few for one batch of {batch_size} per rank "
                            f"on {placement.world_size} rank(s); lower batch_size")
        self.out_dtype = types.FLOAT16 if placement.dtype == torch.float16 else types.FLOAT
        self.torch_dtype = torch.float16 if placement.dtype == torch.float16 else torch.float32
        self.threads = max(1, config.workers)

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        p = self.placement
        block = (self.source.block(self.seed, epoch, p.rank, p.world_size)
                 if isinstance(self.source, FolderSource) else None)
        return EpochPlan(self.seed, epoch, p.rank, p.world_size, block)

    def build(self, plan: EpochPlan):
        device_id = None
        if self.gpu:  # GPU only
            device_id = self.placement.device.index if self.placement.device.index is not None else torch.cuda.current_device()
        pipe = two_view_graph(
            self.source, plan, self.spec, self.decode, self.gpu, self.out_dtype, self.debug,
            batch_size=self.batch_size, num_threads=self.threads, device_id=device_id,
            seed=epoch_seed(self.seed, plan.epoch, 2 + plan.rank),
            prefetch_queue_depth=max(1, self.config.dali.prefetch))
        pipe.build()
        return pipe

    def _to_torch(self, tensor_list) -> torch.Tensor:
        size = self.spec.image_size
        out = torch.empty((self.batch_size, size, size, 3), dtype=self.torch_dtype, device=self.placement.device)
        stream = torch.cuda.current_stream(self.placement.device) if self.gpu else None  # GPU only
        feed_ndarray(tensor_list.as_tensor(), out, cuda_stream=stream)
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
        window = plan.block[batch * self.batch_size:(batch + 1 + depth) * self.batch_size]
        paths = [self.source.samples[i][0] for i in window]
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

    def _run(self, debug: bool) -> Iterator:
        plan = self.plan()
        pipe = self.build(plan)
        try:
            for batch in range(len(self)):
                try:
                    outputs = pipe.run()
                except RuntimeError as err:
                    raise self._error(err, plan, batch) from None
                views = (self._to_torch(outputs[0]), self._to_torch(outputs[1]))
                if not debug:
                    yield views
                    continue
                yield self._debug_batch(views, outputs)
        finally:
            del pipe

    def _debug_batch(self, views, outputs) -> DebugBatch:
        def rows(tensor_list):
            return np.stack([np.array(tensor_list.at(i)) for i in range(len(tensor_list))])

        if isinstance(self.source, RecordSource):
            ids = np.array([sample_key(bytes(np.array(outputs[2].at(i))).decode()) for i in range(len(outputs[2]))])
        else:
            ids = rows(outputs[2]).reshape(-1)
        per_view = len(FLAG_NAMES) + len(PARAM_NAMES) + 2
        choices = []
        for view in range(2):
            values = [rows(t) for t in outputs[4 + view * per_view: 4 + (view + 1) * per_view]]
            names = FLAG_NAMES + PARAM_NAMES + ("anchor", "extent")
            choices.append({name: (v.reshape(-1) if name not in ("anchor", "extent") else v)
                            for name, v in zip(names, values)})
        return DebugBatch(views[0], views[1], ids, rows(outputs[3]), (choices[0], choices[1]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.debug:
            for batch in self._run(debug=True):
                yield batch.view1, batch.view2
        else:
            yield from self._run(debug=False)

    def debug_batches(self) -> Iterator[DebugBatch]:
        """The current epoch's batches with ids and per-sample choices (needs `debug=True`)."""
        if not self.debug:
            raise ValueError("construct DALIPipeline(..., debug=True) to get debug batches")
        return self._run(debug=True)


def _dali_reason(text: str) -> str:
    """The informative lines of a DALI error (without its pipeline traceback)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keep = [line for line in lines if not line.startswith(("Critical error", "Error in", "which was used", "File ",
                                                            "encountered:", "Current pipeline", "C++ context"))
            and not line.startswith(("return ", "x = ", "jpegs"))]
    return " ".join(keep[-3:]) or (lines[-1] if lines else "unknown error")

"""Benchmark the data pipelines, the device augmentation, the LARS optimizer and the training step.

    python -m tools.bench [--data DIR] [--pipelines reference,ffcv,dali] [--batch-size N] [--workers N]
                          [--image-size N] [--json PATH] [--plot PATH] [--quick]

Without --data the demo dataset is built (once) and used: `data/demo/train`.

Every timed figure is the median, min and max of several timed repetitions after an untimed
warm-up: `{"median": x, "min": x, "max": x}`; a rate is derived from the times (median rate =
count / median time, so rate x time = count exactly). Ratios are plain numbers computed from
medians. Nothing is estimated or carried over from earlier runs: every figure comes from this run.

Sections (top-level keys of the JSON written to --json):

environment   device, CPU count, library versions, batch size, image size, reps, CPU meter.
decode_floor  CPU seconds per image to only decode JPEGs to RGB pixels, one thread, with OpenCV's
              `cv2.imdecode` (libjpeg-turbo; the build string is recorded). `cpu_s_per_image` is
              the floor of the original files; `decode_floor.<pipeline>.cpu_s_per_image` that of
              exactly the bytes that pipeline decodes: the originals for `reference` (and for `dali`
              reading an ImageFolder), the JPEGs stored in the `.beton` for `ffcv` (located with
              ffcv's Reader), the `.jpg` tar members for `dali` reading webdataset records.
loaders       per pipeline (`reference`, `ffcv`, `dali`): `images_per_s` delivering two augmented
              views to the device, over windows of --loader-batches consecutive batches after two
              warm-up batches; `host_cpu_s_per_image` = CPU time of this process (all threads)
              plus all its descendant processes (live DataLoader workers via psutil, exited ones
              via children-times) per image delivered; `vs_decode_floor` = that over the
              pipeline's own floor. On a CPU device the device-side augmentation runs on the host:
              a pipeline with a separate host stage (`crops()`, FFCV) then has its host stage
              measured alone as well (`host_cpu_scope`; the whole pipeline's figure is
              `cpu_s_per_image_incl_device_work`), and a pipeline without one (DALI) is flagged
              `host_cpu_includes_device_work`. `{"unavailable": reason}` when a pipeline cannot be
              imported or built, or fails while loading.
augment       images/s of `pipelines.augment.TwoViewAugment` against `kornia.augmentation` with the
              same distortions per view (flip, colour jitter p 0.8 with the same magnitudes,
              grayscale, Gaussian blur with the same kernel and sigma range and the per-view
              probabilities, solarize, normalise), both views, from uint8 crops on the device.
optimizer     LARS step time of the official per-parameter loop (`reference_ms`),
              `bt_fast.optim.LARS` (`foreach_ms`) and `LARS(compile=True)` (`fused_ms`), on random
              gradients of the ResNet-50 + 8192-8192-8192 parameters (--optimizer-params), and
              operations per step: aten ops dispatched (TorchDispatchMode) for the eager two; for
              the compiled one (a dispatch mode disables torch.compile) the profiler's count of
              inductor kernels plus aten ops outside them (CPU), or of GPU kernels (CUDA); see
              `ops_counted`. The compile is reported (`fused_compile_s`), not timed.
              `ops_growth_probe`: eager op counts with 8 and 32 tensors.
train_step    images/s of `Trainer.train_step` on device-resident synthetic batches, and fed by each
              pipeline (each in a fresh process, as training runs it), with the data-stall
              fraction per step (time waiting for the batch over the whole step, as
              `bt_fast.train` logs it). `{"skipped": reason}` for pipelines not in
              --train-pipelines.
targets       each target with the measured value and met / not met (printed, never asserted).

On the CPU the training step uses a small model by default (resnet18, 512-512-512 projector,
64 px crops, batch 32, no autocast); --arch/--projector/--train-image-size/--train-batch-size/--amp
choose. On CUDA the defaults are resnet50, 8192-8192-8192, --image-size and --batch-size.

--quick: batch 32 at 128 px, 2 repetitions, training step on synthetic batches only (unless
--train-pipelines names pipelines); the optimizer keeps the paper's parameter set.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import tarfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from bt_fast.config import AugmentSpec, Config, ConfigError, load_config
from pipelines.base import DataError, Placement, find_image_folder

PIPELINES = ("reference", "ffcv", "dali")
DEMO_ROOT = Path("data/demo")
DEFAULT_JSON = Path("runs/bench/bench.json")
DEFAULT_PLOT = Path("runs/bench/bench.png")
OPTIMIZER_SETS = {  # name -> (arch, projector) of the model whose parameters are stepped; "small": 8 tensors
    "paper": ("resnet50", "8192-8192-8192"),
    "demo": ("resnet18", "512-512-512"),
    "small": None,
}
TARGETS = {"ffcv_vs_floor": 1.3, "augment_speedup": 4.0, "lars_speedup": 2.0}


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says why."""


# -- statistics ----------------------------------------------------------------------------------
def stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        raise ValueError("no measurements")
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def rate_stats(count: float, seconds: Sequence[float]) -> dict[str, float]:
    """count / seconds as a figure: median = count / median(seconds), so rate x seconds = count exactly."""
    s = stats(seconds)
    return {"median": count / s["median"], "min": count / s["max"], "max": count / s["min"]}


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "median" not in a or "median" not in b or not b["median"]:
        return None
    return a["median"] / b["median"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- host CPU time of this process and its descendants ---------------------------------------------
try:
    import psutil
except ImportError:  # pragma: no cover - psutil comes with ffcv
    psutil = None


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and every descendant, live or exited.

    This process (all its threads: FFCV's and DALI's run here) from `time.process_time()`, exact
    to the nanosecond; live descendants (DataLoader workers, ...) through psutil, in clock ticks;
    exited descendants once reaped are in their parent's children-times (RUSAGE_CHILDREN for
    ours, psutil for a live descendant's), so a worker that exits between two readings is
    neither lost nor counted twice. Without psutil, live workers are missed
    (`environment.cpu_meter` says so).
    """
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + reaped.ru_utime + reaped.ru_stime
    if psutil is None:
        return total
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


CPU_METER = ("time.process_time() of this process + psutil for live descendants + RUSAGE_CHILDREN for reaped ones"
             if psutil is not None else
             "time.process_time() + RUSAGE_CHILDREN: live worker processes are NOT counted (psutil missing)")


# -- environment ---------------------------------------------------------------------------------
def _version(*distributions: str) -> str:
    """Installed version of the first distribution found (metadata only: nothing is imported)."""
    from importlib import metadata
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _dali_version() -> str:
    from importlib import metadata
    names = sorted({d.metadata["Name"] for d in metadata.distributions()
                    if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")})
    return ", ".join(f"{n} {metadata.version(n)}" for n in names) or "not installed"


def jpeg_library() -> str:
    import cv2
    lines = [line.strip() for line in cv2.getBuildInformation().splitlines() if line.strip().startswith("JPEG:")]
    return f"OpenCV {cv2.__version__}, {lines[0].split(':', 1)[1].strip() if lines else 'JPEG library unknown'}"


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
    return {
        "device": str(device), "device_name": name, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": _version("torchvision"), "ffcv": _version("ffcv"),
        "dali": _dali_version(), "kornia": _version("kornia"), "numba": _version("numba"),
        "opencv": _version("opencv-python", "opencv-python-headless", "opencv-contrib-python"),
        "data": str(args.data), "batch_size": args.batch_size, "image_size": args.image_size,
        "workers": args.workers, "quick": args.quick, "reps": args.reps, "cpu_meter": CPU_METER,
    }


# -- pipelines -----------------------------------------------------------------------------------
def pipeline_config(args: argparse.Namespace, name: str, image_size: int, batch_size: int,
                    extra: Sequence[str] = ()) -> Config:
    return load_config(args.config, [f"data={args.data}", f"pipeline={name}", f"workers={args.workers}",
                                     f"batch_size={batch_size}", f"augment.image_size={image_size}",
                                     f"seed={args.seed}", *extra, *args.set])


def build(args: argparse.Namespace, name: str, placement: Placement, image_size: int, batch_size: int):
    """(pipeline, None) or (None, reason) when the pipeline cannot be imported or built."""
    from pipelines import build_pipeline
    try:
        config = pipeline_config(args, name, image_size, batch_size)
        return build_pipeline(config, placement, batch_size), None
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to build makes the pipeline unavailable
        message = " ".join(str(err).split()) or type(err).__name__
        return None, f"{type(err).__name__}: {message}"


def batch_stream(pipeline, host_stage: bool = False, epoch0: int = 0) -> Iterator:
    """Batches across epochs without end, each epoch reseeded like the trainer does.

    `host_stage`: the pipeline's `crops()` (uint8 crops before the device augmentation) instead.
    """
    epoch = epoch0
    while True:
        pipeline.set_epoch(epoch)
        empty = True
        for batch in (pipeline.crops() if host_stage else pipeline):
            empty = False
            yield batch
        if empty:
            raise BenchError(f"pipeline {type(pipeline).__name__} yielded no batch in epoch {epoch}")
        epoch += 1


def _batch_images(batch, device: torch.device, who: str) -> int:
    """Images in one delivered batch: (view1, view2) of equal shapes on the device, or a crop tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    v1, v2 = batch
    if v1.device.type != device.type or v2.shape != v1.shape:
        raise BenchError(f"{who} delivered views on {v1.device} of shapes {tuple(v1.shape)} / {tuple(v2.shape)}; "
                         f"expected equal shapes on {device}")
    return v1.shape[0]


def loader_windows(pipeline, device: torch.device, window: int, reps: int, warmup: int,
                   host_stage: bool = False) -> tuple[list[float], list[float], list[float], int]:
    """(wall seconds, host CPU seconds, of which this process's) of `reps` consecutive windows of `window` batches, after
    `warmup` untimed batches (worker start, JIT compiles, file cache).

    The stream runs across epochs. In steady state the workers produce what the windows consume,
    so the CPU time of a window is the work for the images it delivered; work in flight at the
    window edges (at most a batch per worker) is the only error.
    """
    stream = batch_stream(pipeline, host_stage)
    who = type(pipeline).__name__
    walls, cpus, mains, counts = [], [], [], []

    def take(n: int) -> int:
        count = sum(_batch_images(next(stream), device, who) for _ in range(n))
        sync(device)
        return count

    take(warmup)
    for _ in range(reps):
        cpu0, main0, t0 = tree_cpu_seconds(), time.process_time(), time.perf_counter()
        counts.append(take(window))
        walls.append(time.perf_counter() - t0)
        mains.append(time.process_time() - main0)
        cpus.append(tree_cpu_seconds() - cpu0)
    stream.close()
    if len(set(counts)) != 1:
        raise BenchError(f"windows of {window} batches delivered different numbers of images: {counts}")
    return walls, cpus, mains, counts[0]


def bench_loader(args, name: str, device: torch.device) -> tuple[dict, Any]:
    """(loaders.<name> entry, the JPEG source that pipeline decodes or None).

    host_cpu_s_per_image is the CPU time of the whole pipeline, except on a CPU device for a
    pipeline with a separate host stage (`crops()`, e.g. FFCV): there the device augmentation
    runs on the host too, so the host stage is measured on its own as well, and the whole
    pipeline's CPU time is reported as `cpu_s_per_image_incl_device_work`.
    """
    placement = Placement(device, torch.float32)
    pipeline, reason = build(args, name, placement, args.image_size, args.batch_size)
    if pipeline is None:
        return {"unavailable": reason}, None
    entry: dict[str, Any] = {}
    try:
        source = jpeg_source(args, name, pipeline)
        walls, cpus, mains, images = loader_windows(pipeline, device, args.loader_batches, args.reps,
                                                    args.loader_warmup)
        entry["images_per_s"] = rate_stats(images, walls)
        entry["host_cpu_s_per_image"] = stats([c / images for c in cpus])
        entry["main_process_cpu_s_per_image"] = stats([c / images for c in mains])  # the rest: worker processes
        entry["host_cpu_scope"] = "whole pipeline"
        entry["seconds"] = stats(walls)
        entry["host_cpu_seconds"] = stats(cpus)
        entry["images_per_rep"] = images
        entry["batches_per_rep"] = args.loader_batches
        if device.type == "cpu" and callable(getattr(pipeline, "crops", None)):
            h_walls, h_cpus, _, h_images = loader_windows(pipeline, device, args.loader_batches, args.reps,
                                                       args.loader_warmup, host_stage=True)
            entry["cpu_s_per_image_incl_device_work"] = entry["host_cpu_s_per_image"]
            entry["host_cpu_s_per_image"] = stats([c / h_images for c in h_cpus])
            entry["host_cpu_scope"] = "host stage only (crops(): decode + crops, before the device augmentation)"
            entry["host_stage_images_per_s"] = rate_stats(h_images, h_walls)
            entry["host_stage_seconds"] = stats(h_walls)
            entry["host_stage_cpu_seconds"] = stats(h_cpus)
            entry["host_stage_images_per_rep"] = h_images
    except Exception as err:  # noqa: BLE001 - a pipeline that builds but fails to deliver is reported
        traceback.print_exc(file=sys.stderr)
        return {"unavailable": f"failed while loading: {type(err).__name__}: {' '.join(str(err).split())}"}, None
    finally:
        del pipeline
        gc.collect()
    # On a CPU device ffcv/dali augment on the host: say when the host figure includes that work.
    entry["host_cpu_includes_device_work"] = (device.type == "cpu" and name != "reference"
                                              and entry["host_cpu_scope"] == "whole pipeline")
    return entry, source


# -- decode floor --------------------------------------------------------------------------------
def _spread(items: list, limit: int) -> list:
    """At most `limit` items spread evenly over `items` (all classes represented)."""
    if len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def original_jpegs(data: str | Path, limit: int) -> list[bytes]:
    _, samples = find_image_folder(data)
    return [Path(path).read_bytes() for path, _ in _spread(samples, limit)]


def beton_jpegs(path: str | Path, limit: int, field: str = "image") -> list[bytes]:
    """The JPEG bytes an FFCV `.beton` stores for `field`, located through ffcv's own Reader.

    Each sample's metadata holds `data_ptr`; the allocation table maps that pointer to its size.
    Samples written raw (not JPEG) are skipped: FFCV copies them, it does not decode them.
    """
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader
    reader = Reader(str(path))
    if field not in reader.field_names:
        raise BenchError(f"{path} has no field '{field}' (fields: {reader.field_names})")
    meta = reader.metadata[f"f{reader.field_names.index(field)}"]  # fields are unnamed: f0, f1, ... in order
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    jpg = IMAGE_MODES["jpg"]
    picks = _spread([i for i in range(len(meta)) if meta["mode"][i] == jpg], limit)
    out = []
    with open(path, "rb") as f:
        for i in picks:
            ptr = int(meta["data_ptr"][i])
            f.seek(ptr)
            out.append(f.read(sizes[ptr]))
    return out


def shard_jpegs(root: str | Path, limit: int) -> list[bytes]:
    """The `.jpg` members of the webdataset shards listed in `root/dataset.json` (tools.convert --format dali)."""
    root = Path(root)
    meta = json.loads((root / "dataset.json").read_text())
    ext = "." + meta.get("extensions", {}).get("image", "jpg")
    out: list[bytes] = []
    for shard in meta["shards"]:
        with tarfile.open(root / shard["tar"]) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(ext):
                    out.append(tar.extractfile(member).read())
    return _spread(out, limit)


def jpeg_source(args, name: str, pipeline) -> dict:
    """Which bytes `pipeline` decodes: {"kind": originals|beton|shards, "path": ...}."""
    if name == "ffcv":
        for attr in ("beton", "beton_path", "path"):
            value = getattr(pipeline, attr, None)
            if value and str(value).endswith(".beton"):
                return {"kind": "beton", "path": str(value)}
        config = pipeline_config(args, name, args.image_size, args.batch_size)
        beton = config.ffcv.beton or str(Path(config.data.rstrip("/")).with_suffix(".beton"))
        return {"kind": "beton", "path": beton}
    if name == "dali":
        records = getattr(pipeline, "records", None)
        if records is None:
            records = pipeline_config(args, name, args.image_size, args.batch_size).dali.records
        if records:
            return {"kind": "shards", "path": str(records)}
    return {"kind": "originals", "path": str(args.data)}


def load_jpegs(source: dict, limit: int) -> list[bytes]:
    if source["kind"] == "beton":
        return beton_jpegs(source["path"], limit)
    if source["kind"] == "shards":
        return shard_jpegs(source["path"], limit)
    return original_jpegs(source["path"], limit)


def decode_cpu_seconds(jpegs: list[bytes], reps: int) -> list[float]:
    """Per-image CPU seconds (this thread only) of decoding every JPEG to RGB pixels, per repetition."""
    import cv2
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    buffers = [np.frombuffer(b, dtype=np.uint8) for b in jpegs]
    per_image = []
    for rep in range(reps + 1):  # rep 0: warm-up (page cache, allocator)
        t0 = time.thread_time()
        for buf in buffers:
            if cv2.imdecode(buf, flags) is None:
                raise BenchError("cv2.imdecode could not decode a JPEG the pipeline reads")
        if rep:
            per_image.append((time.thread_time() - t0) / len(buffers))
    return per_image


def bench_decode_floor(args, sources: dict[str, dict | None], loaders: dict[str, dict]) -> dict:
    originals = original_jpegs(args.data, args.decode_images)
    floor = stats(decode_cpu_seconds(originals, args.reps))
    out: dict[str, Any] = {
        "decoder": f"cv2.imdecode, 1 thread ({jpeg_library()})",
        "cpu_s_per_image": floor, "images": len(originals),
        "mean_jpeg_bytes": float(np.mean([len(b) for b in originals])),
    }
    for name, entry in loaders.items():
        source = sources.get(name)
        if source is None:
            out[name] = {"unavailable": entry.get("unavailable", "pipeline not measured")}
            continue
        if source["kind"] == "originals":
            out[name] = {"source": "originals", "path": source["path"], "cpu_s_per_image": floor,
                         "images": len(originals)}
            continue
        try:
            jpegs = load_jpegs(source, args.decode_images)
            if not jpegs:
                raise BenchError(f"no JPEGs found in {source['path']}")
            out[name] = {"source": source["kind"], "path": source["path"],
                         "cpu_s_per_image": stats(decode_cpu_seconds(jpegs, args.reps)), "images": len(jpegs),
                         "mean_jpeg_bytes": float(np.mean([len(b) for b in jpegs]))}
        except Exception as err:  # noqa: BLE001
            out[name] = {"unavailable": f"cannot read the {source['kind']} at {source['path']}: "
                                        f"{type(err).__name__}: {err}"}
    return out


# -- device augmentation -------------------------------------------------------------------------
class KorniaTwoView:
    """uint8 (B, 3, H, W) crops of both views -> two normalised float views, with kornia.

    View 1 is `tools.bench_ffcv.kornia_view` (the paper's view-1 distortions); view 2 is the same
    with the view-2 blur and solarize probabilities.
    """

    def __init__(self, spec: AugmentSpec, device: torch.device):
        from tools.bench_ffcv import kornia_view
        swapped = dataclasses.replace(spec, blur_p=spec.blur_p[::-1], solarize_p=spec.solarize_p[::-1])
        self.views = [kornia_view(spec, device), kornia_view(swapped, device)]

    def __call__(self, crops1: torch.Tensor, crops2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(aug(c.float() / 255) for aug, c in zip(self.views, (crops1, crops2)))


def ours_two_view(spec: AugmentSpec, device: torch.device, dtype: torch.dtype) -> Callable:
    """pipelines.augment.TwoViewAugment as a callable on the two uint8 crop batches."""
    from pipelines.augment import TwoViewAugment
    return TwoViewAugment(spec, dtype)  # stateless: works on the device of its inputs


def time_calls(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def bench_augment(args, device: torch.device) -> dict:
    spec = pipeline_config(args, "reference", args.image_size, args.batch_size).augment
    g = torch.Generator().manual_seed(args.seed)
    size, batch = args.image_size, args.batch_size
    # channels-last uint8 (B, 3, S, S), as the loaders deliver crops
    crops = [torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8).to(device).permute(0, 3, 1, 2)
             for _ in range(2)]
    out: dict[str, Any] = {"batch_size": batch, "image_size": size,
                           "input": "channels-last uint8 crops on the device, both views",
                           "kornia": f"kornia {_version('kornia')}: tools.bench_ffcv.kornia_view per view"}
    kornia = KorniaTwoView(spec, device)
    try:
        ours = ours_two_view(spec, device, torch.float32)
    except Exception as err:  # noqa: BLE001
        ours = None
        out["ours"] = {"unavailable": f"pipelines.augment.TwoViewAugment: {type(err).__name__}: {err}"}
    runners = {"kornia": lambda: kornia(*crops)}
    if ours is not None:
        runners["ours"] = lambda: ours(*crops)
    # Interleaved repetitions, so that a change in the machine's load affects both sides alike.
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for run in runners.values():
            time_calls(run, device, reps=0)  # warm-up only
        for _ in range(args.reps):
            for name, run in runners.items():
                seconds[name] += time_calls(run, device, reps=1, warmup=0)
    out["kornia_images_per_s"] = rate_stats(batch, seconds["kornia"])
    if ours is None:
        out["ours_images_per_s"] = out["speedup"] = None
        return out
    out["ours_images_per_s"] = rate_stats(batch, seconds["ours"])
    out["speedup"] = ratio(out["ours_images_per_s"], out["kornia_images_per_s"])
    return out


# -- optimizer -----------------------------------------------------------------------------------
@torch.no_grad()
def official_lars_step(groups: list[dict], state: dict, momentum: float = 0.9, eta: float = 0.001) -> None:
    """The official Barlow Twins LARS step, one tensor at a time, both filters on (1-D tensors excluded)."""
    for group in groups:
        for p in group["params"]:
            dp = p.grad
            if p.ndim != 1:
                dp = dp.add(p, alpha=group["weight_decay"])
                param_norm, update_norm = torch.norm(p), torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, eta * param_norm / update_norm, one),
                                one)
                dp = dp.mul(q)
            if p not in state:
                state[p] = torch.zeros_like(p)
            mu = state[p]
            mu.mul_(momentum).add_(dp)
            p.add_(mu, alpha=-group["lr"])


def optimizer_parameters(name: str, device: torch.device, seed: int) -> list[dict]:
    """Param groups (weights, biases/norms) with random gradients, as the trainer builds them."""
    from bt_fast.model import build_model
    from bt_fast.optim import param_groups
    torch.manual_seed(seed)
    if OPTIMIZER_SETS[name] is None:
        params = [torch.nn.Parameter(torch.randn(256, 256, device=device)) for _ in range(4)]
        params += [torch.nn.Parameter(torch.randn(256, device=device)) for _ in range(4)]
        groups = [{"params": params[:4]}, {"params": params[4:]}]
    else:
        arch, projector = OPTIMIZER_SETS[name]
        groups = param_groups(build_model(arch, projector, channels_last=False).to(device))
    for group, lr in zip(groups, (0.2, 0.0048)):
        group["lr"], group["weight_decay"] = lr, 1.5e-6
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    return groups


def count_dispatched_ops(fn: Callable[[], Any]) -> int:
    """aten ops reaching the dispatcher (below autograd) while `fn` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.count += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.count


def count_compiled_ops(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Operations of one compiled step, from the profiler (a dispatch mode disables torch.compile).

    CUDA: GPU kernels launched (every kernel, fused or aten). CPU: inductor's fused C++ kernels
    (visible because they were compiled with `cpp.enable_kernel_profile`) plus the outermost aten
    ops run outside them.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA), "GPU kernels launched (profiler)"

    def outermost_aten(e) -> bool:
        if not e.name.startswith("aten::"):
            return False
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::") or "cpp_fused" in parent.name:
                return False
            parent = parent.cpu_parent
        return True
    kernels = sum(1 for e in events if "cpp_fused" in e.name)
    aten = sum(1 for e in events if outermost_aten(e))
    return kernels + aten, f"inductor C++ kernels ({kernels}) + outermost aten ops outside them ({aten}) (profiler)"


def _free(*states: dict) -> None:
    for s in states:
        s.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ops_growth_probe(device: torch.device) -> dict:
    """Dispatched ops per step of the official loop and the foreach LARS with n and 4n small tensors."""
    from bt_fast.optim import LARS
    counts: dict[str, list[int]] = {"reference": [], "foreach": []}
    sizes = [8, 32]
    for n in sizes:
        params = [torch.nn.Parameter(torch.randn(16, 16, device=device)) for _ in range(n // 2)]
        params += [torch.nn.Parameter(torch.randn(16, device=device)) for _ in range(n // 2)]
        for p in params:
            p.grad = torch.randn_like(p)
        groups = [{"params": params[: n // 2], "lr": 0.1, "weight_decay": 1e-4},
                  {"params": params[n // 2:], "lr": 0.1, "weight_decay": 1e-4}]
        state: dict = {}
        official_lars_step(groups, state)  # creates the momentum buffers
        counts["reference"].append(count_dispatched_ops(lambda: official_lars_step(groups, state)))
        opt = LARS(groups, lr=0.1, weight_decay=1e-4, weight_decay_filter=True, lars_adaptation_filter=True)
        opt.step()
        counts["foreach"].append(count_dispatched_ops(opt.step))
    return {"tensors": sizes, **counts}


def bench_optimizer(args, device: torch.device) -> dict:
    from bt_fast.optim import LARS
    groups = optimizer_parameters(args.optimizer_params, device, args.seed)
    params = [p for g in groups for p in g["params"]]
    out: dict[str, Any] = {
        "parameter_set": args.optimizer_params,
        "model": ("8 synthetic tensors" if OPTIMIZER_SETS[args.optimizer_params] is None
                  else "+".join(OPTIMIZER_SETS[args.optimizer_params])),
        "parameters": sum(p.numel() for p in params), "tensors": len(params), "reps": args.reps,
    }
    lars_kwargs = dict(lr=0.0, weight_decay=1.5e-6, weight_decay_filter=True, lars_adaptation_filter=True)

    # Each variant: momentum buffers first (the optimizers' warm-up step creates them; the compiled
    # one also compiles there), then one step with its operations counted, then the timed steps.
    state: dict = {p: torch.zeros_like(p) for p in params}  # what its first step would create
    out["reference_ops_per_step"] = count_dispatched_ops(lambda: official_lars_step(groups, state))
    seconds = time_calls(lambda: official_lars_step(groups, state), device, args.reps, warmup=0)
    out["reference_ms"] = stats([1000 * s for s in seconds])
    _free(state)

    foreach = LARS(groups, **lars_kwargs)
    foreach.step()
    out["foreach_ops_per_step"] = count_dispatched_ops(foreach.step)
    seconds = time_calls(foreach.step, device, args.reps, warmup=0)
    out["foreach_ms"] = stats([1000 * s for s in seconds])
    _free(foreach.state)
    del foreach

    from torch._inductor import config as inductor_config
    compiled = LARS(groups, compile=True, **lars_kwargs)
    # Kernel profiling makes inductor's C++ kernels visible to the profiler (one RECORD_FUNCTION per
    # kernel call, negligible); it is part of the compile, hence of the cache key.
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        t0 = time.perf_counter()
        compiled.step()  # compiles (or loads from the inductor cache)
        sync(device)
        out["fused_compile_s"] = time.perf_counter() - t0
    out["fused_ops_per_step"], out["fused_ops_counted"] = count_compiled_ops(compiled.step, device)
    seconds = time_calls(compiled.step, device, args.reps, warmup=0)
    out["fused_ms"] = stats([1000 * s for s in seconds])
    _free(compiled.state)
    del compiled, groups, params
    gc.collect()

    out["ops_counted"] = ("reference/foreach: aten ops dispatched per step (TorchDispatchMode); "
                          "fused: " + out["fused_ops_counted"])
    out["speedup"] = ratio(out["reference_ms"], out["fused_ms"])
    out["foreach_speedup"] = ratio(out["reference_ms"], out["foreach_ms"])
    out["ops_growth_probe"] = ops_growth_probe(device)
    return out


# -- training step -------------------------------------------------------------------------------
def train_overrides(args) -> list[str]:
    return [f"arch={args.arch}", f"projector={args.projector}", f"amp={args.amp}", "epochs=100",
            "warmup_epochs=1", "compile_optimizer=false"]


def make_trainer(args, name: str, device: torch.device):
    from bt_fast.distributed import DistContext
    from bt_fast.train import Trainer
    config = pipeline_config(args, name, args.train_image_size, args.train_batch_size, train_overrides(args))
    config.device = device.type
    return Trainer(config, DistContext(rank=0, local_rank=0, world_size=1, device=device))


def train_steps(trainer, batches: Iterator, steps: int, warmup: int) -> tuple[list[float], list[float], int]:
    """(step seconds incl. the wait for the batch, wait seconds) of `steps` steps after `warmup` steps."""
    totals, waits = [], []
    images = 0
    for i in range(warmup + steps):
        tick = time.perf_counter()
        y1, y2 = next(batches)
        waited = time.perf_counter() - tick
        trainer.train_step(y1, y2).item()  # .item() syncs
        trainer.step += 1
        if i >= warmup:
            totals.append(time.perf_counter() - tick)
            waits.append(waited)
            images = y1.shape[0]
    return totals, waits, images


def train_with_pipeline(args, name: str, device: torch.device) -> dict:
    """train_step.<name>: steps fed by the pipeline, timed as `bt_fast.train` times them."""
    try:
        trainer = make_trainer(args, name, device)
    except Exception as err:  # noqa: BLE001
        return {"unavailable": f"{type(err).__name__}: {' '.join(str(err).split())}"}
    stream = batch_stream(trainer.pipeline)
    try:
        totals, waits, images = train_steps(trainer, stream, args.train_steps, args.train_warmup)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return {"unavailable": f"failed while training: {type(err).__name__}: {' '.join(str(err).split())}"}
    finally:
        stream.close()
    return {"images_per_s": rate_stats(images, totals),
            "data_stall_fraction": stats([w / t for w, t in zip(waits, totals)]),
            "step_seconds": stats(totals), "wait_seconds": stats(waits)}


def train_in_child(args, name: str) -> dict:
    """`train_with_pipeline` in a fresh process, as training runs: one pipeline per process.

    A process that already built and iterated a pipeline for the loader figures keeps its
    threads and JIT state; a fresh one measures the pipeline alone.
    """
    with tempfile.TemporaryDirectory(prefix="bt_fast_bench_") as scratch:
        out = Path(scratch) / "train_step.json"
        command = [sys.executable, "-m", "tools.bench", *args.argv, "--data", str(args.data),
                   "--_train-child", name, "--_child-out", str(out)]
        try:
            proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            return {"unavailable": f"training-step process timed out after {args.child_timeout} s"}
        if proc.returncode != 0 or not out.is_file():
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            return {"unavailable": f"training-step process failed (exit {proc.returncode}): "
                                   f"{lines[-1].strip() if lines else 'no output'}"}
        return json.loads(out.read_text())


def bench_train_step(args, device: torch.device, pipelines: Sequence[str], loaders: dict) -> dict:
    out: dict[str, Any] = {
        "model": f"{args.arch} + {args.projector} projector", "image_size": args.train_image_size,
        "batch_size": args.train_batch_size, "amp": args.amp, "steps": args.train_steps,
        "timed": "Trainer.train_step (forward, loss, backward, LARS step) after one warm-up step; "
                 "images/s = batch / step time; each pipeline in a fresh process",
    }
    trainer = make_trainer(args, "reference", device)  # its pipeline is never iterated here
    dtype = trainer.amp_dtype or torch.float32
    shape = (args.train_batch_size, 3, args.train_image_size, args.train_image_size)
    g = torch.Generator().manual_seed(args.seed)
    y1, y2 = (torch.randn(shape, generator=g).to(device, dtype=dtype, memory_format=torch.channels_last)
              for _ in range(2))
    totals, _, images = train_steps(trainer, iter(lambda: (y1, y2), None), args.train_steps, args.train_warmup)
    out["synthetic_images_per_s"] = rate_stats(images, totals)
    del trainer
    gc.collect()
    for name in pipelines:
        if "unavailable" in loaders.get(name, {}):
            out[name] = {"unavailable": loaders[name]["unavailable"]}
        elif name not in args.train_pipelines:
            out[name] = {"skipped": "not in --train-pipelines" + (" (--quick feeds none by default)" if args.quick else "")}
        else:
            out[name] = train_in_child(args, name)
    return out


# -- targets, table, plot ------------------------------------------------------------------------
def _median(entry: Any, key: str) -> float | None:
    value = entry.get(key) if isinstance(entry, dict) else None
    return value["median"] if isinstance(value, dict) and "median" in value else None


def evaluate_targets(result: dict) -> list[dict]:
    loaders, aug, opt = result["loaders"], result["augment"], result["optimizer"]
    targets = []
    ffcv = loaders.get("ffcv", {})
    value = ffcv.get("vs_decode_floor")
    note = ""
    if ffcv.get("host_cpu_includes_device_work"):
        note = "device is the CPU: includes the device-side augmentation"
    targets.append({"target": f"FFCV host cost <= {TARGETS['ffcv_vs_floor']}x its decode floor", "value": value,
                    "met": None if value is None else value <= TARGETS["ffcv_vs_floor"],
                    "note": note or ("" if value is not None else ffcv.get("unavailable", "not measured"))})
    ref = loaders.get("reference", {}).get("vs_decode_floor")
    targets.append({"target": "reference host cost vs decode floor (baseline, ~12-15x expected)", "value": ref,
                    "met": None, "note": "baseline, no target"})
    sp = aug.get("speedup")
    targets.append({"target": f"augmentation >= {TARGETS['augment_speedup']}x kornia", "value": sp,
                    "met": None if sp is None else sp >= TARGETS["augment_speedup"],
                    "note": "" if sp is not None else aug.get("ours", {}).get("unavailable", "not measured")})
    probe = opt.get("ops_growth_probe", {})
    flat = bool(probe) and len(set(probe.get("foreach", []))) == 1
    fused_flat = opt.get("fused_ops_per_step", 0) < opt.get("tensors", 0)
    ls = opt.get("speedup")
    targets.append({"target": f"LARS (compiled) >= {TARGETS['lars_speedup']}x the per-parameter loop, "
                              "op count not growing with #tensors", "value": ls,
                    "met": None if ls is None else (ls >= TARGETS["lars_speedup"] and flat and fused_flat),
                    "note": (f"foreach ops at {probe.get('tensors')} tensors: {probe.get('foreach')} "
                             f"(loop: {probe.get('reference')}); fused: {opt.get('fused_ops_per_step')} ops "
                             f"for {opt.get('tensors')} tensors")})
    return targets


def _fmt(figure: Any, scale: float = 1.0, digits: int = 1) -> str:
    if isinstance(figure, dict) and "median" in figure:
        m, lo, hi = (figure[k] * scale for k in ("median", "min", "max"))
        return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"
    if isinstance(figure, (int, float)):
        return f"{figure * scale:.{digits}f}"
    return "-"


def format_table(result: dict) -> str:
    env, floor, loaders = result["environment"], result["decode_floor"], result["loaders"]
    lines = [f"bt_fast benchmark  device {env['device']} ({env['device_name']}), {env['cpu_count']} CPUs, "
             f"torch {env['torch']}, batch {env['batch_size']}, {env['image_size']} px, {env['reps']} reps "
             "(median [min-max])", ""]
    lines.append(f"Decode floor: {floor['decoder']}; originals "
                 f"{_fmt(floor['cpu_s_per_image'], 1000, 2)} ms CPU/image over {floor['images']} images")
    lines.append("")
    head = (f"{'loader':<10} {'images/s':>22} {'host CPU ms/image':>22} {'decode floor ms':>20} {'host/floor':>10}"
            f" {'CPU ms/image incl. device aug':>30}")
    lines += [head, "-" * len(head)]
    for name, entry in loaders.items():
        if "unavailable" in entry:
            lines.append(f"{name:<10} unavailable: {entry['unavailable']}")
            continue
        own = floor.get(name, {})
        star = " *" if entry.get("host_cpu_includes_device_work") else ""
        lines.append(f"{name:<10} {_fmt(entry['images_per_s']):>22} {_fmt(entry['host_cpu_s_per_image'], 1000, 2):>22}"
                     f" {_fmt(own.get('cpu_s_per_image'), 1000, 2):>20} {_fmt(entry.get('vs_decode_floor'), 1, 1) + 'x':>10}"
                     f" {_fmt(entry.get('cpu_s_per_image_incl_device_work'), 1000, 2):>30}{star}")
    lines.append("  host CPU = this process + its worker processes, per image delivered"
                 + ("; on this CPU device, a pipeline with a separate host stage (crops()) is measured without its "
                    "device augmentation (last column: with it)" if env["device"] == "cpu" else ""))
    if any(e.get("host_cpu_includes_device_work") for e in loaders.values()):
        lines.append("  * device is the CPU: the device-side augmentation runs on the host and is included")
    aug = result["augment"]
    lines += ["", f"Augmentation ({aug['batch_size']} x {aug['image_size']} px, both views): ours "
                  f"{_fmt(aug.get('ours_images_per_s'))} images/s"
                  + (f" ({aug['ours']['unavailable']})" if "ours" in aug else "")
                  + f", kornia {_fmt(aug['kornia_images_per_s'])} images/s, speedup {_fmt(aug.get('speedup'), 1, 2)}x"]
    opt = result["optimizer"]
    lines += ["", f"LARS step ({opt['model']}: {opt['parameters'] / 1e6:.1f} M parameters, {opt['tensors']} tensors)"]
    for label, key, ops in (("per-parameter loop", "reference_ms", "reference_ops_per_step"),
                            ("foreach", "foreach_ms", "foreach_ops_per_step"),
                            ("compiled", "fused_ms", "fused_ops_per_step")):
        lines.append(f"  {label:<20} {_fmt(opt[key]):>26} ms  {opt[ops]:>6} ops/step")
    lines.append(f"  speedup vs loop: compiled {_fmt(opt['speedup'], 1, 2)}x, foreach {_fmt(opt['foreach_speedup'], 1, 2)}x;"
                 f" compile {opt['fused_compile_s']:.1f} s (excluded)")
    lines.append(f"  ops counted: {opt['ops_counted']}")
    ts = result["train_step"]
    lines += ["", f"Training step ({ts['model']}, {ts['image_size']} px, batch {ts['batch_size']}, amp {ts['amp']}):"
                  f" synthetic {_fmt(ts['synthetic_images_per_s'])} images/s"]
    for name in loaders:
        entry = ts.get(name)
        if entry is None:
            continue
        if "unavailable" in entry or "skipped" in entry:
            lines.append(f"  {name:<10} " + (f"unavailable: {entry['unavailable']}" if "unavailable" in entry
                                             else f"skipped: {entry['skipped']}"))
        else:
            lines.append(f"  {name:<10} {_fmt(entry['images_per_s']):>24} images/s, data stall "
                         f"{_fmt(entry['data_stall_fraction'], 100, 0)} %")
    lines += ["", "Targets:"]
    for t in result["targets"]:
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"  [{verdict:^7}] {t['target']}: {value}" + (f"  ({t['note']})" if t.get("note") else ""))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    loaders = {k: v for k, v in result["loaders"].items() if "unavailable" not in v}
    names = list(loaders)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))

    def bars(ax, figures: list[dict], scale: float, offset: float = 0.0, width: float = 0.8, **kw):
        med = [f["median"] * scale for f in figures]
        err = [[(f["median"] - f["min"]) * scale for f in figures], [(f["max"] - f["median"]) * scale for f in figures]]
        ax.bar([i + offset for i in range(len(figures))], med, width, yerr=err, capsize=4, **kw)

    if names:
        bars(ax1, [loaders[n]["images_per_s"] for n in names], 1.0, color="tab:blue")
        bars(ax2, [loaders[n]["host_cpu_s_per_image"] for n in names], 1000, -0.2, 0.4, label="host CPU", color="tab:red")
        floors = [result["decode_floor"].get(n, {}).get("cpu_s_per_image") or {"median": 0, "min": 0, "max": 0}
                  for n in names]
        bars(ax2, floors, 1000, 0.2, 0.4, label="decode floor", color="tab:gray")
        ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(names)), names)
    env = result["environment"]
    ax1.set_title(f"loader throughput (batch {env['batch_size']}, {env['image_size']} px)")
    ax1.set_ylabel("images/s (two views on the device)")
    ax2.set_title("host CPU cost per image")
    ax2.set_ylabel("CPU ms / image")
    unavailable = [k for k, v in result["loaders"].items() if "unavailable" in v]
    if unavailable:
        fig.text(0.01, 0.01, "unavailable: " + ", ".join(unavailable), fontsize=8)
    fig.suptitle(f"bt_fast bench on {env['device']} ({env['cpu_count']} CPUs); median, bars min-max")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- driver --------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    pipelines = args.pipelines
    result: dict[str, Any] = {"environment": environment(args, device)}
    t_start = time.perf_counter()

    def stage(label: str):
        print(f"[bench {time.perf_counter() - t_start:6.1f}s] {label}", file=sys.stderr, flush=True)

    loaders: dict[str, dict] = {}
    sources: dict[str, dict | None] = {}
    for name in pipelines:
        stage(f"loader {name}")
        loaders[name], sources[name] = bench_loader(args, name, device)
    stage("decode floor")
    result["decode_floor"] = bench_decode_floor(args, sources, loaders)
    for name, entry in loaders.items():
        if "unavailable" not in entry:
            entry["vs_decode_floor"] = ratio(entry["host_cpu_s_per_image"],
                                             result["decode_floor"].get(name, {}).get("cpu_s_per_image"))
    result["loaders"] = loaders
    stage("augmentation")
    result["augment"] = bench_augment(args, device)
    stage(f"optimizer ({args.optimizer_params})")
    result["optimizer"] = bench_optimizer(args, device)
    stage("training step")
    result["train_step"] = bench_train_step(args, device, pipelines, loaders)
    result["targets"] = evaluate_targets(result)
    result["environment"]["bench_seconds"] = time.perf_counter() - t_start
    stage("done")
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="ImageFolder (default: the demo dataset, built on first use)")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated: reference,ffcv,dali")
    parser.add_argument("--batch-size", type=int, default=None, help="per-device batch (default 64; --quick 32)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers (default: CPUs)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="crop size for loaders and augmentation (default 224; --quick 128)")
    parser.add_argument("--train-pipelines", default=None,
                        help="pipelines that feed the training step, each in a fresh process (default: --pipelines; "
                             "--quick: none; 'none': synthetic batches only)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and batches, smaller batch and crops")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per figure (default 3; --quick 2)")
    parser.add_argument("--loader-batches", type=int, default=None,
                        help="batches per loader repetition (default 4)")
    parser.add_argument("--decode-images", type=int, default=512, help="JPEGs decoded per decode-floor repetition")
    parser.add_argument("--optimizer-params", choices=sorted(OPTIMIZER_SETS), default="paper",
                        help="parameter set for the LARS figures: paper = ResNet-50 + 8192-8192-8192 (default), "
                             "demo = ResNet-18 + 512-512-512, small = 8 synthetic tensors (tests)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--arch", choices=("resnet18", "resnet50"), default=None,
                        help="training-step model (default: resnet18 on CPU, resnet50 on CUDA)")
    parser.add_argument("--projector", default=None, help="training-step projector (default 512-512-512 on CPU, "
                                                          "8192-8192-8192 on CUDA)")
    parser.add_argument("--train-image-size", type=int, default=None,
                        help="training-step crop size (default 64 on CPU, --image-size on CUDA)")
    parser.add_argument("--train-batch-size", type=int, default=None,
                        help="training-step batch (default 32 on CPU, --quick 16; --batch-size on CUDA)")
    parser.add_argument("--amp", choices=("auto", "bfloat16", "float16", "none"), default=None,
                        help="training-step autocast (default none on CPU, auto on CUDA)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps after one warm-up step (default 3)")
    parser.add_argument("--config", default=None, help="YAML config whose pipeline options (ffcv.*, dali.*, augment.*) apply")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the pipelines, e.g. --set ffcv.beton=/data/train.beton")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-timeout", type=float, default=600, help="seconds per training-step process")
    parser.add_argument("--_train-child", dest="train_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_child-out", dest="child_out", type=Path, default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # for the training-step processes (they get the resolved --data appended)

    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    quick = args.quick
    args.batch_size = args.batch_size or (32 if quick else 64)
    args.image_size = args.image_size or (128 if quick else 224)
    args.reps = args.reps or (2 if quick else 3)
    args.loader_batches = args.loader_batches or 4
    args.loader_warmup = 2
    args.arch = args.arch or ("resnet18" if cpu else "resnet50")
    args.projector = args.projector or ("512-512-512" if cpu else "8192-8192-8192")
    args.train_image_size = args.train_image_size or (64 if cpu else args.image_size)
    args.amp = args.amp or ("none" if cpu else "auto")
    args.train_batch_size = args.train_batch_size or ((16 if quick else 32) if cpu else args.batch_size)
    args.train_steps = args.train_steps or 3
    args.train_warmup = 1
    args.pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    unknown = [p for p in args.pipelines if p not in PIPELINES]
    if unknown or not args.pipelines:
        parser.error(f"--pipelines takes names from {','.join(PIPELINES)}, got {unknown or 'nothing'}")
    train = args.train_pipelines if args.train_pipelines is not None else ("none" if quick else None)
    args.train_pipelines = (args.pipelines if train is None else
                            [] if train.strip() == "none" else [p.strip() for p in train.split(",") if p.strip()])
    if any(p not in args.pipelines for p in args.train_pipelines):
        parser.error(f"--train-pipelines must name pipelines of --pipelines ({','.join(args.pipelines)}) or 'none'")
    for flag in ("batch_size", "image_size", "reps", "loader_batches", "train_steps", "decode_images",
                 "train_batch_size", "train_image_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        parser.error("--workers must be at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.data is None:
        from tools.make_demo_data import build as build_demo
        args.data = str(build_demo(DEMO_ROOT, 64, 16) / "train")
    if args.train_child:  # internal: one training-step measurement in a fresh process
        device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        args.child_out.write_text(json.dumps(train_with_pipeline(args, args.train_child, device)))
        return 0
    try:
        result = run(args)
    except (ConfigError, DataError, BenchError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.plot)
    print(f"\njson: {args.json}\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

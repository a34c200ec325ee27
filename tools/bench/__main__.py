"""Benchmark the data pipelines, the device augmentation, the LARS optimizer and the training step.

Every figure comes from this run: the median, min and max of timed repetitions after an untimed
warm-up (`tools.bench.measure`). The JSON written to --json has one key per section, each
described in the module that measures it:

  environment   device, CPU count, library versions, the run's settings, CPU meter (measure.py)
  loaders       each pipeline delivering two views to the device, host CPU per image (loaders.py)
  decode_floor  CPU per image to only decode the JPEGs each pipeline reads (decode_floor.py)
  device_crop   the batched device crop: op count per batch at two batch sizes, FLOPs, images/s (device_crop.py)
  augment       our device augmentation against kornia (augment.py)
  optimizer     LARS: official per-parameter loop, foreach, compiled (optimizer.py)
  train_step    Trainer.train_step on synthetic batches and fed by each pipeline (train_step.py)
  targets       each target with the measured value and met / not met (report.py)

--conversion runs one section instead, conversion (conversion.py): `tools.convert` to each format in a
fresh process with --workers, against the decode floor measured in the same run, and the conversion
target (images/s >= 0.7 x workers / floor); JSON by default in runs/bench/conversion.json. Without --data
it converts an ImageNet-like set built once under data/imagenet_like_<--conversion-images> (default 20000).

--end-to-end runs one section instead, end_to_end (end_to_end.py): the training step fed by each
pipeline (reference, ffcv in its default mode, ffcv decode=device, dali) against the same step fed
synthetic device tensors; JSON by default in runs/bench/end_to_end.json. Without --data it reads an
ImageNet-like set (`pipelines.imagenet_like`) built once, on every CPU, under data/imagenet_like_<--e2e-images>.
On the CPU: resnet18, 64-64-64 projector, 32 px, batch 16, no autocast, 4 timed steps after 2
warm-up, 256 images; on CUDA: resnet50, 8192-8192-8192, 224 px, batch 256, float16 autocast,
25 timed steps after 5 warm-up, 8192 images (no epoch ends inside the steps).

Without --data the demo dataset is built once under data/demo and its train/ split is used.
On the CPU the training step uses a small model by default (resnet18, 512-512-512 projector,
64 px crops, batch 32, no autocast); on CUDA resnet50, 8192-8192-8192, --image-size and
--batch-size. --quick: batch 32 at 128 px, 2 repetitions, training step on synthetic batches
only (unless --train-pipelines names pipelines); the optimizer keeps the paper's parameter set.

An option that only a section not run reads (--e2e-images without --end-to-end, --batch-size with it,
--arch with --conversion, ...) is refused, as --e2e-images and --conversion-images are with --data.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bt_fast.errors import (STARTING, CliParser, DataError, cli_errors, exit_on_interrupt, expand_home, option_flag,
                            output_file, png_file, quiet_no_cuda_runtime_warning)
from bt_fast.host import usable_cores

with exit_on_interrupt(STARTING):
    import torch

    from bt_fast.config import MAX_IMAGE_SIZE, MIN_BATCH_PER_RANK, MIN_IMAGE_SIZE, PROJECTOR_WIDTHS
    from bt_fast.distributed import resolve_device
    from bt_fast.files import write_json
    from bt_fast.model import BACKBONE_DIM
    from pipelines.image_folder import count_images
    from tools.bench.augment import bench_augment
    from tools.bench.conversion import FORMATS as CONVERSION_FORMATS
    from tools.bench.conversion import bench_conversion
    from tools.bench.decode_floor import bench_decode_floor
    from tools.bench.device_crop import bench_device_crop
    from tools.bench.end_to_end import DEFAULT_PIPELINES, bench_end_to_end, end_to_end_pipeline
    from tools.bench.loaders import LOADERS, bench_loader
    from tools.bench.measure import environment, ratio
    from tools.bench.optimizer import OPTIMIZER_SETS, bench_optimizer
    from tools.bench.report import evaluate_targets, write_report
    from tools.bench.train_step import bench_train_step, train_with_pipeline

# Config keys the benchmark sets from its own options, which the report and the JSON state: a --set of one
# would change what is measured under the stated settings.
_FFCV_MODES = "--pipelines (its ffcv entries are the modes)"
OWN_KEYS = {"data": "--data", "pipeline": "--pipelines", "workers": "--workers",
            "batch_size": "--batch-size or --train-batch-size",
            "augment.image_size": "--image-size or --train-image-size", "seed": "--seed", "arch": "--arch",
            "projector": "--projector", "amp": "--amp", "ffcv.decode": _FFCV_MODES, "ffcv.crop": _FFCV_MODES}
# The options that not every section reads, and the sections that do: "bench" is the default run (every section
# but end_to_end and conversion). The rest (--data, --workers, --json) every section reads.
SECTIONS = {"bench": "the default sections", "end_to_end": "--end-to-end", "conversion": "--conversion"}
BENCH_E2E = ("bench", "end_to_end")
READ_BY = {"batch_size": ("bench",), "image_size": ("bench",), "train_pipelines": ("bench",), "plot": ("bench",),
           "loader_batches": ("bench",), "augment_compile": ("bench",), "optimizer_params": ("bench",),
           "quick": ("bench", "conversion"), "reps": ("bench", "conversion"), "decode_images": ("bench", "conversion"),
           "e2e_images": ("end_to_end",), "conversion_images": ("conversion",),
           **dict.fromkeys(("pipelines", "threads", "device", "arch", "projector", "train_image_size",
                            "train_batch_size", "amp", "train_steps", "train_warmup", "config", "set", "seed",
                            "child_timeout"), BENCH_E2E)}
# what --end-to-end reads instead of an option of the default sections
E2E_INSTEAD = {"batch_size": "--train-batch-size", "image_size": "--train-image-size", "reps": "--train-steps"}
DEMO_ROOT = Path("data/demo")
IMAGENET_LIKE_ROOT = Path("data")  # --end-to-end's and --conversion's sets of N images: data/imagenet_like_<N>


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _parser() -> CliParser:
    parser = CliParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", default=None, type=expand_home, help="ImageFolder (default: the demo dataset, built on first use)")
    add("--pipelines", default=None,
        help=f"loader entries, comma-separated, from {','.join(LOADERS)} (default: all; the ffcv_* entries are "
             f"the pipeline's other modes; --end-to-end: {','.join(DEFAULT_PIPELINES)}, ffcv in its default mode)")
    add("--end-to-end", action="store_true", help="only the end-to-end section (see below)")
    add("--conversion", action="store_true", help="only the conversion section (see below)")
    add("--conversion-images", type=int, default=None,
        help="--conversion without --data: images of the ImageNet-like set built once under "
             "data/imagenet_like_<N> (default 20000)")
    add("--e2e-images", type=int, default=None,
        help="--end-to-end without --data: images of the ImageNet-like set built once under "
             "data/imagenet_like_<N> (default 256 on the CPU, 8192 on CUDA)")
    add("--batch-size", type=int, default=None, help="per-device batch (default 64; --quick 32)")
    add("--workers", type=int, default=usable_cores(), help="loader workers (default: the usable cores)")
    add("--image-size", type=int, default=None,
        help=f"crop size for loaders and augmentation, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default 224; --quick "
             f"128): the pipelines' smallest crop, and tools.evaluate's largest, about twice torchvision's largest "
             f"pretrained crop (600)")
    add("--train-pipelines", default=None,
        help="pipelines that feed the training step, each in a fresh process (default: the entries of --pipelines "
             "that are a pipeline's default mode; "
             "--quick: none; 'none': synthetic batches only)")
    add("--json", type=output_file, default=None,
        help="results (default runs/bench/bench.json; --end-to-end: runs/bench/end_to_end.json)")
    add("--plot", type=png_file, default=None, help="loader plot (default runs/bench/bench.png)")
    add("--quick", action="store_true", help="fewer repetitions and batches, smaller batch and crops")
    add("--reps", type=int, default=None, help="timed repetitions per figure (default 3; --quick 2)")
    add("--loader-batches", type=int, default=None,
        help="batches per loader repetition, at least --workers when reference is measured (its workers "
             "deliver batches that many at a time; default 4, or --workers if more)")
    add("--decode-images", type=int, default=None, help="JPEGs decoded per decode-floor repetition (default 512)")
    add("--augment-compile", action="store_true", help="also time TwoViewAugment(backend=\"compile\") against kornia")
    add("--threads", type=int, default=None, help="torch intra-op threads (default 0: torch's own choice)")
    add("--optimizer-params", choices=sorted(OPTIMIZER_SETS), default=None,
        help="parameter set for the LARS figures: paper = ResNet-50 + 8192-8192-8192 (default), "
             "demo = ResNet-18 + 512-512-512, small = 8 synthetic tensors (tests)")
    add("--device", choices=("auto", "cpu", "cuda"), default=None, help="default auto: cuda when visible")
    add("--arch", choices=sorted(BACKBONE_DIM), default=None,
        help="training-step model (default: resnet18 on CPU, resnet50 on CUDA)")
    add("--projector", default=None, help="training-step projector (default 512-512-512 on CPU, 8192-8192-8192 on CUDA)")
    add("--train-image-size", type=int, default=None,
        help=f"training-step crop size, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default 64 on CPU, --image-size on CUDA)")
    add("--train-batch-size", type=int, default=None,
        help="training-step batch (default 32 on CPU, --quick 16; --batch-size on CUDA)")
    add("--amp", choices=("auto", "bfloat16", "float16", "none"), default=None,
        help="training-step autocast (default none on CPU, auto on CUDA)")
    add("--train-steps", type=int, default=None,
        help="timed training steps (default 3 after one warm-up step; --end-to-end: see below)")
    add("--train-warmup", type=int, default=None,
        help="untimed training steps before the timed ones (default 1; --end-to-end: see below)")
    add("--config", default=None, type=expand_home,
        help="YAML config whose pipeline options (ffcv.*, dali.*, augment.*) apply")
    add("--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override for the pipelines, e.g. --set ffcv.beton=/data/train.beton (not a key an option "
             "here sets, such as augment.image_size: the report states those)")
    add("--seed", type=int, default=None, help="seed of the pipelines and the synthetic inputs (default 0)")
    add("--child-timeout", type=float, default=None, help="seconds per training-step process (default 600)")
    add("--_train-child", dest="train_child", default=None, help=argparse.SUPPRESS)
    add("--_child-out", dest="child_out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def _default(value: int | None, default: int) -> int:
    """An option's value, or `default` where it was not given (0 given stays 0, to be refused)."""
    return default if value is None else value


def _checked_default(parser: argparse.ArgumentParser, flag: str, path: str) -> Path:
    try:
        return output_file(path)
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument {flag}: {err}")


def min_loader_batches(args: argparse.Namespace) -> int:
    """The fewest batches a loader window can time: --workers when the reference loader is measured (its
    DataLoader's workers each build a whole batch, so its batches arrive up to that many at once; a window
    of fewer may hold only batches built before it began, an unbounded rate), else 1 (FFCV and DALI build
    one batch at a time with all their threads)."""
    return max(1, args.workers) if "reference" in args.pipelines else 1


def _refuse_unread(parser: CliParser, args: argparse.Namespace) -> None:
    """The error line for an option that only sections this run leaves out read (`READ_BY`), and for a size of the
    ImageNet-like set that --data replaces."""
    section = "end_to_end" if args.end_to_end else "conversion" if args.conversion else "bench"
    parser.refuse_unread(args, READ_BY, section, lambda sections: " or ".join(SECTIONS[s] for s in sections),
                         E2E_INSTEAD if section == "end_to_end" else None)
    for name in ("e2e_images", "conversion_images"):  # a training-step process gets the built set's --data
        if getattr(args, name) is not None and args.data is not None and not args.train_child:
            parser.error(f"{option_flag(name)} applies without --data only: it sizes the ImageNet-like set "
                         f"built when no --data is given; drop one of them")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed options with every default resolved; `args.device` is a torch.device."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # for the training-step processes (they get the resolved --data appended)
    if args.end_to_end and args.conversion:
        parser.error("--end-to-end and --conversion each run one section; give one of them")
    _refuse_unread(parser, args)
    args.device = resolve_device(args.device or "auto", setting="--device")
    cpu, quick, e2e = args.device.type == "cpu", args.quick, args.end_to_end
    if args.json is None:
        default = "end_to_end" if e2e else "conversion" if args.conversion else "bench"
        args.json = _checked_default(parser, "--json", f"runs/bench/{default}.json")
    if args.plot is None and not (e2e or args.conversion):
        args.plot = _checked_default(parser, "--plot", "runs/bench/bench.png")
    args.conversion_images = _default(args.conversion_images, 20000)
    args.decode_images = _default(args.decode_images, 512)
    args.threads = _default(args.threads, 0)
    args.optimizer_params = args.optimizer_params or "paper"
    args.seed = _default(args.seed, 0)
    args.child_timeout = _default(args.child_timeout, 600)
    args.batch_size = _default(args.batch_size, 32 if quick else 64)
    args.image_size = _default(args.image_size, 128 if quick else 224)
    args.reps = _default(args.reps, 2 if quick else 3)
    args.loader_warmup = 2
    args.arch = args.arch or ("resnet18" if cpu else "resnet50")
    args.projector = args.projector or ("64-64-64" if cpu and e2e else "512-512-512" if cpu else "8192-8192-8192")
    if not PROJECTOR_WIDTHS.fullmatch(args.projector):
        parser.error(f"--projector takes layer widths joined by '-', e.g. 8192-8192-8192; got {args.projector!r}")
    args.train_image_size = _default(args.train_image_size, (32 if e2e else 64) if cpu else args.image_size)
    args.amp = args.amp or ("none" if cpu else "auto")
    if e2e:
        args.train_batch_size = _default(args.train_batch_size, 16 if cpu else 256)
        steps, warmup = (4, 2) if cpu else (25, 5)
        args.e2e_images = _default(args.e2e_images, 256 if cpu else 8192)
    else:
        args.train_batch_size = _default(args.train_batch_size, (16 if quick else 32) if cpu else args.batch_size)
        steps, warmup = 3, 1
    args.train_steps = _default(args.train_steps, steps)
    args.train_warmup = _default(args.train_warmup, warmup)
    args.pipelines = _names(",".join(DEFAULT_PIPELINES if e2e else LOADERS) if args.pipelines is None
                            else args.pipelines)
    unknown = [p for p in args.pipelines if p not in LOADERS]
    if unknown or not args.pipelines:
        parser.error(f"--pipelines takes names from {','.join(LOADERS)}, got {unknown or 'nothing'}")
    train = args.train_pipelines if args.train_pipelines is not None else ("none" if quick or e2e else None)
    default_modes = [name for name in args.pipelines if LOADERS[name][0] == name]  # not the ffcv_* variants
    args.train_pipelines = default_modes if train is None else [] if train.strip() == "none" else _names(train)
    if train is not None and train.strip() != "none" and not args.train_pipelines:
        parser.error("--train-pipelines got nothing; name pipelines of --pipelines, or 'none' for synthetic batches "
                     "only")
    if any(p not in args.pipelines for p in args.train_pipelines):
        parser.error(f"--train-pipelines must name pipelines of --pipelines ({','.join(args.pipelines)}) or 'none'")
    args.loader_batches = _default(args.loader_batches, max(4, min_loader_batches(args)))
    for flag in ("image_size", "train_image_size"):  # the pipelines' augment.image_size
        parser.check_range(option_flag(flag), getattr(args, flag), MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, "pixels")
    for flag in ("batch_size", "reps", "loader_batches", "train_steps", "decode_images", "train_batch_size",
                 *(("e2e_images",) if e2e else ()), *(("conversion_images",) if args.conversion else ())):
        if getattr(args, flag) < 1:
            parser.error(f"{option_flag(flag)} must be at least 1, got {getattr(args, flag)}")
    for flag in ("workers", "threads", "train_warmup"):
        if getattr(args, flag) < 0:
            parser.error(f"{option_flag(flag)} must be at least 0, got {getattr(args, flag)}")
    if not e2e and args.loader_batches < min_loader_batches(args):
        parser.error(f"--loader-batches must be at least --workers ({args.workers}) when the reference loader is "
                     f"measured: each worker builds a whole batch, so batches arrive {args.workers} at a time and a "
                     f"shorter window can time only batches built before it began; got {args.loader_batches}")
    own = next((key for key in (pair.split("=", 1)[0].strip() for pair in args.set) if key in OWN_KEYS), None)
    if own is not None:
        parser.error(f"--set {own}=... would change a setting the report states; use {OWN_KEYS[own]}")
    if not args.child_timeout > 0:
        parser.error(f"--child-timeout must be a positive number of seconds, got {args.child_timeout}")
    if e2e and args.data is None and args.e2e_images < args.train_batch_size:
        parser.error(f"--e2e-images ({args.e2e_images}) must be at least one batch of --train-batch-size "
                     f"({args.train_batch_size})")
    return args


def batches_read(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(option, batch size) of each section that reads batches of --data's images."""
    if args.conversion:
        return []
    if args.end_to_end:
        return [("--train-batch-size", args.train_batch_size)]
    return [("--batch-size", args.batch_size)] + ([("--train-batch-size", args.train_batch_size)]
                                                  if args.train_pipelines else [])


def resolve_data(args: argparse.Namespace) -> None:
    """Without --data: the ImageNet-like set (--end-to-end, --conversion) or the demo set's train/ split, built on
    first use. Before any section (each would report a missing folder, or one too small, itself): refuses a
    --data that is no ImageFolder, and a folder smaller than one batch of a section that reads it."""
    if args.data is None and (args.end_to_end or args.conversion):
        from pipelines.imagenet_like import write_imagenet_like
        count = args.e2e_images if args.end_to_end else args.conversion_images
        args.data = str(write_imagenet_like(IMAGENET_LIKE_ROOT / f"imagenet_like_{count}", count))
        return
    if args.data is None:
        from pipelines.demo_data import build as build_demo
        args.data = str(build_demo(DEMO_ROOT, 64, 16) / "train")
        named, more = f"the demo set {args.data}", "--data, a folder of more images"
    elif args.train_child:
        return
    else:
        from pipelines.image_folder import is_split_root
        named, more = f"--data {args.data}", "a folder of more images"
        if Path(args.data).is_file():  # image_folder_root's line offers a .beton, which no section reads
            raise DataError(f"{named} is a file; the benchmark reads an ImageFolder and converts it to each "
                            f"pipeline's format itself: give the directory of class folders")
        if is_split_root(args.data):  # the reference loader would read both splits as two classes
            raise DataError(f"{named} holds train/ and val/: the loaders would read both splits as two "
                            f"classes; give --data {Path(args.data) / 'train'}")
    batches = batches_read(args)
    images = count_images(args.data, max((size for _, size in batches), default=1))  # not all of ImageNet
    for flag, batch_size in batches:
        if images < batch_size:
            smaller = f"{flag} {images} or less, or " if images >= MIN_BATCH_PER_RANK else ""
            raise DataError(f"{named} has {images} images, fewer than one batch of {flag} "
                            f"{batch_size}; pass {smaller}{more}")


def run(args: argparse.Namespace) -> dict:
    """Every section, measured in this order: loaders, decode floor, augmentation, optimizer, training step
    (with --end-to-end or --conversion: that section only)."""
    result: dict[str, Any] = {"environment": environment(args)}
    t_start = time.perf_counter()

    def stage(label: str) -> None:
        print(f"[bench {time.perf_counter() - t_start:6.1f}s] {label}", file=sys.stderr, flush=True)

    if args.conversion:
        stage(f"conversion: {', '.join(CONVERSION_FORMATS)}, {args.reps} reps")
        result["conversion"] = bench_conversion(args)
        result["environment"]["bench_seconds"] = time.perf_counter() - t_start
        return result
    if args.end_to_end:
        stage("end to end: " + ", ".join(args.pipelines))
        result["end_to_end"] = bench_end_to_end(args, args.pipelines)
        result["environment"]["bench_seconds"] = time.perf_counter() - t_start
        return result

    loaders: dict[str, dict] = {}
    sources: dict[str, dict | None] = {}
    for name in args.pipelines:
        stage(f"loader {name}")
        loaders[name], sources[name] = bench_loader(args, name)
    stage("decode floor")
    result["decode_floor"] = bench_decode_floor(args, sources, loaders)
    for name, entry in loaders.items():
        if "unavailable" not in entry:
            entry["vs_decode_floor"] = ratio(entry["host_cpu_s_per_image"],
                                             result["decode_floor"].get(name, {}).get("cpu_s_per_image"))
    result["loaders"] = loaders
    stage("device crop")
    result["device_crop"] = bench_device_crop(args, sources)
    stage("augmentation")
    result["augment"] = bench_augment(args)
    stage(f"optimizer ({args.optimizer_params})")
    result["optimizer"] = bench_optimizer(args)
    stage("training step")
    result["train_step"] = bench_train_step(args, args.pipelines, loaders)
    result["targets"] = evaluate_targets(result)
    result["environment"]["bench_seconds"] = time.perf_counter() - t_start
    stage("done")
    return result


INTERRUPTED = ("no result was written (the JSON and the plot come at the end); the data sets it built and the "
               "pipelines' first-use conversions stay, and the next run reuses or completes them")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_no_cuda_runtime_warning()
    with cli_errors(), exit_on_interrupt(outcome=INTERRUPTED):
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        resolve_data(args)
        if args.train_child:  # internal: one training-step measurement in a fresh process
            measure = end_to_end_pipeline if args.end_to_end else train_with_pipeline
            write_json(args.child_out, measure(args, args.train_child))
            return 0
        write_report(run(args), args.json, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

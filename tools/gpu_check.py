"""Check every CUDA code path of bt_fast against a float32 or stated reference, then measure its speed.

    python -m tools.gpu_check [--device cuda|cpu] [--json PATH]

Each check prints pass or fail with its measured error and tolerance; the exit code is 1 when a
check fails. Without CUDA and without `--device`, it says so in one line and exits 0. `--device cpu`
runs every check's code on the CPU with a small model (ResNet-18, a 64-64 projector, 32 px).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from bt_fast.config import AugmentSpec, load_config
from bt_fast.distributed import DistContext, resolve_device, sync_batchnorm
from bt_fast.errors import cli_errors, one_line
from bt_fast.files import write_json
from bt_fast.loss import barlow_twins_loss
from bt_fast.model import build_model
from bt_fast.optim import LARS, param_groups
from bt_fast.train import Trainer
from pipelines import Placement
from pipelines.augment import TwoViewAugment, apply, sample_params

# Largest error each check accepts: augmentation as the mean |diff| in normalised pixel units (one 8-bit
# level is 0.017; rounding near the solarize threshold and at grey pixels' hue makes the max a poor
# measure), losses, gradients and LARS updates as max |diff| over the reference's largest magnitude.
TOLERANCE = {"augment float16": 0.005, "augment bfloat16": 0.04, "amp float16": 0.02, "amp bfloat16": 0.05,
             "lars": 1e-5, "resume batch": 0.0, "resume step": 1e-6, "ddp": 1e-5,
             "ffcv crops": 1 / 255, "dali ids": 0.0, "dali view means": 0.05,
             "device crop float16": 0.5 / 255, "device crop bfloat16": 3.0 / 255,
             "device decode": 3.0 / 255}  # nvJPEG vs libjpeg-turbo (IDCT, chroma upsampling): 1.9 levels on an H200


@dataclass(frozen=True)
class Sizes:
    arch: str
    projector: str
    image_size: int
    batch: int
    steps: int


SIZES = {"cuda": Sizes("resnet50", "8192-8192-8192", 224, 64, 3),  # the paper's network at 64 images per GPU
         "cpu": Sizes("resnet18", "64-64", 32, 8, 3)}


@dataclass
class Result:
    check: str
    status: str                   # pass | fail | skipped: <why>
    error: float | None = None
    tolerance: float | None = None


def compare(check: str, got: torch.Tensor, want: torch.Tensor, relative: bool = True, mean: bool = False) -> Result:
    """Max (or `mean`) |got - want|, over max |want| when `relative`, against `TOLERANCE[check]`."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    difference = (got - want).abs()
    error = (difference.mean() if mean else difference.max()).item()
    if relative:
        error /= max(want.abs().max().item(), 1e-30)
    tolerance = TOLERANCE[check]
    return Result(check, "pass" if error <= tolerance else "fail", error, tolerance)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # GPU only
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call of `fn`, after one untimed warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


# -- checks: each takes (device, sizes, workdir, measurements) and returns its results ------------------

def check_augment(device, sizes, workdir, measured) -> list[Result]:
    """Both views in float16 and bfloat16 compute on the device against float32 compute on the CPU."""
    spec = AugmentSpec(image_size=sizes.image_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (sizes.batch, 3, sizes.image_size, sizes.image_size), dtype=torch.uint8,
                           generator=generator)
    results = []
    for compute in (torch.float16, torch.bfloat16):
        got, want = [], []
        for view in (0, 1):
            params = sample_params(sizes.batch, spec, view, generator)
            want.append(apply(images, params, spec, compute_dtype=torch.float32))
            got.append(apply(images.to(device), params.to(device), spec, compute_dtype=compute))
        results.append(compare(f"augment {str(compute)[6:]}", torch.stack(got), torch.stack(want),
                               relative=False, mean=True))
    augment = TwoViewAugment(spec, torch.float16 if device.type == "cuda" else torch.float32)
    crops = images.to(device)
    measured["augment_images_per_s"] = sizes.batch / timed(lambda: augment(crops, crops), device, 5)
    return results


def check_device_crop(device, sizes, workdir, measured) -> list[Result]:
    """Both views' crops of a padded batch in float16 and bfloat16 compute on the device against float32
    on the CPU (max |diff| in [0, 1] units), and the operator's speed against a per-box torchvision loop."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resized_crop

    from pipelines.device_crop import resized_crops
    generator = torch.Generator().manual_seed(3)
    batch, size = sizes.batch, sizes.image_size
    height, width = (375, 500) if device.type == "cuda" else (48, 64)
    coarse = torch.randint(0, 256, (batch, 3, 12, 16), generator=generator).float()
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 255)
    images = images.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # smooth photos-like content
    heights = torch.randint(height // 4, height + 1, (batch, 2), generator=generator)
    widths = torch.randint(width // 4, width + 1, (batch, 2), generator=generator)
    tops = (torch.rand((batch, 2), generator=generator) * (height - heights + 1)).long()
    lefts = (torch.rand((batch, 2), generator=generator) * (width - widths + 1)).long()
    boxes = torch.stack([tops, lefts, heights, widths], dim=-1)
    want = resized_crops(images, boxes, size)
    on_device, device_boxes = images.to(device), boxes.to(device)
    results = [compare(f"device crop {name}", resized_crops(on_device, device_boxes, size, dtype=dtype).float(), want,
                       relative=False)
               for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16))]
    half = torch.float16 if device.type == "cuda" else torch.float32  # GPU only: half compute
    chw = on_device.permute(0, 3, 1, 2).float()

    def per_box_loop():
        return [resized_crop(chw[i], *boxes[i, v].tolist(), [size, size], InterpolationMode.BICUBIC, antialias=True)
                for i in range(batch) for v in range(2)]
    ours = timed(lambda: resized_crops(on_device, device_boxes, size, dtype=half), device, 5)
    loop = timed(per_box_loop, device, 2)
    measured["device_crop_images_per_s"] = batch / ours
    measured["torchvision_loop_crop_images_per_s"] = batch / loop
    return results


def check_device_decode(device, sizes, workdir, measured) -> list[Result]:
    """`ffcv.decode=device`'s batched decode (nvJPEG on CUDA) of JPEGs of mixed sizes into one padded batch,
    against libjpeg-turbo on the CPU: mean |diff| per image region in [0, 1] units (the decoders' IDCT and
    chroma upsampling differ slightly), and its images/s."""
    import io

    from pipelines.device_decode import decode_padded
    generator = torch.Generator().manual_seed(4)
    shapes = [(375, 500), (500, 375), (333, 500), (480, 360)] * (sizes.batch // 4)
    encoded = []
    for height, width in shapes:
        coarse = torch.randint(0, 256, (1, 3, 12, 16), generator=generator).float()
        pixels = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels[0].permute(1, 2, 0).round().to(torch.uint8).numpy()).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    jpegs = torch.zeros((len(encoded), max(map(len, encoded))), dtype=torch.uint8)
    for i, data in enumerate(encoded):
        jpegs[i, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    records = [(h, w, len(data)) for (h, w), data in zip(shapes, encoded)]
    height, width = max(h for h, _ in shapes), max(w for _, w in shapes)
    want = decode_padded(jpegs, records, height, width, torch.device("cpu"), "gpu_check")
    got = decode_padded(jpegs, records, height, width, device, "gpu_check").cpu()
    regions = [(got[i, :h, :w].float() - want[i, :h, :w].float()).abs().mean() / 255
               for i, (h, w, _) in enumerate(records)]
    seconds = timed(lambda: decode_padded(jpegs, records, height, width, device, "gpu_check"), device, 3)
    measured["device_decode_images_per_s"] = len(encoded) / seconds
    return [compare("device decode", torch.stack(regions), torch.zeros(len(regions)), relative=False)]


def image_folder(root: Path, count: int) -> Path:
    """`count` small JPEGs: the trainer builds its pipeline from them; the checks feed synthetic batches."""
    (root / "class0").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (16, 16), (i % 256, 64, 128)).save(root / "class0" / f"{i}.jpg")
    return root


def make_trainer(device, sizes, workdir, *overrides) -> Trainer:
    config = load_config(None, [f"data={image_folder(workdir / 'images', sizes.batch)}", "pipeline=reference",
                                "workers=0", f"arch={sizes.arch}", f"projector={sizes.projector}",
                                f"batch_size={sizes.batch}", f"augment.image_size={sizes.image_size}",
                                "epochs=10", "warmup_epochs=0", "knn_every=0", "channels_last=true",
                                f"out_dir={workdir / 'run'}", *overrides])
    return Trainer(config, DistContext(rank=0, local_rank=0, world_size=1, device=device))


def synthetic_views(sizes, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (sizes.batch, 3, sizes.image_size, sizes.image_size)
    return tuple(torch.randn(shape, generator=generator, device=device if generator is None else "cpu")
                 .to(device).contiguous(memory_format=torch.channels_last) for _ in range(2))


def check_amp(device, sizes, workdir, measured) -> list[Result]:
    """`sizes.steps` trainer steps under float16 (GradScaler) and bfloat16 autocast against float32 steps."""
    generator = torch.Generator().manual_seed(1)
    batches = [synthetic_views(sizes, device, generator) for _ in range(sizes.steps)]
    losses = {}
    for amp in ("none", "float16", "bfloat16"):
        trainer = make_trainer(device, sizes, workdir, f"amp={amp}")
        losses[amp] = torch.stack([trainer.train_step(y1, y2) for y1, y2 in batches]).float()
        del trainer
    return [compare(f"amp {amp}", losses[amp], losses["none"]) for amp in ("float16", "bfloat16")]


def check_lars(device, sizes, workdir, measured) -> list[Result]:
    """Compiled against eager LARS: the parameter updates of five steps on the same gradients."""
    model = build_model(sizes.arch, sizes.projector).to(device)
    start = [p.detach().clone() for p in model.parameters()]
    updates, optimizers = [], []
    for compiled in (False, True):
        params = [[torch.nn.Parameter(p.detach().clone()) for p in group["params"]] for group in param_groups(model)]
        optimizer = LARS([{"params": params[0], "lr": 0.2}, {"params": params[1], "lr": 0.0048}], lr=0,
                         weight_decay=1.5e-6, weight_decay_filter=True, lars_adaptation_filter=True,
                         compile=compiled)
        generator = torch.Generator(device=device).manual_seed(2)
        for _ in range(5):
            for p in params[0] + params[1]:
                p.grad = torch.randn(p.shape, generator=generator, device=device)
            optimizer.step()
        ordered = {id(p): q for p, q in zip(param_groups(model)[0]["params"] + param_groups(model)[1]["params"],
                                             params[0] + params[1])}
        updates.append(torch.cat([(ordered[id(p)] - s).flatten() for p, s in zip(model.parameters(), start)]))
        optimizers.append(optimizer)
    measured["lars_step_ms"] = 1000 * timed(optimizers[1].step, device, 5)
    return [compare("lars", updates[1], updates[0])]


def check_resume(device, sizes, workdir, measured) -> list[Result]:
    """A checkpoint after two steps, resumed by a fresh trainer, gives the same next batch (drawn from
    the device RNG) and the same next step as the trainer that wrote it."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):  # the same kernels twice
        trainer = make_trainer(device, sizes, workdir / "resume")
        torch.backends.cudnn.benchmark = False  # GPU only: the trainer turned it on
        for _ in range(2):
            trainer.train_step(*synthetic_views(sizes, device))
            trainer.step += 1
        trainer.save_checkpoint()
        after = []
        for run in (trainer, None):
            if run is None:
                run = make_trainer(device, sizes, workdir / "resume", "seed=1")  # re-seeds every RNG on purpose
                torch.backends.cudnn.benchmark = False
                run.resume()
            views = synthetic_views(sizes, device)
            loss = run.train_step(*views)
            after.append((torch.cat([v.flatten() for v in views]),
                          torch.cat([loss.view(1).float()] + [p.detach().flatten() for p in run.model.parameters()])))
    return [compare("resume batch", after[1][0], after[0][0]), compare("resume step", after[1][1], after[0][1])]


def check_ddp(device, sizes, workdir, measured) -> list[Result]:
    """DDP with synchronised BatchNorm at world size 1 (NCCL on CUDA, gloo on the CPU) against the plain model."""
    backend = "nccl" if device.type == "cuda" else "gloo"  # GPU only: nccl
    dist.init_process_group(backend, store=dist.FileStore(str(workdir / "store"), 1), rank=0, world_size=1)
    try:
        views = synthetic_views(sizes, device, torch.Generator().manual_seed(3))
        grads = []
        for distributed in (False, True):
            torch.manual_seed(0)
            model = build_model(sizes.arch, sizes.projector).to(device)
            if distributed:
                model = DistributedDataParallel(sync_batchnorm(model, device),
                                                device_ids=[device] if device.type == "cuda" else None)
            barlow_twins_loss(*model(*views)).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    finally:
        dist.destroy_process_group()
    return [compare("ddp", grads[1], grads[0])]


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (nvidia) is missing
        return False


def loader_config(sizes, workdir, pipeline: str):
    return load_config(None, [f"data={image_folder(workdir / 'images', sizes.batch)}", f"pipeline={pipeline}",
                              "workers=1", f"augment.image_size={sizes.image_size}"])


def check_ffcv(device, sizes, workdir, measured) -> list[Result]:
    """The first batch's crops cut on the device (FFCV's ToDevice, float16 resize on CUDA) against the CPU's."""
    if not installed("ffcv"):
        return [Result("ffcv crops", "skipped: not installed")]
    from pipelines.ffcv import FFCVPipeline
    config = loader_config(sizes, workdir, "ffcv")
    crops = []
    for where in (device, torch.device("cpu")):
        pipeline = FFCVPipeline(config, Placement(where), sizes.batch)
        crops.append(pipeline.device_crops(next(iter(pipeline.host_batches()))).float())
    return [compare("ffcv crops", crops[0], crops[1], relative=False)]


def check_dali(device, sizes, workdir, measured) -> list[Result]:
    """DALI on the device (the mixed decoder on CUDA) against DALI on the CPU, same seed: the same images
    in the same order, and per-image view means within TOLERANCE (the JPEG decoders differ slightly)."""
    if not installed("nvidia.dali"):
        return [Result("dali ids", "skipped: not installed")]
    from pipelines.dali import DALIPipeline
    config = loader_config(sizes, workdir, "dali")
    batches = [next(DALIPipeline(config, Placement(where), sizes.batch, debug=True).debug_batches())
               for where in (device, torch.device("cpu"))]
    means = [torch.stack([b.view1, b.view2]).float().mean(dim=(2, 3, 4)) for b in batches]
    return [compare("dali ids", torch.as_tensor(batches[0].ids), torch.as_tensor(batches[1].ids), relative=False),
            compare("dali view means", means[0], means[1], relative=False)]


CHECKS: list[Callable] = [check_augment, check_device_crop, check_device_decode, check_amp, check_lars, check_resume, check_ddp, check_ffcv,
                          check_dali]


# key -> (cudnn.benchmark, config override) of each timed training configuration
TRAINING_RUNS = {"train_images_per_s_cudnn_benchmark_on": (True, "compile_model=false"),
                 "train_images_per_s_cudnn_benchmark_off": (False, "compile_model=false"),
                 "train_images_per_s_compile_model": (True, "compile_model=true")}


def measure_training(device, sizes, workdir, measured) -> None:
    """Synthetic training steps per second (AMP, channels-last) in each of TRAINING_RUNS (CUDA only)."""
    for key, (benchmark, setting) in TRAINING_RUNS.items():
        if device.type != "cuda":
            measured[key] = "n/a"
            continue
        trainer = make_trainer(device, sizes, workdir / "speed", setting)  # GPU only from here
        torch.backends.cudnn.benchmark = benchmark
        views = synthetic_views(sizes, device)
        measured[key] = sizes.batch / timed(lambda: trainer.train_step(*views), device, 10)
        del trainer
    measured["peak_gpu_memory_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30
                                       if device.type == "cuda" else "n/a")


def run_checks(device: torch.device, report: Callable[[str], None] = print) -> dict:
    sizes = SIZES[device.type]
    results, measured = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for index, check in enumerate(CHECKS):
            workdir = Path(tmp) / str(index)
            workdir.mkdir()
            try:
                outcome = list(check(device, sizes, workdir, measured))
            except Exception as err:  # noqa: BLE001 - a crashing check is a failed check; the others still run
                outcome = [Result(check.__name__.removeprefix("check_").replace("_", " "), f"fail: {one_line(err)}")]
            for result in outcome:
                results.append(result)
                error = "" if result.error is None else f"  error {result.error:.3g} (tolerance {result.tolerance:g})"
                report(f"{result.check:<18} {result.status}{error}")
        measure_training(device, sizes, Path(tmp), measured)
    report("\nthroughput")
    for key, value in measured.items():
        report(f"  {key:<40} {value if isinstance(value, str) else f'{value:.4g}'}")
    return {"device": str(device), "sizes": asdict(sizes), "checks": [asdict(r) for r in results],
            "throughput": measured, "passed": all(not r.status.startswith("fail") for r in results)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="check bt_fast's CUDA code paths and measure their speed")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda, or a one-line notice and exit 0 when no CUDA device is visible")
    parser.add_argument("--json", default=None, help="also write the results and throughput here")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible, nothing to check (--device cpu runs the checks on the CPU)")
        return
    with cli_errors():
        device = resolve_device(args.device or "cuda", setting="--device")
        summary = run_checks(device)
        if args.json:
            write_json(args.json, summary)
    print(f"\n{'all checks passed' if summary['passed'] else 'some checks FAILED'} on {device}")
    sys.exit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()

"""Two ratios for the FFCV pipeline, printed as one line each (plus details):

1. host CPU-seconds per image of the FFCV loader (decode once + two random-resized crops,
   1 worker) divided by the pure libjpeg-turbo decode floor of the same stored JPEG bytes;
2. device-augmentation images/s of `pipelines.augment` divided by `kornia.augmentation`
   doing the same distortions (one view, batch 64, on the chosen device).

    python -m tools.bench_ffcv [--data data/demo/train] [--beton PATH] [--batch 64] [--size 224]
                               [--device cpu] [--repeats 5] [--compile]

The beton is written to a temporary directory unless --beton names one (converted if missing).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def stored_jpegs(beton: Path) -> list[tuple[np.ndarray, int, int]]:
    """(bytes, height, width) of every stored JPEG in the beton, read once into memory."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader
    reader = Reader(str(beton))
    image_field = list(reader.handlers).index("image")
    fields = reader.metadata[f"f{image_field}"]
    size_of = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    blob = np.fromfile(beton, dtype=np.uint8)
    out = []
    for field in fields:
        if field["mode"] != IMAGE_MODES["jpg"]:
            continue
        start = int(field["data_ptr"])
        out.append((blob[start:start + size_of[start]].copy(), int(field["height"]), int(field["width"])))
    return out


def decode_floor(jpegs, repeats: int) -> dict[str, float]:
    """CPU-seconds per image to decode every stored JPEG once (best of `repeats`)."""
    import cv2
    from ffcv.libffcv import imdecode
    cv2.setNumThreads(1)
    largest = max(h * w * 3 for _, h, w in jpegs)
    buffer = np.empty(largest, dtype=np.uint8)
    results = {}
    for name in ("ffcv_imdecode", "cv2_imdecode"):
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            for data, h, w in jpegs:
                if name == "ffcv_imdecode":
                    imdecode(data, buffer, h, w, h, w, 0, 0, 1, 1, False, False)
                else:
                    cv2.imdecode(data, cv2.IMREAD_COLOR)
            best = min(best, (time.process_time() - start) / len(jpegs))
        results[name] = best
    return results


def ffcv_host_cost(beton: Path, size: int, batch: int, repeats: int) -> float:
    """CPU-seconds per image for an epoch of `FFCVPipeline.crops()` with 1 worker (best of `repeats`)."""
    from bt_fast.config import Config
    from pipelines.base import Placement
    from pipelines.ffcv import FFCVPipeline
    config = Config()
    config.ffcv = dataclasses.replace(config.ffcv, beton=str(beton))
    config.augment = dataclasses.replace(config.augment, image_size=size)
    config.workers = 1
    pipeline = FFCVPipeline(config, Placement(torch.device("cpu")), batch)
    for _ in pipeline.crops():  # compile and warm the page cache
        pass
    images = len(pipeline) * batch
    best = float("inf")
    for epoch in range(repeats):
        pipeline.set_epoch(epoch + 1)
        start = time.process_time()
        for _ in pipeline.crops():
            pass
        best = min(best, (time.process_time() - start) / images)
    return best


def kornia_view(spec, device):
    """`kornia.augmentation` with the paper's view-1 distortions (per-batch jitter order, as kornia does)."""
    import kornia.augmentation as K
    k = spec.blur_kernel_size
    return torch.nn.Sequential(
        K.RandomHorizontalFlip(p=spec.flip_p),
        K.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue, p=spec.jitter_p),
        K.RandomGrayscale(p=spec.grayscale_p),
        K.RandomGaussianBlur((k, k), tuple(spec.blur_sigma), p=spec.blur_p[0]),
        K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize_p[0]),  # threshold 0.5
        K.Normalize(mean=torch.tensor(spec.mean), std=torch.tensor(spec.std)),
    ).to(device)


def augmentation_rates(size: int, batch: int, device: torch.device, repeats: int, compile: bool) -> dict[str, float]:
    """Images/s of one view: ours (eager, and compiled if asked) and kornia's, interleaved, median of `repeats`."""
    from bt_fast.config import AugmentSpec
    from pipelines import augment as A
    spec = AugmentSpec(image_size=size)
    g = torch.Generator(device=device).manual_seed(0)
    crops = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g, device=device)
    crops = crops.permute(0, 3, 1, 2)  # channels-last uint8, as the loader delivers
    ours = A.TwoViewAugment(spec, torch.float32)
    runners = {"ours": lambda: ours.view(crops, 0, g)}
    if compile:
        compiled = A.TwoViewAugment(spec, torch.float32, compile=True)
        runners["ours_compiled"] = lambda: compiled.view(crops, 0, g)
    kornia = kornia_view(spec, device)
    runners["kornia"] = lambda: kornia(crops.float() / 255)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in runners}
    for name, run in runners.items():  # warm-up (and compile)
        run()
    for _ in range(repeats):
        for name, run in runners.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(values) for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_ffcv", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo/train")
    parser.add_argument("--beton", default="")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd augmentation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the augmentation (0: default)")
    parser.add_argument("--skip-ffcv", action="store_true")
    parser.add_argument("--skip-augment", action="store_true")
    args = parser.parse_args(argv)

    if not args.skip_ffcv:
        with tempfile.TemporaryDirectory(prefix="bench_ffcv_") as scratch:
            beton = Path(args.beton) if args.beton else Path(scratch) / "bench.beton"
            if not beton.is_file():
                from tools.convert import convert
                convert(args.data, beton, "ffcv", progress=False)
            jpegs = stored_jpegs(beton)
            floor = decode_floor(jpegs, args.repeats)
            host = ffcv_host_cost(beton, args.size, args.batch, args.repeats)
        print(f"decode floor: ffcv imdecode {floor['ffcv_imdecode'] * 1e3:.3f} ms/image, "
              f"cv2.imdecode {floor['cv2_imdecode'] * 1e3:.3f} ms/image ({len(jpegs)} stored JPEGs)")
        print(f"ffcv loader (decode once + 2 crops of {args.size} px, 1 worker): {host * 1e3:.3f} CPU-ms/image")
        print(f"RATIO ffcv_host_cost/decode_floor = {host / floor['ffcv_imdecode']:.3f} (target <= 1.3)")

    if not args.skip_augment:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        rates = augmentation_rates(args.size, args.batch, torch.device(args.device), args.repeats, args.compile)
        print("augmentation images/s (one view, batch %d, %d px, %s, %d threads): %s" % (
            args.batch, args.size, args.device, torch.get_num_threads(),
            ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items())))
        print(f"RATIO augment/kornia = {rates['ours'] / rates['kornia']:.2f} (target >= 4)")
        if "ours_compiled" in rates:
            print(f"RATIO augment_compiled/kornia = {rates['ours_compiled'] / rates['kornia']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

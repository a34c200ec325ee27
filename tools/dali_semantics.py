"""Measure how the DALI pipeline's views differ from the reference (PIL/torchvision) pipeline's.

    python -m tools.dali_semantics [--data DIR] [--image-size 224] [--samples 1024] [--workers 2]
                                   [--seed 0] [--speed] [--json PATH]

Without --data the demo training set (data/demo/train) is used. Sections, all measured now:

replay        Each DALI view is recomputed with PIL/torchvision from the *same* choices (crop
              box, flip, jitter factors, grayscale, blur sigma, solarize: the pipeline's debug
              outputs) in torchvision's order b, c, s, h. Mean absolute difference in grey
              levels (0..255), overall and split by which steps ran, isolating operator
              semantics (hue, clamps, resize filter, rounding) from randomness.
statistics    Per-image colour statistics (per-channel mean and std, luma mean, HSV saturation
              and value, fraction of grey pixels) of N DALI views and N reference views
              (`pipelines.reference.TwoViewImageFolder`), independently drawn. For each statistic:
              the difference of the means and of the 10/50/90 % quantiles between the two
              pipelines, next to the same figures for two reference runs with different seeds
              (the sampling noise floor).
probabilities Rates of each per-sample choice in the DALI debug outputs against the spec, with
              the binomial standard deviation, and the fraction of all-grey views detected from
              pixels in DALI and in the reference.
crops         Area fraction and aspect ratio of DALI's crop windows against torchvision's
              `RandomResizedCrop.get_params` on the same image sizes.
speed         (--speed) images/s and CPU ms per image (both views, batch 64) of the DALI
              pipeline on this machine's CPU, for decode="once" and decode="roi", at 224 and
              64 px; median of interleaved repetitions.
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

from bt_fast.errors import (STARTING, CliParser, DataError, cli_errors, exit_on_interrupt, expand_home, option_flag,
                            output_file)

with exit_on_interrupt(STARTING):
    import numpy as np
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from bt_fast.config import MAX_IMAGE_SIZE, MAX_SEED, MIN_IMAGE_SIZE, AugmentSpec, Config
    from bt_fast.files import write_json
    from pipelines.base import Placement
    from pipelines.dali import DALIPipeline
    from pipelines.dali_debug import FLAG_NAMES, grey_views, replay_view, to_pixels
    from pipelines.image_folder import find_image_folder

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "train"
DEFAULT_REPLAY = 256  # samples per view recomputed with PIL
STATS = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "luma", "saturation", "value", "grey_pixels")


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------

def colour_stats(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image statistics of (B, H, W, 3) grey levels."""
    x = np.clip(pixels, 0, 255) / 255.0
    high, low = x.max(axis=-1), x.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-12), 0.0)
    luma = x @ np.array([0.299, 0.587, 0.114])
    out = {f"mean_{c}": x[..., k].mean(axis=(1, 2)) * 255 for k, c in enumerate("rgb")}
    out.update({f"std_{c}": x[..., k].std(axis=(1, 2)) * 255 for k, c in enumerate("rgb")})
    out["luma"] = luma.mean(axis=(1, 2)) * 255
    out["saturation"] = saturation.mean(axis=(1, 2))
    out["value"] = high.mean(axis=(1, 2)) * 255
    out["grey_pixels"] = ((high - low) * 255 <= 2.0).mean(axis=(1, 2))
    return out


def dali_config(data: str, spec: AugmentSpec, workers: int, seed: int) -> Config:
    config = Config()
    config.data, config.workers, config.seed, config.augment = data, workers, seed, spec
    return config


def collect_dali(data: str, spec: AugmentSpec, samples: int, batch: int, workers: int, seed: int):
    """DALI views (pixels), ids, image shapes and choices for `samples` samples (epochs as needed)."""
    pipeline = DALIPipeline(dali_config(data, spec, workers, seed), Placement(torch.device("cpu")), batch, debug=True)
    pixels, ids, shapes, choices = ([], []), [], [], ({}, {})
    epoch, have = 0, 0
    while have < samples:
        pipeline.set_epoch(epoch)
        for item in pipeline.debug_batches():
            for v, view in enumerate((item.view1, item.view2)):
                pixels[v].append(to_pixels(view, spec))
                for name, value in item.choices[v].items():
                    choices[v].setdefault(name, []).append(value)
            ids.append(item.ids)
            shapes.append(item.image_shape)
            have += len(item.ids)
            if have >= samples:
                break
        epoch += 1
    merged = tuple({k: np.concatenate(v)[:samples] for k, v in c.items()} for c in choices)
    return ((np.concatenate(pixels[0])[:samples], np.concatenate(pixels[1])[:samples]), np.concatenate(ids)[:samples],
            np.concatenate(shapes)[:samples], merged)


def collect_reference(data: str, spec: AugmentSpec, samples: int, seed: int):
    from pipelines.reference import TwoViewImageFolder
    dataset = TwoViewImageFolder(data, spec, seed)
    order = np.random.default_rng(seed).permutation(len(dataset))
    views = ([], [])
    for n in range(samples):
        a, b = dataset[(n // len(dataset), int(order[n % len(dataset)]))]
        views[0].append(a)
        views[1].append(b)
    return tuple(to_pixels(torch.stack(v), spec) for v in views)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

def section_replay(data: str, spec: AugmentSpec, pixels, ids, choices, limit: int) -> dict:
    _, files = find_image_folder(data)
    cache: dict[int, Image.Image] = {}
    rows = []
    for v in range(2):
        for i in range(min(limit, len(ids))):
            path = files[int(ids[i])][0]
            if int(ids[i]) not in cache:
                cache[int(ids[i])] = Image.open(path).convert("RGB")
            expected = replay_view(cache[int(ids[i])], choices[v], i, spec).astype(np.float64)
            rows.append((v, i, float(np.abs(pixels[v][i] - expected).mean())))
    def mad(select) -> dict:
        values = [d for v, i, d in rows if select(v, i)]
        return {"n": len(values), "mad": float(np.mean(values)) if values else None,
                "p90": float(np.quantile(values, 0.9)) if values else None}
    c = choices
    return {
        "all": mad(lambda v, i: True),
        "no_jitter": mad(lambda v, i: not c[v]["jitter"][i]),
        "no_jitter_no_blur": mad(lambda v, i: not c[v]["jitter"][i] and not c[v]["blur"][i]),
        "jitter_small_hue(|h|<0.02)": mad(lambda v, i: c[v]["jitter"][i] and abs(c[v]["hue"][i]) < 0.02),
        "jitter_large_hue(|h|>0.07)": mad(lambda v, i: c[v]["jitter"][i] and abs(c[v]["hue"][i]) > 0.07),
        "grayscale": mad(lambda v, i: bool(c[v]["grayscale"][i])),
        "solarize": mad(lambda v, i: bool(c[v]["solarize"][i])),
    }


def _compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    out = {}
    for name in STATS:
        x, y = a[name], b[name]
        q = [float(abs(np.quantile(x, p) - np.quantile(y, p))) for p in (0.1, 0.5, 0.9)]
        out[name] = {"mean_a": float(x.mean()), "mean_b": float(y.mean()),
                     "abs_diff_mean": float(abs(x.mean() - y.mean())), "abs_diff_q10_50_90": q}
    return out


def section_statistics(dali_pixels, ref_pixels, ref2_pixels) -> dict:
    out = {}
    for v in range(2):
        d, r, r2 = (colour_stats(p[v]) for p in (dali_pixels, ref_pixels, ref2_pixels))
        out[f"view{v + 1}"] = {"dali_vs_reference": _compare(d, r), "reference_vs_reference": _compare(r2, r)}
    return out


def section_probabilities(spec: AugmentSpec, choices, dali_pixels, ref_pixels) -> dict:
    out = {}
    for v in range(2):
        expected = {"flip": spec.flip_p, "jitter": spec.jitter_p, "grayscale": spec.grayscale_p,
                    "blur": spec.blur_p[v], "solarize": spec.solarize_p[v]}
        rates = {}
        for name in FLAG_NAMES:
            flags = choices[v][name].astype(bool)
            p = expected[name]
            rates[name] = {"spec": p, "dali": float(flags.mean()), "binomial_sd": math.sqrt(p * (1 - p) / len(flags))}
        rates["grey_views_from_pixels"] = {"spec": spec.grayscale_p, "dali": float(grey_views(dali_pixels[v]).mean()),
                                           "reference": float(grey_views(ref_pixels[v]).mean())}
        out[f"view{v + 1}"] = rates
    return out


def section_crops(spec: AugmentSpec, choices, shapes: np.ndarray) -> dict:
    extent = np.concatenate([choices[0]["extent"], choices[1]["extent"]]).astype(np.float64)
    hw = np.concatenate([shapes, shapes])[:, :2].astype(np.float64)
    area = extent[:, 0] * extent[:, 1] / (hw[:, 0] * hw[:, 1])
    log_ratio = np.log(extent[:, 1] / extent[:, 0])
    rrc = T.RandomResizedCrop(spec.image_size, scale=spec.crop_scale, ratio=spec.crop_ratio)
    torch.manual_seed(0)
    ref = []
    for h, w in hw.astype(int):
        _, _, ch, cw = rrc.get_params(torch.empty(1, h, w), list(spec.crop_scale), list(spec.crop_ratio))
        ref.append((ch * cw / (h * w), math.log(cw / ch)))
    ref = np.array(ref)
    def summary(x):
        return {"mean": float(x.mean()), "q10": float(np.quantile(x, 0.1)), "q50": float(np.quantile(x, 0.5)),
                "q90": float(np.quantile(x, 0.9))}
    return {"area_fraction": {"dali": summary(area), "torchvision": summary(ref[:, 0])},
            "log_aspect_ratio": {"dali": summary(log_ratio), "torchvision": summary(ref[:, 1])}}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def section_speed(data: str, spec: AugmentSpec, workers: int, batch: int = 64, reps: int = 3, batches: int = 8) -> dict:
    out = {}
    for size in (224, 64):
        sized = AugmentSpec(**{**spec.__dict__, "image_size": size})
        runs: dict[str, list[tuple[float, float]]] = {"once": [], "roi": []}
        pipelines = {d: DALIPipeline(dali_config(data, sized, workers, 0), Placement(torch.device("cpu")), batch,
                                     decode=d) for d in runs}
        for rep in range(reps):
            for decode, pipeline in pipelines.items():
                pipeline.set_epoch(rep)
                iterator = iter(pipeline)
                next(iterator)  # build and warm-up outside the timing
                start, cpu = time.perf_counter(), _cpu_seconds()
                for _ in range(batches):
                    next(iterator)
                wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
                iterator.close()
                runs[decode].append((batches * batch / wall, 1000 * cpu / (batches * batch)))
        out[f"{size}px"] = {d: {"images_per_s": statistics.median(r[0] for r in v),
                                "cpu_ms_per_image": statistics.median(r[1] for r in v),
                                "reps": v} for d, v in runs.items()}
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _print(report: dict) -> None:
    replay = report["replay"]
    print("== replay: DALI view vs PIL/torchvision with the same choices, mean |diff| in grey levels (0..255)")
    for name, row in replay.items():
        if row["n"]:
            print(f"  {name:28s} n={row['n']:5d}  mad {row['mad']:6.2f}  p90 {row['p90']:6.2f}")
    print("== statistics: |difference| of the mean of per-image statistics (dali vs ref | ref vs ref noise)")
    for view, sections in report["statistics"].items():
        dr, rr = sections["dali_vs_reference"], sections["reference_vs_reference"]
        print(f"  {view}")
        for name in STATS:
            scale = 100.0 if name in ("saturation", "grey_pixels") else 1.0
            unit = "%" if scale == 100.0 else ""
            a, b = dr[name], rr[name]
            print(f"    {name:12s} dali {a['mean_a'] * scale:7.2f}{unit} ref {a['mean_b'] * scale:7.2f}{unit}  "
                  f"|d| {a['abs_diff_mean'] * scale:6.2f} (noise {b['abs_diff_mean'] * scale:5.2f})  "
                  f"quantiles |d| {' '.join(f'{q * scale:5.2f}' for q in a['abs_diff_q10_50_90'])} "
                  f"(noise {' '.join(f'{q * scale:5.2f}' for q in b['abs_diff_q10_50_90'])})")
    print("== probabilities: DALI per-sample choice rates vs spec (binomial sd)")
    for view, rates in report["probabilities"].items():
        flags = "  ".join(f"{k} {r['dali']:.3f}/{r['spec']:.2f}±{r['binomial_sd']:.3f}" for k, r in rates.items()
                          if k in FLAG_NAMES)
        g = rates["grey_views_from_pixels"]
        print(f"  {view}: {flags}  | grey views from pixels: dali {g['dali']:.3f} reference {g['reference']:.3f}")
    crops = report["crops"]
    print("== crops: DALI crop windows vs torchvision RandomResizedCrop.get_params (mean, q10, q50, q90)")
    for name, row in crops.items():
        for who in ("dali", "torchvision"):
            s = row[who]
            print(f"  {name:17s} {who:11s} {s['mean']:.3f} {s['q10']:.3f} {s['q50']:.3f} {s['q90']:.3f}")
    if "speed" in report:
        print("== speed: DALI on this CPU, two views, batch 64 (median)")
        for size, row in report["speed"].items():
            for decode, s in row.items():
                print(f"  {size:6s} decode={decode:5s} {s['images_per_s']:7.1f} images/s  {s['cpu_ms_per_image']:6.2f} CPU ms/image")


def measure(args: argparse.Namespace) -> dict:
    """Every section's figures for the parsed command line; a DataError for an unusable --data."""
    spec = AugmentSpec(image_size=args.image_size)
    torch.set_num_threads(max(1, args.workers))
    dali_pixels, ids, shapes, choices = collect_dali(args.data, spec, args.samples, args.batch_size, args.workers,
                                                     args.seed)
    ref = collect_reference(args.data, spec, args.samples, args.seed)
    ref2 = collect_reference(args.data, spec, args.samples, args.seed + 1)
    report = {
        "config": {"data": args.data, "image_size": args.image_size, "samples": args.samples,
                   "batch_size": args.batch_size, "workers": args.workers, "seed": args.seed},
        "replay": section_replay(args.data, spec, dali_pixels, ids, choices, args.replay),
        "statistics": section_statistics(dali_pixels, ref, ref2),
        "probabilities": section_probabilities(spec, choices, dali_pixels, ref),
        "crops": section_crops(spec, choices, shapes),
    }
    if args.speed:
        report["speed"] = section_speed(args.data, spec, args.workers)
    return report


def check_numbers(parser: CliParser, args: argparse.Namespace) -> None:
    """A one-line argparse error for a number no section can use (a 0 batch divides by zero, 0 samples
    leaves nothing to compare, a crop below MIN_IMAGE_SIZE fails inside DALI, one beyond MAX_IMAGE_SIZE
    outgrows memory, a negative seed fails inside numpy's generator)."""
    parser.check_range("--image-size", args.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, "pixels")
    parser.check_range("--seed", args.seed, 0, MAX_SEED, "(32 bits)")
    least = {"samples": 1, "batch_size": 1, "replay": 0, "workers": 0}
    for name, low in least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"{option_flag(name)} must be at least {low}, got {getattr(args, name)}")
    if args.replay is not None and args.replay > args.samples:  # (it was cut to --samples without a word)
        parser.error(f"--replay {args.replay} exceeds --samples {args.samples}: only {args.samples} views of each "
                     f"kind are made; give at most that")
    args.replay = min(DEFAULT_REPLAY, args.samples) if args.replay is None else args.replay


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="python -m tools.dali_semantics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEMO), type=expand_home,
                        help="ImageFolder (default: the demo training set)")
    parser.add_argument("--image-size", type=int, default=224,
                        help=f"crop side in pixels, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default 224)")
    parser.add_argument("--samples", type=int, default=1024, help="views per pipeline and view")
    parser.add_argument("--replay", type=int, default=None,
                        help="samples per view recomputed with PIL, at most --samples (default 256, or --samples "
                             "if fewer)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED} (default 0)")
    parser.add_argument("--speed", action="store_true", help="also measure throughput and the decode strategies")
    parser.add_argument("--json", type=output_file, default=None, help="write the report here")
    args = parser.parse_args(argv)
    check_numbers(parser, args)
    with cli_errors():
        if not Path(args.data).is_dir():
            what = "is a file" if Path(args.data).exists() else "does not exist"
            fix = ("build the demo data with `make demo-data`, or pass --data" if args.data == str(DEMO) else
                   "give an ImageFolder directory")
            raise DataError(f"--data {args.data} {what}; {fix}")
        report = measure(args)
        _print(report)
        if args.json:
            write_json(args.json, report)
    return 0


if __name__ == "__main__":
    with exit_on_interrupt():
        sys.exit(main())

"""What every measurement shares: figures, timing, the host CPU meter and the environment.

A timed figure is `{"median": x, "min": x, "max": x}` over timed repetitions that follow an
untimed warm-up. A rate is derived from the times (median rate = count / median time, so
rate x time = count exactly). A ratio is a plain number computed from two medians.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from bt_fast.errors import UserError

try:
    import psutil
except ImportError:  # pragma: no cover - psutil comes with ffcv
    psutil = None


class BenchError(UserError):
    """The benchmark cannot run as asked; the message says why."""


# -- figures -------------------------------------------------------------------------------------
def stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        raise ValueError("no measurements")
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def rate_stats(count: float, seconds: Sequence[float]) -> dict[str, float]:
    """count / seconds as a figure: median = count / median(seconds), so rate x seconds = count exactly."""
    s = stats(seconds)
    return {"median": count / s["median"], "min": count / s["max"], "max": count / s["min"]}


def ratio(a: dict | None, b: dict | None) -> float | None:
    """median(a) / median(b), or None when either figure is missing."""
    if not a or not b or "median" not in a or "median" not in b or not b["median"]:
        return None
    return a["median"] / b["median"]


# -- timing --------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":  # GPU only
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `reps` calls of `fn` after `warmup` untimed ones, each ended by a device sync."""
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


def time_interleaved(runners: dict[str, Callable[[], Any]], device: torch.device, reps: int) -> dict[str, list[float]]:
    """Wall seconds per runner: one untimed call each, then `reps` rounds timing each runner once.

    Interleaving makes a change in the machine's load affect every runner alike.
    """
    for run in runners.values():
        time_calls(run, device, reps=0)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            seconds[name] += time_calls(run, device, reps=1, warmup=0)
    return seconds


# -- host CPU time of this process and its descendants ---------------------------------------------
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
def installed_version(*distributions: str) -> str:
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":  # GPU only
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        return name


def environment(args: argparse.Namespace) -> dict:
    """The `environment` section: device, CPU count, library versions, the run's settings, the CPU meter. The
    loaders' batch and image size only where the loaders run: --end-to-end's sizes are its section's own, and
    --conversion has none."""
    env = {
        "device": str(args.device), "device_name": _device_name(args.device), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": installed_version("torchvision"), "ffcv": installed_version("ffcv"),
        "dali": _dali_version(), "kornia": installed_version("kornia"), "numba": installed_version("numba"),
        "opencv": installed_version("opencv-python", "opencv-python-headless", "opencv-contrib-python"),
        "data": str(args.data), "workers": args.workers, "quick": args.quick, "reps": args.reps,
        "cpu_meter": CPU_METER,
    }
    if not (args.end_to_end or args.conversion):
        env.update(batch_size=args.batch_size, image_size=args.image_size)
    return env


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

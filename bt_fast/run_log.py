"""What rank 0 leaves in `out_dir` besides checkpoints.

- metrics.jsonl: one JSON object per line, either a step (loss, both learning rates, images/s,
  data-wait fraction, and `image_size`, the epoch's crop side, which progressive resizing changes)
  or a k-NN evaluation; every line also holds `time` (UTC, ISO 8601) and `elapsed_s`, the run's wall
  seconds since it first started, summed over resumed segments.
- config.yaml: the resolved config; `--config <out_dir>/config.yaml` loads the same `Config`.
- metrics.png: the curves of metrics.jsonl (`bt_fast.plots`), redrawn at the end, and at an epoch end
  once the last drawing is PLOT_INTERVAL_S old: every rank waits for a drawing, which takes a CPU core
  a good fraction of a second, so a run of short epochs draws only some of them.
- summary.json: written at the end from metrics.jsonl alone, so a resumed run describes the whole
  log, not only its own segment. The rerun of a complete run rewrites none of these files; it only
  writes summary.json and metrics.png if a storage fault kept the run from writing them.
- tensorboard/: with `tensorboard=true`, the same scalars and a grid of the first batch's view pairs.

Every file except the append-only metrics.jsonl is written atomically.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import torch
import yaml

from bt_fast.config import Config
from bt_fast.files import atomic_write, atomic_write_text, write_json
from bt_fast.metrics_file import METRICS_NAME, is_torn, lines_without_records, numbered_lines, numbered_metrics
from bt_fast.plots import Curves, curve_step, plot_runs, save_png, unplottable
from bt_fast.preflight import tensorboard_writer_class
from pipelines.views import pair_grid

CONFIG_NAME = "config.yaml"
PLOT_NAME = "metrics.png"
SUMMARY_NAME = "summary.json"
TENSORBOARD_DIR = "tensorboard"
SCALAR_KEYS = ("loss", "lr_weights", "lr_biases", "images_per_s", "data_wait_fraction", "image_size",
               "knn_top1", "knn_top5", "knn_seconds")
VIEW_PAIRS = 8
PLOT_INTERVAL_S = 10.0


def config_yaml(config: Config) -> str:
    """The config as YAML that `load_config` reads back into an equal `Config`."""
    def plain(value):
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(plain(config.to_dict()), sort_keys=False)


def plotted_metrics(path: str | Path, warn: bool = True) -> Iterator[dict]:
    """The records of a metrics.jsonl that the curves can take (`bt_fast.plots.unplottable`), one at a time.

    Training writes no other, so any other was edited by hand: it is left out of metrics.png and
    summary.json but stays in the file, and the run goes on; with `warn`, a one-line warning on stderr
    names the file, the line and the field.
    """
    for number, record in numbered_metrics(path):
        reason = unplottable(record)
        if reason is None:
            yield record
        elif warn:
            print(f"warning: {path} line {number}: {reason}; the record stays in the file but is left out of "
                  f"{PLOT_NAME} and {SUMMARY_NAME}", file=sys.stderr)


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop the records of steps after `step` (a killed run's lost work) and a torn last line (one without
    its newline: a killed writer's). Every other line is kept as it was: a record whose step no curve can
    take (edited by hand) has no place in the order of steps, and a line that is no record (not JSON, or no
    step) is not training's to drop; one warning names such lines."""
    path = out_dir / METRICS_NAME
    if not path.is_file():
        return
    foreign: list[int] = []

    def kept() -> Iterator[bytes]:
        for number, line, record in numbered_lines(path):
            if record is None:
                if is_torn(line):  # the last line, as only the last can lack its newline
                    continue
                foreign.append(number)
            elif curve_step(record) is not None and record["step"] > step:
                continue
            yield (line if line.endswith("\n") else line + "\n").encode("utf-8", "surrogateescape")

    atomic_write(path, lambda handle: handle.writelines(kept()))
    if foreign:
        print(f"warning: {lines_without_records(path, foreign)}; kept in the file, left out of {PLOT_NAME} and "
              f"{SUMMARY_NAME}", file=sys.stderr)


def metrics_missing(out_dir: Path) -> bool:
    """True if out_dir has a metrics log but not the summary or plot drawn from it at a run's end."""
    drawn = all((out_dir / name).is_file() for name in (SUMMARY_NAME, PLOT_NAME))
    return (out_dir / METRICS_NAME).is_file() and not drawn


def _installed(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """Python's version and the installed distribution versions (`importlib.metadata`, not a module's
    `__version__`, which ffcv leaves stale) of the libraries that shape the numbers; the data library's
    only if it is loaded."""
    found = {"python": platform.python_version(),
             **{name: _installed(name) for name in ("torch", "torchvision", "numpy")},
             "torch_cuda": torch.version.cuda}  # the CUDA torch was built for (None: a CPU build)
    if "ffcv" in sys.modules:
        found["ffcv"] = _installed("ffcv")
    if "nvidia.dali" in sys.modules:  # the distribution's name carries the CUDA version: nvidia-dali-cuda130
        dali = [d.metadata["Name"] for d in importlib.metadata.distributions()
                if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")]
        found["nvidia.dali"] = f"{dali[0]} {_installed(dali[0])}" if dali else "unknown"
    return found


def device_description(device: torch.device, world_size: int) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"type": device.type, "name": name, "world_size": world_size}


def summarise(records: Iterable[dict], steps_per_epoch: int, batch_size: int) -> dict:
    """Figures of a whole run from its metrics records, read once.

    images/s is the images of all logged steps over the summed time of those steps (each step's time is
    batch_size / its images_per_s), which is what the trainer measures for one uninterrupted segment.
    A field that a hand-edited record lacks (or an images_per_s that is not positive) leaves that record
    out of the one figure it feeds: the wall time and end time are those of the last record holding them.
    """
    count, timed, step_seconds, first, last, knn, clock = 0, 0, 0.0, None, None, None, None
    for record in records:
        if "elapsed_s" in record and "time" in record:
            clock = record
        if "loss" in record:
            count += 1
            rate = record.get("images_per_s")
            if isinstance(rate, (int, float)) and rate > 0:
                timed += 1
                step_seconds += batch_size / rate
            first, last = first or record, record
        if "knn_top1" in record:
            knn = record
    last_step = last["step"] if last else 0
    return {
        "steps": last_step,
        "epochs": last_step / steps_per_epoch,
        "images": count * batch_size,
        "images_per_s": timed * batch_size / step_seconds if timed else None,
        "first_loss": first["loss"] if first else None,
        "last_loss": last["loss"] if last else None,
        "last_knn": {"step": knn["step"], "top1": knn["knn_top1"], "top5": knn.get("knn_top5")} if knn else None,
        "wall_time_s": clock["elapsed_s"] if clock else 0.0,
        "finished_at": clock["time"] if clock else None,
    }


class RunLog:
    """Rank 0's writer of the files above for one segment of a run (from its start or a resume to its end)."""

    def __init__(self, config: Config, step: int, elapsed_s: float):
        """Start at `step` with `elapsed_s` seconds already spent by earlier segments (0 for a new run)."""
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / CONFIG_NAME, config_yaml(config))
        self.started = time.monotonic() - elapsed_s
        self.plotted = time.monotonic()  # the segment's start counts as a drawing: a short run draws once, at its end
        metrics = self.out_dir / METRICS_NAME
        self.curves = Curves(plotted_metrics(metrics) if metrics.is_file() else ())  # earlier segments' too
        self.metrics = open(metrics, "a")
        self.tensorboard = None
        if config.tensorboard:
            # purge_step hides events a killed segment wrote after the checkpoint it resumes from
            self.tensorboard = tensorboard_writer_class()(str(self.out_dir / TENSORBOARD_DIR), purge_step=step + 1)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def write(self, record: dict) -> None:
        """Append one record, stamped with the wall-clock time and the elapsed seconds; a step record
        (one with a loss) also with its epoch's crop side."""
        if "loss" in record and "epoch" in record:
            record = {**record, "image_size": self.config.augment.image_size_at(record["epoch"], self.config.epochs)}
        stamped = {**record, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                   "elapsed_s": round(self.elapsed(), 3)}
        self.metrics.write(json.dumps(stamped) + "\n")
        self.curves.add(stamped)
        if self.tensorboard is not None:
            for key in SCALAR_KEYS:
                if key in record:
                    self.tensorboard.add_scalar(key, record[key], record["step"])

    def write_views(self, view1: torch.Tensor, view2: torch.Tensor, step: int) -> None:
        """A grid of the first VIEW_PAIRS view pairs to TensorBoard (nothing without it)."""
        if self.tensorboard is not None:
            grid = pair_grid(view1, view2, self.config.augment, VIEW_PAIRS)
            self.tensorboard.add_image("views", grid, step, dataformats="HWC")

    def flush(self, durable: bool = False) -> None:
        """Push the metrics to the OS (and with `durable`, to the disk: before a checkpoint names their steps)."""
        self.metrics.flush()
        if durable:
            os.fsync(self.metrics.fileno())

    def epoch_end(self) -> None:
        self.flush()
        if self.tensorboard is not None:
            self.tensorboard.flush()
        if time.monotonic() - self.plotted >= PLOT_INTERVAL_S:
            self.plot()

    def plot(self) -> None:
        """metrics.png from the curves in memory: at an epoch end every rank waits for this."""
        save_png(plot_runs({self.out_dir.name: self.curves}), self.out_dir / PLOT_NAME)
        self.plotted = time.monotonic()

    def finish(self, steps_per_epoch: int, total_steps: int, stopped_by: str | None, device: torch.device,
               world_size: int) -> dict:
        """Redraw metrics.png and write summary.json from the whole of metrics.jsonl; returns the summary."""
        self.flush()
        return write_summary(self.config, steps_per_epoch, total_steps, stopped_by, device, world_size,
                             warn=False)  # the start of this segment warned of the records left out

    def close(self) -> None:
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def write_summary(config: Config, steps_per_epoch: int, total_steps: int, stopped_by: str | None,
                  device: torch.device, world_size: int, warn: bool = True) -> dict:
    """Redraw metrics.png and write summary.json from the records of metrics.jsonl that the curves can take
    (`plotted_metrics`, warning of the others with `warn`); returns the summary. Also how the rerun of a
    complete run restores these two if a storage fault cut its end short."""
    out_dir = Path(config.out_dir)
    curves = Curves()
    records = plotted_metrics(out_dir / METRICS_NAME, warn)
    summary = {**summarise(curves.adding(records), steps_per_epoch, config.batch_size),
               "total_steps": total_steps, "stopped_by": stopped_by,
               "device": device_description(device, world_size), "versions": versions()}
    save_png(plot_runs({out_dir.name: curves}), out_dir / PLOT_NAME)
    write_json(out_dir / SUMMARY_NAME, summary)
    return summary

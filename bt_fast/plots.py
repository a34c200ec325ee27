"""Training curves of one or more runs as one matplotlib figure (Agg; no display or pyplot state).

Each panel plots one metric of metrics.jsonl against the step, one line per run, so the figure
a run writes as metrics.png and the overlay `tools.plot` writes are the same code. A line of more
than MAX_POINTS points is drawn as the means of MAX_POINTS runs of consecutive points: an ImageNet
run logs 625 steps an epoch, 625,000 over 1,000 epochs, and drawing them all cost seconds at every
epoch end for curves no wider than 400 pixels.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from bt_fast.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (metrics.jsonl key, panel title), in reading order.
PANELS = (
    ("loss", "loss"),
    ("lr_weights", "learning rate (weights)"),
    ("lr_biases", "learning rate (biases)"),
    ("images_per_s", "images/s"),
    ("data_wait_fraction", "data-wait fraction"),
    ("image_size", "crop side (px)"),
    ("knn_top1", "k-NN top-1 (%)"),
)
ROWS = 2
SPARSE_KEYS = {"knn_top1"}  # logged once per k-NN evaluation: drawn with markers
MAX_POINTS = 2000
STEP_TYPE, VALUE_TYPE = "q", "d"  # the `array` type codes of a curve's columns: int64 steps, float64 values


def _matplotlib_default_dirs_writable() -> bool:
    """True where matplotlib's own config and cache directories (`$XDG_CONFIG_HOME/matplotlib`, else
    `~/.config/matplotlib`, and the same under `$XDG_CACHE_HOME`, else `~/.cache`) can be made and written,
    as matplotlib tries them (`matplotlib._get_config_or_cache_dir`, Linux and FreeBSD)."""
    for variable, default in (("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache")):
        try:
            directory = Path(os.environ.get(variable) or Path.home() / default, "matplotlib").resolve()
            directory.mkdir(parents=True, exist_ok=True)
        except (RuntimeError, OSError):  # RuntimeError: no home directory
            return False
        if not (directory.is_dir() and os.access(directory, os.W_OK)):
            return False
    return True


@functools.cache
def quiet_matplotlib() -> None:
    """Call before importing matplotlib. Where $MPLCONFIGDIR is unset and matplotlib's default directories
    cannot be written (no home, or a read-only one), point it at a temporary directory, removed at exit:
    matplotlib does the same itself, but with a two-line warning on every import (every training run draws
    metrics.png). A $MPLCONFIGDIR that is set is the user's choice, and its warnings are theirs."""
    if "matplotlib" in sys.modules or os.environ.get("MPLCONFIGDIR") or \
            not sys.platform.startswith(("linux", "freebsd")) or _matplotlib_default_dirs_writable():
        return
    try:
        directory = tempfile.mkdtemp(prefix="matplotlib-")
    except OSError:  # no writable temporary directory: matplotlib says so itself
        return
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["MPLCONFIGDIR"] = directory


class Curves:
    """The plotted metrics of one run as (step, value) columns of machine numbers (16 bytes a point), not
    records: what a run keeps to redraw metrics.png at an epoch end without reading metrics.jsonl again."""

    def __init__(self, records: Iterable[dict] = ()):
        self._points = {key: (array(STEP_TYPE), array(VALUE_TYPE)) for key, _ in PANELS}
        for record in records:
            self.add(record)

    def add(self, record: dict) -> None:
        for key, (steps, values) in self._points.items():
            if record.get(key) is not None:
                steps.append(record["step"])
                values.append(record[key])

    def empty(self) -> bool:
        """True while no metric has a point."""
        return not any(len(steps) for steps, _ in self._points.values())

    def adding(self, records: Iterable[dict]) -> Iterator[dict]:
        """Each of `records`, added as it passes: the curves of a file read once for something else too."""
        for record in records:
            self.add(record)
            yield record

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of `key` in log order (copies: the columns keep growing)."""
        steps, values = self._points[key]
        return np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64)


def _fits(value: object, kinds: type | tuple[type, ...], column: str) -> bool:
    """True if `value` is one of `kinds` (not a bool) that an `array` of type code `column` can hold."""
    if not isinstance(value, kinds) or isinstance(value, bool):
        return False
    if isinstance(value, float):  # every float fits the float64 column: most metrics, checked without an array
        return True
    try:
        array(column, [value])
    except OverflowError:
        return False
    return True


def curve_step(record: dict) -> int | None:
    """The step of `record` if a curve can take it (an integer within 64 bits), else None."""
    step = record.get("step")
    return step if _fits(step, int, STEP_TYPE) else None


JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
              list: "a list", dict: "an object"}


def _problem(field: str, value: object) -> str:
    """What is wrong with the value of `field` that a curve refused, as the rest of "'field' holds"."""
    if isinstance(value, int) and not isinstance(value, bool):  # an integer refused is out of range
        return ("an integer outside -2**63..2**63 - 1, the 64-bit range of a step" if field == "step"
                else "an integer beyond the range of a 64-bit float (about 1.8e308)")
    kind = JSON_TYPES.get(type(value), type(value).__name__)
    return f"{kind}, not {'an integer' if field == 'step' else 'a number'}"


def unplottable(record: dict) -> str | None:
    """Why `Curves.add` cannot take `record`, as "'field' holds ..." for the first field it cannot take: a
    step that is not an integer, or a plotted metric that is neither a number nor null, or either out of its
    column's range (a step beyond 64 bits, an integer metric beyond a float's); None if it can take them all."""
    if curve_step(record) is None:
        return f"'step' holds {_problem('step', record.get('step'))}"
    field = next((key for key, _ in PANELS
                  if record.get(key) is not None and not _fits(record[key], (int, float), VALUE_TYPE)), None)
    return None if field is None else f"'{field}' holds {_problem(field, record[field])}"


def thinned(steps: np.ndarray, values: np.ndarray, points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """The series itself if it has at most `points` points; else the means of step and value over `points`
    runs of consecutive points, as equal in length as whole points allow."""
    if len(steps) <= points:
        return steps, values
    starts = np.arange(points, dtype=np.int64) * len(steps) // points
    counts = np.diff(np.append(starts, len(steps)))
    return np.add.reduceat(steps.astype(np.float64), starts) / counts, np.add.reduceat(values, starts) / counts


def plot_runs(runs: dict[str, Curves]) -> "Figure":
    """One panel per entry of PANELS; in each, one line per run labelled with its name.

    `runs` maps a label to that run's `Curves`. A panel no run has data for says so.
    """
    columns = -(-len(PANELS) // ROWS)
    quiet_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: every process imports this module, few draw
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    figure = Figure(figsize=(4 * columns, 7))
    # fixed margins: a constrained layout measured every label again on each draw, most of a plot's CPU time
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.94, wspace=0.25, hspace=0.22)
    FigureCanvasAgg(figure)
    axes = figure.subplots(ROWS, columns, sharex=True).ravel()
    for spare in axes[len(PANELS):]:
        spare.remove()
    axes = axes[:len(PANELS)]
    for ax, (key, title) in zip(axes, PANELS):
        ax.set_title(title, y=1.0)  # a fixed y: matplotlib would measure every tick label to place it
        ax.grid(alpha=0.3)
        drawn = False
        for label, curves in runs.items():
            steps, values = curves.series(key)
            if len(steps):
                style = dict(marker="o") if key in SPARSE_KEYS else dict(linewidth=0.9)
                ax.plot(*thinned(steps, values), label=label, **style)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[-columns:]:  # the bottom of each column
        ax.set_xlabel("step")
        ax.tick_params(labelbottom=True)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 600k, not 600000 run into its neighbours
    if len(runs) > 1:
        axes[0].legend(fontsize="small")
    return figure


def save_png(figure: "Figure", path: str | Path) -> Path:
    """Write `figure` to `path` as a PNG, atomically."""
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))

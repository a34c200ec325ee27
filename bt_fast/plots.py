"""Training curves of one or more runs as one matplotlib figure (Agg; no display or pyplot state).

Each panel plots one metric of metrics.jsonl against the step, one line per run, so the figure
a run writes as metrics.png and the overlay `tools.plot` writes are the same code.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold `key`, in log order."""
    pairs = [(record["step"], record[key]) for record in records if record.get(key) is not None]
    return [step for step, _ in pairs], [value for _, value in pairs]


def plot_runs(runs: dict[str, list[dict]]) -> "Figure":
    """One panel per entry of PANELS; in each, one line per run labelled with its name.

    `runs` maps a label to that run's metrics records. A panel no run has data for says so.
    """
    columns = -(-len(PANELS) // ROWS)
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: every process imports this module, few draw
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4 * columns, 7))
    # fixed margins: a constrained layout measured every label again on each draw, most of a plot's CPU time
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.94, wspace=0.25, hspace=0.22)
    FigureCanvasAgg(figure)
    axes = figure.subplots(ROWS, columns, sharex=True).ravel()
    for spare in axes[len(PANELS):]:
        spare.remove()
    axes = axes[:len(PANELS)]
    for ax, (key, title) in zip(axes, PANELS):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        drawn = False
        for label, records in runs.items():
            steps, values = series(records, key)
            if steps:
                style = dict(marker="o") if key in SPARSE_KEYS else dict(linewidth=0.9)
                ax.plot(steps, values, label=label, **style)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[-columns:]:  # the bottom of each column
        ax.set_xlabel("step")
        ax.tick_params(labelbottom=True)
    if len(runs) > 1:
        axes[0].legend(fontsize="small")
    return figure


def save_png(figure: "Figure", path: str | Path) -> Path:
    """Write `figure` to `path` as a PNG, atomically."""
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))

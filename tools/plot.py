"""Overlay the training curves of several runs in one PNG (the panels of each run's metrics.png).

    python -m tools.plot runs/demo runs/demo_reference --out compare.png

A RUN is a run's out_dir (holding metrics.jsonl) or a metrics.jsonl itself; each run's lines are
labelled with its directory name. A file that cannot be read, a file with no metrics records in it, or a
record whose step or plotted metric is not a number (or one out of range: a step beyond 64 bits), is refused
in one line naming the file (and the line and field). Lines that hold no record (edited in) are left out
with one warning naming the first; a torn last line (a killed writer's) is left out quietly.
"""
from __future__ import annotations

import sys
from pathlib import Path

from bt_fast.errors import CliParser, DataError, UserError, cli_errors, exit_on_interrupt, home_path, png_file

with exit_on_interrupt("while starting"):  # numpy; matplotlib comes with the first figure
    from bt_fast.plots import Curves, plot_runs, save_png, unplottable
    from bt_fast.metrics_file import METRICS_NAME, is_torn, lines_without_records, numbered_lines


def read_curves(file: Path) -> Curves:
    """The curves of one metrics.jsonl; a DataError naming the file if it holds no plotted metric or cannot
    be read (its permissions, a failing disk), or the file, line and field where a record's field is not a
    number."""
    curves, foreign = Curves(), []
    try:
        for number, line, record in numbered_lines(file):
            if record is None:
                if not is_torn(line):
                    foreign.append(number)
                continue
            reason = unplottable(record)
            if reason is not None:
                raise DataError(f"{file} line {number}: {reason}; give a {METRICS_NAME} that training wrote")
            curves.add(record)
    except OSError as err:
        raise DataError(f"cannot read {file} ({err.strerror or err}); make it readable or give another run") from None
    if curves.empty():
        raise DataError(f"{file} holds no metrics records (JSON objects of a step and its loss, one a line); "
                        f"give a run's out_dir or its {METRICS_NAME}")
    if foreign:
        print(f"warning: {lines_without_records(file, foreign)}; left out of the plot", file=sys.stderr)
    return curves


def load_runs(paths: list[Path]) -> dict[str, Curves]:
    """label -> the run's curves; the label is the run directory's name, or its path where names repeat."""
    files = [path / METRICS_NAME if path.is_dir() else path for path in paths]
    for path, file in zip(paths, files):
        if not file.is_file():
            raise UserError(f"run {path} has no {METRICS_NAME}; give a run's out_dir or its {METRICS_NAME}")
    resolved = [file.resolve() for file in files]
    again = next((path for path, file in zip(paths, resolved) if resolved.count(file) > 1), None)
    if again is not None:  # its curves would be drawn once, under one label
        raise UserError(f"run {again} is given twice; give each run once")
    names = [file.parent.name for file in files]
    labels = [name if names.count(name) == 1 else str(file.parent) for name, file in zip(names, files)]
    return {label: read_curves(file) for label, file in zip(labels, files)}


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m tools.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=home_path, metavar="RUN", help="a run's out_dir or its metrics.jsonl")
    parser.add_argument("--out", type=png_file, default="runs/compare.png",
                        help="PNG to write (a .png path; default %(default)s)")
    args = parser.parse_intermixed_args(argv)  # `RUN --out X RUN` too
    with cli_errors(), exit_on_interrupt():
        save_png(plot_runs(load_runs(args.runs)), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

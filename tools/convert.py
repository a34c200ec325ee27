"""Convert an ImageFolder or a `path label` list into an FFCV `.beton` or DALI webdataset shards.

    python -m tools.convert SRC DST --format ffcv|dali [--max-resolution N] [--jpeg-quality Q]
                            [--workers N] [--force] [--shard-size N (dali)] [--part-size N (ffcv)]

Run again with the same source and settings, a finished conversion is left as it is (exit 0); with another
source or setting, or once the source has changed, it is replaced only with `--force`. A conversion that is
stopped (Ctrl-C, SIGTERM, SIGHUP, SIGUSR1, kill -9, power loss) keeps its finished parts in `.DST.parts`; the
same command run again finishes the rest. Ctrl-C, SIGTERM, SIGHUP and SIGUSR1 end it with one line saying so,
exit 130, 143, 129 and 138 (the shell's status for each); one once DST is in place waits for the report and
says that DST is complete. `--shard-size` and `--part-size` belong to one format each; given with the other,
they are refused rather than ignored.

What is validated, skipped, converted and written is described in `pipelines.convert`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from bt_fast.errors import (CliParser, DataError, cli_errors, exit_on_interrupt, expand_home,
                            ignore_interrupts_while_exiting, option_flag)
from bt_fast.files import shared_memory_full

with exit_on_interrupt("while starting"):
    from pipelines.convert import (DEFAULT_PART_SIZE, DEFAULT_SHARD_SIZE, FORMATS, convert, kept_after_interrupt,
                                   outcome, stopped)
    from pipelines.images import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_RESOLUTION


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m tools.convert",
                       description="Convert an ImageFolder or '<path> <label>' list to FFCV .beton or DALI webdataset shards.")
    parser.add_argument("src", metavar="SRC", type=expand_home,
                        help="ImageFolder directory (not the root of train/ and val/: give its train/) or "
                             "'<path> <label>' list file (paths relative to its folder, or absolute)")
    parser.add_argument("dst", metavar="DST", type=expand_home, help="output .beton file (ffcv) or directory (dali)")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--max-resolution", type=int, default=DEFAULT_MAX_RESOLUTION,
                        help="cap on the longer image side in pixels (default %(default)s)")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                        help="JPEG quality for re-encoded images (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default and cap: the cores this process may use)")
    parser.add_argument("--force", action="store_true",
                        help="replace a previous output of tools.convert at DST and its report DST.report.json "
                             "(nothing else is ever replaced); without it, the same command again does nothing")
    for name, (fmt, default, what) in FORMAT_OPTIONS.items():  # None: not given (see `format_options`)
        parser.add_argument(option_flag(name), type=int, default=None, help=f"{what}, {fmt} only (default {default})")
    return parser


# The options of one format only: `convert` keyword -> (the format, its default, what it sets).
FORMAT_OPTIONS = {
    "shard_size": ("dali", DEFAULT_SHARD_SIZE, "samples per tar shard, also its resumable part"),
    "part_size": ("ffcv", DEFAULT_PART_SIZE, "images per resumable part"),
}


def format_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, int]:
    """`convert`'s keywords of `FORMAT_OPTIONS` from `args`, the defaults where not given. An option given
    with the other format is the parser's one-line error: it would be ignored without a word."""
    sizes = {}
    for name, (fmt, default, _) in FORMAT_OPTIONS.items():
        value = getattr(args, name)
        if value is not None and args.fmt != fmt:
            parser.error(f"{option_flag(name)} applies to --format {fmt} only, not {args.fmt}; leave it out")
        sizes[name] = default if value is None else value
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; 0 on success, SystemExit(2) with one `error:` line for unusable input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in (("SRC", args.src), ("DST", args.dst)):
        if not value:
            parser.error(f"{name} is empty (an unset shell variable?); give a path, '.' for the current directory")
    sizes = format_options(parser, args)
    with cli_errors():
        try:
            report = convert(args.src, args.dst, args.fmt, max_resolution=args.max_resolution,
                             jpeg_quality=args.jpeg_quality, workers=args.workers, force=args.force, **sizes)
        except OSError as err:
            if shared_memory_full(err):  # the worker pool's locks: cli_errors says so
                raise
            where = f" {err.filename}" if err.filename else ""
            raise DataError(f"cannot write output{where}: {err.strerror or err}") from None
        except KeyboardInterrupt as stop:  # Ctrl-C, or a stop signal (`StopSignal`)
            raise stopped(stop, f"; no output was written; {kept_after_interrupt(args.dst)}") from None
    print(outcome(report))
    return 0


if __name__ == "__main__":
    code = main()
    ignore_interrupts_while_exiting()
    sys.exit(code)

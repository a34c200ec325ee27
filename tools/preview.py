"""Render the view pairs a pipeline feeds the network, de-normalised, as one PNG.

    python -m tools.preview --config configs/demo_cpu.yaml --data data/demo/train --out views.png
    python -m tools.preview --config configs/demo_cpu.yaml --pipeline dali --data DIR --out views.png augment.image_size=160

Each row shows four pairs, view 1 then view 2: the first --pairs pairs that training on one process
feeds in epoch 0, in its batches of the config's batch_size (past the first batch when --pairs is
larger), in float32 (an autocast run rounds them to its dtype). key=value arguments override the config
as for `bt_fast.train`.
"""
from __future__ import annotations

from bt_fast.errors import STARTING, CliParser, UserError, cli_errors, exit_on_interrupt, expand_home, png_file

with exit_on_interrupt(STARTING):
    from bt_fast.config import load_config
    from bt_fast.distributed import resolve_device
    from bt_fast.preflight import check_data_given, check_not_a_split_root
    from pipelines.views import first_pairs, pair_grid, write_png


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m tools.preview", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, type=expand_home, help="YAML config (see configs/)")
    parser.add_argument("--pipeline", default=None, help="reference | ffcv | dali (default: the config's)")
    parser.add_argument("--data", default=None, help="ImageFolder to read (default: the config's data)")
    parser.add_argument("--pairs", type=int, default=8, help="number of view pairs (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    parser.add_argument("--out", type=png_file, default="views.png",
                        help="PNG to write (a .png path; default %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. augment.image_size=160")
    args = parser.parse_intermixed_args(argv)  # overrides before options too, as bt_fast.train takes them
    with cli_errors(), exit_on_interrupt():
        overrides = [f"{key}={value}" for key, value in (("pipeline", args.pipeline), ("data", args.data))
                     if value is not None]
        config = load_config(args.config, overrides + args.overrides, unique_keys=True)
        check_data_given(config)
        check_not_a_split_root(config)
        if args.pairs < 1:
            raise UserError(f"--pairs must be at least 1, got {args.pairs}")
        view1, view2 = first_pairs(config, resolve_device(args.device, setting="--device"), args.pairs)
        write_png(args.out, pair_grid(view1, view2, config.augment, args.pairs))
    print(f"wrote {args.out} ({args.pairs} pairs from the {config.pipeline} pipeline)")


if __name__ == "__main__":
    main()

"""The command line of `bt_fast.train`, read by the trainer and by `tools.launch`, which checks it once before
any rank starts and may not load the trainer to do so (torchvision and the pipelines double its start-up)."""
from __future__ import annotations

import argparse
import dataclasses

from bt_fast.config import BACKBONE_DIM, CHOICES, KEY_HELP, Config
from bt_fast.errors import CliParser, expand_home


def _config_keys(node=None, prefix: str = "") -> list[str]:
    """For --help: each config key with its default, then its allowed values and what it does."""
    from pipelines import PIPELINES  # the registry of names: it imports no pipeline
    node = node if node is not None else Config()
    registries = {"pipeline": PIPELINES, "arch": BACKBONE_DIM, **CHOICES}
    lines = []
    for field in dataclasses.fields(node):
        value, key = getattr(node, field.name), f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            lines += _config_keys(value, f"{key}.")
            continue
        allowed, what = KEY_HELP[key]
        allowed = allowed or " | ".join(registries[key])
        lines += [f"  {key} = {list(value) if isinstance(value, tuple) else value!r}", f"      {allowed}: {what}"]
    return lines


def train_parser() -> CliParser:
    parser = CliParser(
        prog="python -m bt_fast.train", description="Barlow Twins pretraining (resumes from <out_dir>/checkpoint.pth).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML file or as key=value, each once; default, then allowed values: meaning):\n" + "\n".join(_config_keys()))
    parser.add_argument("--config", default=None, type=expand_home, help="YAML config (see configs/)")
    parser.add_argument("--check", action="store_true",
                        help="only check the config, the paths it names and what the run asks of this machine (its "
                             "device, memory for a step, a compiler), then exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=10 augment.image_size=96")
    return parser


def parse_train_args(argv: list[str] | None) -> argparse.Namespace:
    """`argv` read as bt_fast.train reads it: options anywhere among the overrides, as make's ARGS puts them."""
    return train_parser().parse_intermixed_args(argv)

"""Run configuration: one dataclass, loaded from YAML and overridden with `key=value`.

Every pipeline reads the same `AugmentSpec`, so the reference, FFCV and DALI paths
cannot drift apart in what they randomise.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bt_fast.errors import UserError, unresolved_home

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_IMAGE_SIZE = 8  # the smallest crop whose blur kernel (3 taps) still fits its reflect padding
# The largest --image-size tools.evaluate and tools.bench take: about twice the largest evaluation crop of
# torchvision's pretrained weights (600 px, EfficientNet-B7), and the largest stored side the FFCV pipeline
# takes by default (ffcv.max_padded_side). Past it an ImageNet photograph (under 500 px a side on average)
# is only upsampled, and a batch of such images outgrows a DataLoader worker's memory. A config's
# augment.image_size is bounded by the memory check at start instead.
MAX_IMAGE_SIZE = 1024
SIZE_STEP = 32       # progressive resizing moves between multiples of this
MAX_SEED = 2**32 - 1  # the pipelines' generators keep 32 bits of a seed: past it two seeds give one run
MIN_BATCH_PER_RANK = 2  # BatchNorm's training statistics need more than one value per channel
# the supported archs, torchvision ResNets, by feature size; here, not in bt_fast.model, so that a run's
# checks (bt_fast.preflight) know the names without importing torchvision
BACKBONE_DIM = {"resnet18": 512, "resnet50": 2048}
PROJECTOR_WIDTHS = re.compile(r"[1-9][0-9]*(-[1-9][0-9]*)*")  # e.g. 8192-8192-8192


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class AugmentSpec:
    """The paper's two-view distortion, one field per knob.

    Pairs of numbers are (view 1, view 2) where the views differ (blur, solarize),
    or (low, high) for sampled ranges.

    Progressive resizing (off unless `start_image_size` is set): early epochs train on
    `start_image_size` crops and the last ones on `image_size`; `image_size_at` gives the
    size of each epoch and `at_epoch` the spec an epoch's pipeline uses.
    """

    image_size: int = 224
    start_image_size: int = 0                       # 0: no schedule, image_size in every epoch
    size_ramp: tuple[float, float] = (0.75, 0.875)  # where the size rises: fractions of the run (0 first epoch, 1 last)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: tuple[float, float] = (1.0, 0.1)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    solarize_threshold: float = 128 / 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # How the device distortions run, not what they are: auto (triton on CUDA, eager on the CPU) | eager
    # | compile (torch.compile of eager) | triton (fused kernels; on the CPU only under TRITON_INTERPRET=1)
    backend: str = "auto"

    @property
    def blur_kernel_size(self) -> int:
        """Odd kernel of about 10% of the image side: 23 at 224 px, as in the paper."""
        return max(3, int(round(self.image_size * 23 / 224)) | 1)

    @property
    def progressive(self) -> bool:
        return self.start_image_size > 0

    def image_size_at(self, epoch: int, epochs: int) -> int:
        """The crop side in `epoch` (counted from 0) of a run of `epochs` epochs.

        Without a schedule, `image_size`. With one, on the epoch axis 0 .. L (L = epochs - 1,
        the last epoch) the ramp runs from a = size_ramp[0] * L to b = size_ramp[1] * L:
        epochs e >= b use `image_size` (the last epoch always does), epochs e <= a use
        `start_image_size`, and those between use the straight line from start_image_size at a
        to image_size at b, rounded to the nearest multiple of SIZE_STEP (halves up) and kept
        within [start_image_size, image_size]. A pure function of its arguments, so a resumed
        run gets the sizes of an uninterrupted one.
        """
        if not self.progressive:
            return self.image_size
        begin, end = (fraction * (epochs - 1) for fraction in self.size_ramp)
        if epoch >= end:
            return self.image_size
        if epoch <= begin:
            return self.start_image_size
        linear = self.start_image_size + (self.image_size - self.start_image_size) * (epoch - begin) / (end - begin)
        rounded = SIZE_STEP * math.floor(linear / SIZE_STEP + 0.5)
        return min(max(rounded, self.start_image_size), self.image_size)

    def at_epoch(self, epoch: int, epochs: int) -> "AugmentSpec":
        """This spec with `image_size` set to the epoch's size (and no schedule): what a pipeline
        applies in that epoch; `blur_kernel_size` follows the size."""
        return dataclasses.replace(self, image_size=self.image_size_at(epoch, epochs), start_image_size=0)


@dataclass
class FFCVOptions:
    beton: str = ""              # empty: <data>.beton beside the ImageFolder; either converted on first use
    max_resolution: int = 512
    jpeg_quality: int = 90
    os_cache: bool = True
    order: str = "random"        # random | quasi_random
    decode: str = "host"         # host: libjpeg-turbo in FFCV's loader | device: TorchCodec decode_jpeg on the device
    crop: str = "auto"           # auto: device on CUDA, host on the CPU | device: batched resize on the device |
                                 # host: in FFCV's loader (only with decode=host)
    max_padded_side: int = 1024  # crop=device: largest stored height/width a .beton may pad every image to


@dataclass
class DALIOptions:
    records: str = ""            # empty: read the ImageFolder directly
    prefetch: int = 2


@dataclass
class Config:
    # data
    data: str = ""
    pipeline: str = "reference"  # reference | ffcv | dali
    workers: int = 8
    # model
    arch: str = "resnet50"
    projector: str = "8192-8192-8192"
    # optimisation (the paper's recipe)
    epochs: int = 1000
    batch_size: int = 2048       # global, across all ranks
    lambd: float = 0.0051
    lr_weights: float = 0.2
    lr_biases: float = 0.0048
    weight_decay: float = 1.5e-6
    warmup_epochs: int = 10
    compile_optimizer: bool = False
    compile_model: bool = False  # torch.compile the network (first steps compile)
    # execution
    device: str = "auto"         # auto | cpu | cuda
    amp: str = "auto"            # auto | bfloat16 | float16 | none (auto: bf16 on CPU, fp16 on CUDA)
    channels_last: bool = True
    seed: int = 0
    prefetch: int = 1            # batches whose device work (copy, crop, augmentation) runs ahead of the step (0: off)
    max_steps: int = 0           # stop after this many steps in total (0: run all epochs)
    # output
    out_dir: str = "runs/default"
    log_every: int = 10
    checkpoint_every: int = 0    # also checkpoint every N steps inside an epoch (0: at epoch ends only)
    knn_every: int = 0           # k-NN monitor every N epochs and after the last (0: off); needs knn_val
    knn_train: str = ""          # labelled ImageFolder for the k-NN memory bank (empty: `data`)
    knn_val: str = ""            # labelled ImageFolder of queries, with the same class sub-directories
    tensorboard: bool = False    # also write the metrics and a grid of view pairs to <out_dir>/tensorboard
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    ffcv: FFCVOptions = field(default_factory=FFCVOptions)
    dali: DALIOptions = field(default_factory=DALIOptions)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class UnparsedText(str):
    """A value as written, in a `key=value` override or as a plain (unquoted) scalar of a config file, parsed
    as YAML only where its key is not a string: `out_dir=010` and `out_dir: 010` name the folder 010, where
    YAML 1.1 reads 8 (an octal number), and `out_dir: 2024_06_01` would be 20240601."""


def _yaml_value(text: str) -> Any:
    """The YAML value `text` spells ("" for blank text); text that is no YAML value (`[1`, a `!!python` tag)
    stays text, which the key's type then refuses by name."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return str(text)


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Convert `value` to the type of the field's default, or fail naming the key."""
    written = str(value) if isinstance(value, UnparsedText) else value
    if isinstance(value, UnparsedText):
        if isinstance(current, str):  # a string key keeps its text: out_dir=010 stays "010"
            return str(value)
        value = _yaml_value(value)
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' expects true/false (or 1/0), got {value!r}")
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(current):
            raise ConfigError(f"config key '{key}' expects a list of {len(current)} numbers, got {value!r}")
        return tuple(_coerce(v, c, key) for v, c in zip(value, current))
    if isinstance(current, (int, float)):
        if isinstance(value, bool):  # YAML reads true, yes and on as True, which float() would take for 1
            raise ConfigError(f"config key '{key}' expects a number, got {written!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
        except OverflowError:  # an integer beyond a float's range (about 1.8e308), as 1e400 is `inf`
            raise ConfigError(f"config key '{key}' must be a finite number, got an integer beyond a float's "
                              f"range (about 1.8e308)") from None
        if isinstance(current, int):
            if not math.isfinite(number) or number != int(number):
                raise ConfigError(f"config key '{key}' expects a whole number, got {value!r}")
            return int(number)
        return number
    if isinstance(current, str):
        if isinstance(value, (list, dict)):
            raise ConfigError(f"config key '{key}' expects text (one path or name), got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"config key '{key}' has an unsupported value {value!r}")


def _apply(target: Any, values: dict[str, Any], prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)  # YAML keys may be numbers or booleans
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if isinstance(value, UnparsedText) and not value.strip():  # `augment:` with every line commented out
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give '{key}.<field>=...'")
            _apply(current, value, prefix=f"{key}.")
        else:
            setattr(target, name, _coerce(value, current, key))


def parse_overrides(pairs: list[str], unique_keys: bool = False) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> {'a': {'b': '1'}, 'c': 'x'}; values stay text until their key's type is known.

    A key given twice is a ConfigError with `unique_keys` (a command line: `epochs=1 epochs=7` is a
    mistake); otherwise the last value wins (settings that programs layer over their defaults).
    """
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' is not of the form key=value")
        dotted, raw = pair.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node = tree
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parents[:depth + 1])
                raise ConfigError(f"override '{pair}' sets a field of '{section}', which another override "
                                  f"sets to a value; give each key once")
        if unique_keys and leaf in node and not isinstance(node[leaf], dict):
            raise ConfigError(f"config key '{dotted.strip()}' is given twice ({dotted.strip()}={node[leaf]}, "
                              f"{pair.strip()}); give each key once")
        if isinstance(node.get(leaf), dict):
            raise ConfigError(f"override '{pair}' sets '{dotted.strip()}' to a value, but other overrides set "
                              f"fields inside it; give each key once")
        node[leaf] = UnparsedText(raw)
    return tree


class _DuplicateKey(yaml.YAMLError):
    pass


# The tags YAML's implicit resolution gives a plain scalar (an explicit `!!python/...` tag stays refused).
_PLAIN_SCALAR_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "timestamp", "str")}


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, except that each plain scalar stays its text (`UnparsedText`) until its key's
    type is known, and a key given twice in one mapping is refused (PyYAML keeps the last)."""

    def construct_object(self, node, deep=False):
        if isinstance(node, yaml.ScalarNode) and node.style is None and node.tag in _PLAIN_SCALAR_TAGS:
            return UnparsedText(node.value)
        return super().construct_object(node, deep)

    def construct_mapping(self, node, deep=False):
        lines: dict[str, int] = {}  # key -> the line it was first given on
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if isinstance(key, str) and key in lines:
                raise _DuplicateKey(f"key '{key}' is given twice (lines {lines[key]} and {line})")
            if isinstance(key, str):
                lines[key] = line
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What PyYAML found wrong, after its context where it gives one, and where (line and column counted
    from 1), on one line; its message's first line is only the context ("while scanning for the next token")."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if not problem:
        return str(err).splitlines()[0]
    context = getattr(err, "context", None)
    text = f"{context}, {problem}" if context else problem
    return f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark else text


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, unique_keys: bool = False) -> Config:
    """The defaults, then the YAML file at `path`, then `overrides` (`parse_overrides`), validated."""
    config = Config()
    if isinstance(path, str) and not path.strip():  # `--config "$CONFIG"` with the variable unset: not the defaults
        raise ConfigError("the config file's name is empty (an unset shell variable?); give a YAML file (see "
                          "configs/), or no --config for the defaults")
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} {'is a directory' if path.is_dir() else 'does not exist'}; "
                              f"give a YAML file (see configs/)")
        try:
            values = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text; give a YAML file (see configs/)") from None
        except _DuplicateKey as err:
            raise ConfigError(f"config file {path}: {err}; give each key once") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        _apply(config, values)
    _apply(config, parse_overrides(overrides or [], unique_keys))
    _expand_home(config)
    validate(config)
    return config


# The keys that name a file or a directory.
PATH_KEYS = ("data", "out_dir", "knn_train", "knn_val", "ffcv.beton", "dali.records")


def _expand_home(config: Config) -> None:
    """A leading `~` of a path key is the home directory, as the shell reads it: in a config file or a quoted
    override the shell never sees it, and `out_dir: ~/runs/x` wrote the run into a directory named `~`. Where
    the home is unknown (no $HOME and no passwd entry), os.path.expanduser leaves the `~`: a ConfigError."""
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        node = getattr(config, section) if section else config
        value = os.path.expanduser(getattr(node, name))
        problem = unresolved_home(value)
        if problem:
            raise ConfigError(f"config key '{key}' starts with {problem}")
        setattr(node, name, value)


# The names this module checks; `pipeline` and `arch` are checked by their registries.
CHOICES = {"amp": ("auto", "bfloat16", "float16", "none"), "device": ("auto", "cpu", "cuda"),
           "ffcv.order": ("random", "quasi_random"), "ffcv.decode": ("host", "device"),
           "ffcv.crop": ("auto", "device", "host"), "augment.backend": ("auto", "eager", "compile", "triton")}

_POSITIVE, _NON_NEGATIVE, _PAIR = "a positive whole number", "0 or a positive number", "[view 1, view 2]"
_PROBABILITY, _PROBABILITIES = "a probability in [0, 1]", "[view 1, view 2] probabilities in [0, 1]"

# `python -m bt_fast.train --help`: config key -> (allowed values, what it does). Keys with CHOICES or a
# registry get their names from there (allowed None).
KEY_HELP: dict[str, tuple[str | None, str]] = {
    "data": ("a directory or a .beton", "the ImageFolder to train on (DATA= with make)"),
    "pipeline": (None, "the data pipeline (README, Pipelines)"),
    "workers": ("0 or a positive whole number", "host worker processes or threads of the pipeline, reference and ffcv "
                "at most the usable cores (0: reference in the training process, ffcv on every usable core, dali on "
                "one thread)"),
    "arch": (None, "the torchvision ResNet backbone"),
    "projector": ("widths joined by '-'", "the projector's layer widths, e.g. 8192-8192-8192"),
    "epochs": (_POSITIVE, "epochs to train; the learning-rate schedule spans them"),
    "batch_size": ("a whole number >= 2 per rank", "the global batch, split evenly across the ranks"),
    "lambd": (_NON_NEGATIVE, "weight of the loss's off-diagonal (redundancy) term"),
    "lr_weights": (_NON_NEGATIVE, "LARS learning rate of the weights at batch 256 (scaled by batch_size/256)"),
    "lr_biases": (_NON_NEGATIVE, "LARS learning rate of biases and norms at batch 256"),
    "weight_decay": (_NON_NEGATIVE, "LARS weight decay (not on biases and norms)"),
    "warmup_epochs": ("0 or a positive whole number (at or above epochs: a warning)",
                      "epochs of linear learning-rate warm-up"),
    "compile_optimizer": ("true or false", "fuse the LARS step with torch.compile"),
    "compile_model": ("true or false", "torch.compile the network (the first steps compile)"),
    "device": (None, "where to train; auto takes a GPU when one is visible"),
    "amp": (None, "autocast dtype; auto is bfloat16 on the CPU and float16 (GradScaler) on CUDA"),
    "channels_last": ("true or false", "channels-last memory format for the network and its inputs"),
    "seed": ("0 to 4294967295", "seed of the initial weights and of every random choice of the pipeline"),
    "prefetch": ("0 or a positive whole number", "batches whose device work runs ahead of the step (0: off)"),
    "max_steps": ("0 or a positive whole number", "stop after this many steps in total (0: all epochs)"),
    "out_dir": ("a directory", "where checkpoints, metrics and the summary go (OUT= with make); one run each"),
    "log_every": (_POSITIVE, "steps between flushes of metrics.jsonl"),
    "checkpoint_every": ("0 or a positive whole number", "also checkpoint every N steps inside an epoch (0: off)"),
    "knn_every": ("0 or a positive whole number", "k-NN monitor every N epochs and after the last (0: off)"),
    "knn_train": ("a directory, or empty", "labelled ImageFolder of the k-NN memory bank (empty: data)"),
    "knn_val": ("a directory, or empty", "labelled ImageFolder of k-NN queries, with data's classes"),
    "tensorboard": ("true or false", "also write TensorBoard events and a grid of view pairs"),
    "augment.image_size": (f"a whole number >= {MIN_IMAGE_SIZE} that fits in memory", "side of the crops, px"),
    "augment.start_image_size": (f"0, or {MIN_IMAGE_SIZE} to augment.image_size",
                                 "first side of progressive resizing (0: off)"),
    "augment.size_ramp": ("[start, end] fractions, 0 <= start <= end <= 1",
                          "where progressive resizing rises, as fractions of the run"),
    "augment.crop_scale": ("[low, high] with 0 < low <= high <= 1", "area range of the random resized crop"),
    "augment.crop_ratio": ("[low, high] with 0 < low <= high", "aspect-ratio range of the random resized crop"),
    "augment.flip_p": (_PROBABILITY, "horizontal flip"),
    "augment.jitter_p": (_PROBABILITY, "colour jitter"),
    "augment.brightness": (_NON_NEGATIVE, "colour jitter's brightness strength"),
    "augment.contrast": (_NON_NEGATIVE, "colour jitter's contrast strength"),
    "augment.saturation": (_NON_NEGATIVE, "colour jitter's saturation strength"),
    "augment.hue": ("a number in [0, 0.5]", "colour jitter's hue strength"),
    "augment.grayscale_p": (_PROBABILITY, "conversion to grayscale"),
    "augment.blur_sigma": ("[low, high] with 0 < low <= high", "Gaussian blur's sigma range"),
    "augment.blur_p": (_PROBABILITIES, "Gaussian blur, per view"),
    "augment.solarize_p": (_PROBABILITIES, "solarization, per view"),
    "augment.solarize_threshold": ("a number in [0, 1]", "solarization threshold, as a fraction of 255"),
    "augment.mean": ("3 numbers", "per-channel mean subtracted after the distortions"),
    "augment.std": ("3 positive numbers", "per-channel standard deviation divided by after the distortions"),
    "augment.backend": (None, "how the device distortions run (not what they are)"),
    "ffcv.beton": ("a .beton file, or empty", "the FFCV dataset (empty: <data>.beton); converted there from data on "
                                              "first use where it does not exist"),
    "ffcv.max_resolution": (_POSITIVE, "longest side a first-use conversion stores, px"),
    "ffcv.jpeg_quality": ("1 to 100", "JPEG quality of a first-use conversion"),
    "ffcv.os_cache": ("true or false", "read the .beton through the OS page cache (false: FFCV's own)"),
    "ffcv.order": (None, "FFCV's sample order within an epoch"),
    "ffcv.decode": (None, "where JPEGs are decoded"),
    "ffcv.crop": (None, "where the random resized crops are cut; auto: device on CUDA, host on the CPU "
                   "(device with decode=device or a resolution schedule)"),
    "ffcv.max_padded_side": (_POSITIVE, "largest stored height or width a .beton may pad every image to (crop=device)"),
    "dali.records": ("a directory, or empty", "shards from `tools.convert --format dali` (empty: read data)"),
    "dali.prefetch": (_POSITIVE, "batches DALI prepares ahead"),
}


def check_choice(key: str, value: str, choices) -> None:
    """Raise a ConfigError naming `key` unless `value` is one of `choices` (a registry's names)."""
    if value in choices:
        return
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}, got '{value}'{hint}")


def _require(condition: bool, key: str, expectation: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' must be {expectation}, got {value!r}")


def _check_range(key: str, pair: tuple[float, float], low: float, high: float | None = None) -> None:
    """A (low, high) pair with `low` < pair[0] <= pair[1] (<= `high`)."""
    ok = low < pair[0] <= pair[1] and (high is None or pair[1] <= high)
    bound = f" <= {high:g}" if high is not None else ""
    _require(ok, key, f"a [low, high] pair with {low:g} < low <= high{bound}", list(pair))


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every number in the config is finite: YAML reads .inf and .nan, and float('inf') passes `>= 0`."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
            continue
        numbers = value if isinstance(value, tuple) else (value,)
        _require(all(math.isfinite(v) for v in numbers if isinstance(v, float)), f"{prefix}{f.name}",
                 "a finite number", list(value) if isinstance(value, tuple) else value)


def validate(config: Config) -> None:
    """Checks of the values this module owns; names such as `pipeline` and `arch` are checked by
    their registries (`pipelines.PIPELINES`, `BACKBONE_DIM`) when they are built, and by
    `bt_fast.preflight` before a run."""
    for key, choices in CHOICES.items():
        section, _, name = key.rpartition(".")
        check_choice(key, getattr(getattr(config, section) if section else config, name), choices)
    _require(config.ffcv.crop != "host" or config.ffcv.decode == "host", "ffcv.crop",
             "device when ffcv.decode=device (the host never sees decoded pixels)", config.ffcv.crop)
    _check_finite(config)
    _require(config.batch_size >= MIN_BATCH_PER_RANK, "batch_size",
             f"at least {MIN_BATCH_PER_RANK} (BatchNorm needs {MIN_BATCH_PER_RANK} images per rank)", config.batch_size)
    for key in ("epochs", "log_every"):
        _require(getattr(config, key) > 0, key, "positive", getattr(config, key))
    for key in ("checkpoint_every", "knn_every", "max_steps", "workers", "prefetch", "warmup_epochs", "lr_weights",
                "lr_biases", "weight_decay", "lambd"):
        _require(getattr(config, key) >= 0, key, "0 or positive", getattr(config, key))
    _require(bool(PROJECTOR_WIDTHS.fullmatch(config.projector)), "projector",
             "layer widths joined by '-', e.g. 8192-8192-8192", config.projector)
    _require(0 <= config.seed <= MAX_SEED, "seed", "an integer in 0..4294967295 (the pipelines' generators take 32 bits)",
             config.seed)
    _require(bool(config.out_dir.strip()), "out_dir", "a directory", config.out_dir)
    _require(config.ffcv.max_resolution > 0, "ffcv.max_resolution", "positive", config.ffcv.max_resolution)
    _require(config.ffcv.max_padded_side > 0, "ffcv.max_padded_side", "positive", config.ffcv.max_padded_side)
    _require(config.dali.prefetch > 0, "dali.prefetch", "positive", config.dali.prefetch)
    _require(1 <= config.ffcv.jpeg_quality <= 100, "ffcv.jpeg_quality", "1..100", config.ffcv.jpeg_quality)
    spec = config.augment
    _require(spec.image_size >= MIN_IMAGE_SIZE, "augment.image_size", f"at least {MIN_IMAGE_SIZE} pixels",
             spec.image_size)
    _require(spec.start_image_size == 0 or MIN_IMAGE_SIZE <= spec.start_image_size <= spec.image_size,
             "augment.start_image_size", f"0 (no resolution schedule) or {MIN_IMAGE_SIZE} to augment.image_size "
             f"({spec.image_size}) pixels", spec.start_image_size)
    _require(0.0 <= spec.size_ramp[0] <= spec.size_ramp[1] <= 1.0, "augment.size_ramp",
             "a [start, end] pair of fractions of the epochs with 0 <= start <= end <= 1", list(spec.size_ramp))
    _check_range("augment.crop_scale", spec.crop_scale, 0.0, 1.0)
    _check_range("augment.crop_ratio", spec.crop_ratio, 0.0)
    _check_range("augment.blur_sigma", spec.blur_sigma, 0.0)
    for name in ("brightness", "contrast", "saturation"):
        _require(getattr(spec, name) >= 0, f"augment.{name}", "0 or positive", getattr(spec, name))
    _require(0 <= spec.hue <= 0.5, "augment.hue", "in [0, 0.5]", spec.hue)
    _require(0 <= spec.solarize_threshold <= 1, "augment.solarize_threshold", "in [0, 1]", spec.solarize_threshold)
    _require(all(s > 0 for s in spec.std), "augment.std", "positive", list(spec.std))
    for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        value = getattr(spec, key)
        _require(all(0.0 <= p <= 1.0 for p in (value if isinstance(value, tuple) else (value,))),
                 f"augment.{key}", "probabilities in [0, 1]", value)

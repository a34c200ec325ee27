"""A run's inputs and its out_dir's previous run, checked before anything is built.

`bt_fast.train` runs these checks on every rank, and `tools.launch` once before it starts any,
so a wrong name or path, or a forbidden rerun, is one line, not one per rank and restart. This module
imports neither torchvision nor any pipeline, which would double the launcher's start-up (only, where a check
needs them, the listing and naming helpers of `pipelines.image_folder` and `pipelines.ffcv_format`).
"""
from __future__ import annotations

import os
from pathlib import Path

from bt_fast.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from bt_fast.config import BACKBONE_DIM, MIN_BATCH_PER_RANK, PATH_KEYS, Config, ConfigError, check_choice
from bt_fast.errors import DataError
from bt_fast.files import check_writable_directory, same_file
from bt_fast.run_lock import check_unlocked

# Keys that may change between a run and its resume without changing what it computes.
RESUMABLE_KEYS = {"max_steps", "out_dir", "log_every", "checkpoint_every", "knn_every", "knn_train", "knn_val",
                  "tensorboard", "workers", "device", "compile_model", "compile_optimizer", "ffcv.beton",
                  "ffcv.os_cache", "dali.prefetch", "prefetch", "augment.backend"}


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'key old -> new' for the settings of `current` that differ from a checkpoint's `saved` config; a path
    (PATH_KEYS) differs only if it names another file or directory."""
    old, new = _flatten(saved), _flatten(current)
    return [f"{key} {old[key]!r} -> {new[key]!r}" for key in sorted(old.keys() & new.keys())
            if key not in RESUMABLE_KEYS and old[key] != new[key]
            and not (key in PATH_KEYS and isinstance(old[key], str) and old[key] and new[key]
                     and same_file(old[key], new[key]))]


# Settings a finished run may be rerun with although they change what it computes: more epochs extend it.
EXTENDING_KEYS = ("epochs",)


def schedule_steps(state: dict, steps_per_epoch: int | None = None) -> int | None:
    """The steps of all the epochs of the run that wrote checkpoint `state`: recorded since
    `schedule_steps` was, otherwise (older checkpoints) its epochs x `steps_per_epoch`, or None."""
    if "schedule_steps" in state:
        return state["schedule_steps"]
    return state.get("config", {}).get("epochs", 0) * steps_per_epoch if steps_per_epoch else None


def refuse_changed_finished_run(out_dir: Path, state: dict, changed: list[str], schedule: int | None) -> None:
    """A CheckpointError if checkpoint `state` finished its run (trained all `schedule` steps of its
    epochs) and `changed` (from `changed_settings`) holds a setting other than EXTENDING_KEYS: such a
    rerun would describe, in a finished run's files, a run it never was. A run paused by max_steps
    or a stop may resume with changes (the caller warns)."""
    if schedule is None or state.get("step", 0) < schedule:
        return
    different = [change for change in changed if change.split(" ", 1)[0] not in EXTENDING_KEYS]
    if different:
        raise CheckpointError(f"{out_dir} holds a finished run ({state['step']} steps) that this command would "
                              f"change ({'; '.join(different)}); choose a new OUT= (out_dir=) for a new run, or "
                              f"rerun with the run's own settings (raising epochs extends it)")


# What a resume restores from checkpoint.pth (`bt_fast.trainer.Trainer`).
RESUMED_STATE = ("model", "optimizer", "scaler", "rng", "step")


def refuse_foreign_checkpoint(path: Path, state: object) -> None:
    """A CheckpointError unless `state`, checkpoint `path` as loaded, holds RESUMED_STATE: a state dict (such as
    a backbone.pth copied there) or another program's file would otherwise fail deep inside the resume."""
    missing = [key for key in RESUMED_STATE if key not in state] if isinstance(state, dict) else list(RESUMED_STATE)
    if missing:
        raise CheckpointError(f"checkpoint {path} is no bt_fast training checkpoint (it holds no "
                              f"{', '.join(missing)}); move it out of {path.parent} to start afresh there, or "
                              f"choose another out_dir")


def refuse_other_model_or_batch(path: Path, saved: dict, config: Config) -> None:
    """A CheckpointError if `config` trains another batch_size, arch or projector than `saved`, the config of the
    run that wrote checkpoint `path`: no resume can take its weights and optimizer state."""
    if saved.get("batch_size") != config.batch_size:
        raise CheckpointError(f"checkpoint {path} was written with batch_size {saved.get('batch_size')}, this run "
                              f"uses {config.batch_size}; use a new out_dir or the same batch size")
    changed = [f"{key} {saved[key]!r} -> {getattr(config, key)!r}" for key in ("arch", "projector")
               if key in saved and saved[key] != getattr(config, key)]
    if changed:
        raise CheckpointError(f"checkpoint {path} was written for a different model ({', '.join(changed)}); "
                              f"use a new out_dir or the matching arch/projector")


def check_previous_run(config: Config) -> None:
    """Before anything is built (a first-use conversion can take hours): a checkpoint in out_dir must be
    readable (its zip directory, read with mmap) and a training checkpoint, a finished run may not be
    rerun with other settings, and no run with another model or batch size."""
    path = Path(config.out_dir) / CHECKPOINT_NAME
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, where the run would write its checkpoint; "
                              f"move it out of {path.parent}, or choose another out_dir")
    if path.is_file():
        state = load_checkpoint(path, mmap=True)
        refuse_foreign_checkpoint(path, state)
        refuse_changed_finished_run(Path(config.out_dir), state,
                                    changed_settings(state.get("config", {}), config.to_dict()), schedule_steps(state))
        refuse_other_model_or_batch(path, state.get("config", {}), config)


def _reads_dali_records(config: Config) -> bool:
    """Whether the run reads the DALI pipeline's own dataset, records (`dali.records`, or `data` naming them),
    and not an ImageFolder."""
    if config.pipeline != "dali":
        return False
    from pipelines.dali_format import names_records
    return bool(config.dali.records) or bool(config.data) and names_records(config.data)


def check_data_given(config: Config) -> None:
    """A ConfigError unless the config names a dataset for its pipeline."""
    own_dataset = (config.pipeline == "ffcv" and config.ffcv.beton) or _reads_dali_records(config)
    if not config.data and not own_dataset:
        raise ConfigError("config key 'data' is required: data=/path/to/ImageFolder (with make: DATA=...; "
                          "`make pretrain` without DATA trains on the demo data)")


def check_data_exists(config: Config) -> None:
    """A ConfigError if `data` names nothing and the pipeline has no dataset of its own to read instead
    (ffcv: an existing .beton, `pipelines.ffcv_format.beton_path`; dali: `dali.records`). Checked before
    out_dir's previous run, whose refusal would otherwise name the typo as a change of data."""
    if not config.data or Path(config.data).exists():
        return
    if _reads_dali_records(config):
        return
    if config.pipeline == "ffcv":
        from pipelines.ffcv_format import beton_path
        if beton_path(config).is_file():
            return
    raise ConfigError(f"config key 'data' names {config.data}, which does not exist; give an ImageFolder that exists "
                      f"(with make: DATA=...; `make pretrain` without DATA trains on the demo data)")


def check_ffcv_dataset(config: Config) -> None:
    """The DataError the ffcv pipeline raises before its first batch (`pipelines.ffcv.ensure_beton`), where the .beton
    it reads, beside `data` or at `ffcv.beton`, is a directory, or is missing with no `data` to convert; and those of
    its first-use conversion: a .beton it cannot write there (a read-only dataset folder), or a list file `data`
    whose lines are not `<path> <label>` (read through, as the conversion reads it)."""
    if config.pipeline != "ffcv":
        return
    from pipelines.ffcv_format import beton_is_a_directory, beton_path, missing_beton, unwritable_beton
    path = beton_path(config)
    if path.is_dir():
        raise beton_is_a_directory(path)
    if path.exists():
        return
    if not config.data:
        raise missing_beton(path)
    if not Path(config.data).exists():
        return  # check_data_exists names it
    try:
        check_writable_directory(path.parent)
    except OSError as err:
        raise unwritable_beton(path, config.data, err) from None
    if Path(config.data).is_file():
        from pipelines.convert import read_list_file
        read_list_file(Path(config.data))


def check_not_a_split_root(config: Config) -> None:
    """A ConfigError if `data` holds train/ and val/ folders (a split dataset's root, which tools.evaluate takes
    as such): pretraining would read the two splits as two classes, the validation images among them."""
    from pipelines.image_folder import is_split_root
    data = Path(config.data) if config.data else None
    if data is not None and is_split_root(data):
        raise ConfigError(f"config key 'data' names {data}, which holds train/ and val/: pretraining would read both "
                          f"splits as two classes; give data={data / 'train'}")


def check_data_has_images(config: Config) -> None:
    """The DataError the pipeline would raise once started, where `data` is a file it would list as an ImageFolder
    (all but the ffcv pipeline, which reads a .beton or converts a list file named there: `check_ffcv_dataset`) or a
    directory without an image in a class directory (`--check` and the launcher passed both). Lists class folders
    only until it finds an image: not ImageNet."""
    from pipelines.image_folder import count_images, image_folder_root
    data = Path(config.data) if config.data and not _reads_dali_records(config) else None
    if data is not None and data.is_file() and config.pipeline != "ffcv":
        image_folder_root(data)
    if data is not None and data.is_dir():
        count_images(data, enough=1)


def check_out_dir_outside_the_data(config: Config) -> None:
    """A ConfigError if `out_dir` is, or lies inside, an image folder the run reads (`data`, `knn_train`,
    `knn_val`): its checkpoints, plots and logs would be listed as that dataset's images and classes."""
    out_dir = Path(config.out_dir).resolve()
    for key in ("data", "knn_train", "knn_val"):
        folder = getattr(config, key)
        if folder and Path(folder).is_dir() and out_dir.is_relative_to(Path(folder).resolve()):
            raise ConfigError(f"config key 'out_dir' ({config.out_dir}) is within config key '{key}' ({folder}): "
                              f"the run's files would become part of that dataset; choose an out_dir outside it")


def check_knn_folders(config: Config) -> None:
    """The refusals of the run's k-NN monitor (`bt_fast.knn.KnnMonitor`), which rank 0 builds only once the data is
    ready, after a first-use conversion that may take hours: a folder that is not a directory, and a `knn_val`
    without labelled images or with a class its memory bank (`knn_train`, or `data`) lacks. Lists `knn_val`
    (small by design) and, of the memory bank (ImageNet's training set, perhaps), only its class names."""
    for key in ("knn_train", "knn_val"):
        path = getattr(config, key)
        if path and not Path(path).is_dir():
            raise ConfigError(f"config key '{key}' names {path}, which is not a directory; point it at a labelled "
                              f"ImageFolder or leave it empty")
    if not config.knn_every or not config.knn_val or int(os.environ.get("RANK", "0")) != 0:
        return
    if not config.knn_train and not (config.data and Path(config.data).is_dir()):
        raise ConfigError(f"config key 'knn_val' needs knn_train=<a labelled ImageFolder> here: the k-NN monitor's "
                          f"memory bank is data= by default, and data= names {config.data or 'nothing'}, not an "
                          f"ImageFolder")
    from pipelines.image_folder import check_known_classes, class_names, find_image_folder
    try:
        classes, _ = find_image_folder(config.knn_val)
    except DataError as err:  # its words are of any image folder: name the key
        raise DataError(f"config key 'knn_val': {err}") from None
    check_known_classes(config.knn_val, classes, class_names(config.knn_train or config.data))


def check_registry_names(config: Config) -> None:
    """A ConfigError unless `arch` and `pipeline` name a backbone and a pipeline that exist: the launcher's
    check passed them on to every rank, to fail there once per restart."""
    from pipelines import PIPELINES  # the registry of names: it imports no pipeline
    check_choice("pipeline", config.pipeline, PIPELINES)
    check_choice("arch", config.arch, BACKBONE_DIM)


def check_dali_records(config: Config) -> None:
    """A ConfigError unless `dali.records`, where the dali pipeline reads it, holds the dataset.json that
    `tools.convert --format dali` writes (`pipelines.dali_format`)."""
    records = config.dali.records
    if config.pipeline == "dali" and records and not (Path(records) / "dataset.json").is_file():
        raise ConfigError(f"config key 'dali.records' names {records}, which holds no dataset.json; write the "
                          f"records with `python -m tools.convert SRC {records} --format dali` or leave it empty")


def check_batch_split(batch_size: int, world_size: int) -> None:
    """A ConfigError unless the global `batch_size` splits evenly into at least MIN_BATCH_PER_RANK images for
    each of `world_size` ranks. The launcher checks it once, before any rank starts."""
    if batch_size % world_size:
        raise ConfigError(f"config key 'batch_size' ({batch_size}) must be divisible by the world size ({world_size})")
    if batch_size // world_size < MIN_BATCH_PER_RANK:
        raise ConfigError(f"config key 'batch_size' ({batch_size}) gives {batch_size // world_size} image per rank "
                          f"over {world_size} ranks; BatchNorm needs at least {MIN_BATCH_PER_RANK} per rank: use "
                          f"batch_size >= {MIN_BATCH_PER_RANK * world_size}")


def check_run_inputs(config: Config) -> None:
    """The names of the arch and pipeline, and what a run needs from the file system, checked before anything
    is built (one ConfigError each); creates nothing."""
    check_registry_names(config)
    check_data_given(config)
    check_data_exists(config)
    check_not_a_split_root(config)
    check_data_has_images(config)
    check_ffcv_dataset(config)
    check_dali_records(config)
    check_knn_folders(config)
    check_out_dir_outside_the_data(config)
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"config key 'out_dir' names {out_dir}, which is a file; choose a directory")
    try:
        check_writable_directory(out_dir)
    except OSError as err:
        raise ConfigError(f"config key 'out_dir' names {out_dir}, which is not writable "
                          f"({err.strerror or err}); choose another out_dir") from None
    if int(os.environ.get("RANK", "0")) == 0:  # the lock's holder: the other ranks of this run find it held by rank 0
        check_unlocked(out_dir)
    check_previous_run(config)  # here too, so that the launcher refuses once, not once per restart
    if config.tensorboard:
        tensorboard_writer_class()


def check_passed(config: Config, machine: bool) -> str:
    """What `--check` prints when nothing stops the run (silence read as if nothing had been checked); `machine`:
    this machine's device and memory were checked too, not only the config and its paths (the launcher's check)."""
    checked = "nothing stops this run before its first step" if machine else (
        "the config and its paths are fine (each rank checks its device and memory as it starts)")
    return (f"check passed: {checked}; pipeline {config.pipeline}, data {config.data or '-'}, out_dir "
            f"{config.out_dir}; nothing was created")


def tensorboard_writer_class() -> type:
    """torch's SummaryWriter, or a ConfigError naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("config key 'tensorboard' is true, but the package 'tensorboard' is not installed: "
                          "pip install tensorboard (requirements.txt pins it) or set tensorboard=false") from None
    return SummaryWriter

"""Frozen-evaluation backbones: read out of saved weights, or freshly initialised as a baseline.

`load_backbone(path)` accepts
- a bt_fast `checkpoint.pth` (the `backbone.*` weights of its `model`; arch and image size from its `config`,
  and how far its run had come: `bt_fast.checkpoint.saved_progress`),
- a bt_fast `backbone.pth` (a plain torchvision state dict; arch from its keys, training image size
  from the run's `config.yaml` or `checkpoint.pth` beside it),
- any torchvision-style ResNet state dict, such as the official Barlow Twins `resnet50.pth`
  (no `fc.*`; an `fc.*` present is ignored), or a checkpoint holding one under `model` or `state_dict`.

`module.` and `_orig_mod.` prefixes (DDP, torch.compile) are stripped, so the official training
`checkpoint.pth` loads too. Without an explicit arch it comes from the bt_fast config, else from
the keys. Every unusable file raises a `CheckpointError` that names it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import yaml

from bt_fast.checkpoint import (BACKBONE_NAME, CHECKPOINT_NAME, CUT_SHORT, CheckpointError, Progress, cut_short,
                                load_weights_only, not_torch_saved, previous_path, saved_progress)
from bt_fast.config import check_choice
from bt_fast.errors import flat_message
from bt_fast.model import BACKBONE_DIM, make_backbone

STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_WHAT_TO_PASS = "pass a bt_fast checkpoint.pth/backbone.pth or a ResNet state dict"


@dataclass
class LoadedBackbone:
    backbone: nn.Module          # fc replaced by Identity: forward gives the (N, BACKBONE_DIM[arch]) features
    arch: str
    kind: str                    # "bt_fast checkpoint", "checkpoint" or "state dict"
    image_size: int | None       # training image size from the file's config or its run's (see run_config)
    progress: Progress | None = None  # how far its pretraining run had come, where the file records it


def strip_prefixes(key: str) -> str:
    """`key` without any leading wrapper prefixes, in any order and number."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def backbone_state(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    """(backbone state dict without fc, kind, bt_fast config or None) from whatever torch.load returned."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict; {_WHAT_TO_PASS}")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
    if isinstance(obj.get("model"), dict):
        state, kind = obj["model"], "bt_fast checkpoint" if config is not None else "checkpoint"
    elif isinstance(obj.get("state_dict"), dict):
        state, kind = obj["state_dict"], "checkpoint"
    else:
        state, kind = obj, "state dict"
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is not a model state dict (key '{bad}' holds a "
                              f"{type(state[bad]).__name__}); {_WHAT_TO_PASS}")
    state = {strip_prefixes(k): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" not in state:
        raise CheckpointError(f"checkpoint {path} holds no ResNet backbone weights (no 'conv1.weight' or "
                              f"'backbone.conv1.weight'; keys start {sorted(state)[:3]}); pass a bt_fast "
                              f"checkpoint.pth/backbone.pth or a torchvision ResNet state dict")
    return state, kind, config


def mismatch(state: dict[str, torch.Tensor], arch: str) -> str | None:
    """None if `state` loads into an `arch` backbone (num_batches_tracked may be absent), else what differs."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in make_backbone(arch).state_dict().items()}
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k]))
    if missing:
        return f"missing {missing[:2]}"
    if unexpected:
        return f"unexpected {unexpected[:2]}"
    if shapes:
        k = shapes[0]
        return f"'{k}' has shape {tuple(state[k].shape)}, {arch} expects {tuple(expected[k])}"
    return None


def infer_arch(state: dict[str, torch.Tensor]) -> str:
    """resnet50 (bottleneck blocks: layer1.0.conv3) or resnet18 (basic blocks)."""
    return "resnet50" if "layer1.0.conv3.weight" in state else "resnet18"


def _read(path: Path) -> Any:
    try:
        return load_weights_only(path, map_location="cpu")
    except Exception as err:  # unpickling fails in many exception types; all mean the same to the user
        if cut_short(path):
            previous = previous_path(path)
            before = f", or pass {previous}, the one saved before it" if previous.is_file() else ""
            raise CheckpointError(f"checkpoint {path} {CUT_SHORT}; copy it again{before}") from None
        if not_torch_saved(path):
            raise CheckpointError(f"checkpoint {path} is not a file torch.save wrote; pass a run's checkpoint.pth or "
                                  f"backbone.pth, or a torch-saved state dict") from None
        raise CheckpointError(f"checkpoint {path} cannot be read by torch.load(weights_only=True) "
                              f"({type(err).__name__}: {flat_message(err, 120)}); pass a torch-saved state "
                              f"dict") from None


RUN_CONFIG_NAME = "config.yaml"


def run_config(path: Path) -> dict | None:
    """The training config of the run whose directory holds `path`: its `config.yaml`, else the `config`
    of its `checkpoint.pth` (memory-mapped: only the config is read); None if neither is usable."""
    try:
        config = yaml.safe_load((path.parent / RUN_CONFIG_NAME).read_text())
        if isinstance(config, dict):
            return config
    except (OSError, yaml.YAMLError):
        pass
    checkpoint = path.parent / CHECKPOINT_NAME
    if checkpoint == path or not checkpoint.is_file():
        return None
    try:
        config = load_weights_only(checkpoint, map_location="cpu", mmap=True).get("config")
    except Exception:  # noqa: BLE001 - an unreadable neighbour only means the size stays unknown
        return None
    return config if isinstance(config, dict) else None


def load_backbone(path: str | Path, arch: str | None = None) -> LoadedBackbone:
    """The backbone stored in `path`, on the CPU; `arch` None: from the file's config or keys."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the {CHECKPOINT_NAME} or {BACKBONE_NAME} "
                              f"in it (a run's out_dir holds both), or a ResNet state dict file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the checkpoint.pth or backbone.pth "
                              f"written by training, or a ResNet state dict")
    if arch is not None:
        check_choice("arch", arch, BACKBONE_DIM)
    saved = _read(path)
    state, kind, config = backbone_state(saved, path)
    progress = saved_progress(saved)
    del saved  # a checkpoint's optimizer state, as large as its model, is of no use past here
    config_arch = config.get("arch") if config else None
    if arch and config_arch and arch != config_arch:
        raise CheckpointError(f"checkpoint {path} was trained as {config_arch} (its config), not {arch}; "
                              f"drop --arch or pass --arch {config_arch}")
    chosen = arch or config_arch or infer_arch(state)
    if chosen not in BACKBONE_DIM:
        raise CheckpointError(f"checkpoint {path} is a {chosen}; only {sorted(BACKBONE_DIM)} are supported")
    problem = mismatch(state, chosen)
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit a {chosen} backbone ({problem}); "
                              f"pass the matching --arch or a resnet18/resnet50 checkpoint")
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise CheckpointError(f"checkpoint {path} holds weights that are not finite ('{broken}' has nan or inf), "
                              f"as a diverged run leaves; pass a checkpoint saved before it diverged")
    backbone = make_backbone(chosen)
    backbone.load_state_dict(state, strict=False)  # only num_batches_tracked can be absent (checked above)
    where = f"the config saved in {path}"
    if config is None and kind == "state dict":
        neighbour = run_config(path)
        if neighbour is not None and neighbour.get("arch", chosen) == chosen:
            config, where = neighbour, f"the config of the run beside {path}"
    image_size = None
    if config and isinstance(config.get("augment"), dict):
        image_size = config["augment"].get("image_size")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise CheckpointError(f"{where} gives augment.image_size {image_size!r}, not a number of pixels; fix it there "
                              f"(the size the backbone was trained at)")
    return LoadedBackbone(backbone, chosen, kind, image_size, progress)


def random_backbone(arch: str, seed: int = 0) -> nn.Module:
    """The untrained backbone a pretraining run starts from (same constructor), seeded; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would reseed the GPUs' generators too
        return make_backbone(arch)


def weights_digest(module: nn.Module) -> str:
    """sha256 hex of `module`'s state dict (every name, dtype, shape and value, in order): two modules
    share it exactly when they hold the same weights, on any device."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

"""Atomic checkpoints: a crash at any moment leaves either the old file or the new one."""
from __future__ import annotations

import os
import random
import secrets
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pth"
BACKBONE_NAME = "backbone.pth"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message names the file."""


def _temporary_name(path: Path) -> Path:
    # Host, pid and a random token: pids repeat across nodes that share the file system.
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`.

    A kill at any moment leaves `path` either as it was or complete; at worst a temporary file
    stays behind, which `remove_stale_temporaries` deletes on the next start.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_stale_temporaries(directory: Path, names: tuple[str, ...] = (CHECKPOINT_NAME, BACKBONE_NAME)) -> list[Path]:
    """Delete temporaries that a killed `atomic_save` left in `directory`; returns them.

    Only call this from the one process that writes into `directory`, before it writes.
    """
    stale = [p for name in names for p in directory.glob(f".{name}.*.tmp")] if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():  # GPU
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():  # GPU
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean the same to the user
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}); "
                              f"delete it or choose another out_dir") from None


def restore_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"shape of {wrong_shape[:2]} differs")
        raise CheckpointError(f"checkpoint {path} was written for a different model ({detail}); "
                              f"use a new out_dir or the matching arch/projector")
    model.load_state_dict(state_dict)

"""Atomic checkpoints: a crash at any moment leaves either the old file or the new one."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bt_fast.errors import UserError
from bt_fast.files import atomic_write, remove_stale_temporaries

CHECKPOINT_NAME = "checkpoint.pth"
BACKBONE_NAME = "backbone.pth"


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this run; the message names the file."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through `atomic_write`: a kill at any moment leaves `path` as it was or complete."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def remove_stale_checkpoint_temporaries(directory: Path) -> list[Path]:
    """Temporaries of killed checkpoint writes in `directory`, deleted (call before writing)."""
    return remove_stale_temporaries(directory, (CHECKPOINT_NAME, BACKBONE_NAME))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():  # GPU
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`; the states may come back on the device a checkpoint was mapped to."""
    state = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in state.items()}
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():  # GPU
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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

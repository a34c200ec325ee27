"""Atomic checkpoints: a crash at any moment leaves either the old file or the new one."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from bt_fast.errors import StorageError, UserError, flat_message, out_of_memory
from bt_fast.files import (atomic_write, free_bytes, mebibytes, remove_stale_temporaries, storage_fault,
                           temporary_name)

CHECKPOINT_NAME = "checkpoint.pth"
PREVIOUS_NAME = "checkpoint.prev.pth"  # the checkpoint before the last, kept by `atomic_save(keep_previous=True)`
BACKBONE_NAME = "backbone.pth"


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this run; the message names the file."""


class _ByteCounter:
    """A write-only sink that keeps only the number of bytes written to it."""

    def __init__(self):
        self.count = 0

    def write(self, data) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def serialized_bytes(obj: Any) -> int:
    """The number of bytes `torch.save(obj, ...)` writes, counted without storing them."""
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.count


def previous_path(path: Path) -> Path:
    """Where `atomic_save(path, keep_previous=True)` keeps the file it replaces: checkpoint.prev.pth
    for checkpoint.pth, `<stem>.prev<suffix>` otherwise."""
    return path.with_name(PREVIOUS_NAME if path.name == CHECKPOINT_NAME else f"{path.stem}.prev{path.suffix}")


def _keep_as_previous(path: Path) -> None:
    """Make `path`'s current file also its `previous_path` (a hard link: no copy, no extra space)."""
    if not path.is_file():
        return
    previous = previous_path(path)
    link = temporary_name(previous)
    try:
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links: copy
            shutil.copyfile(path, link)
        os.replace(link, previous)
    except BaseException:
        with contextlib.suppress(OSError):
            link.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: Path, keep_previous: bool = False) -> None:
    """torch.save through `atomic_write`: a kill at any moment leaves `path` as it was or complete.

    With `keep_previous`, the file `path` held until now becomes its `previous_path` once the new
    one is durable; the older previous file is deleted before writing (also where `path` is gone: a
    run started afresh keeps no other run's), so at most two checkpoints occupy the disk at any time
    (three for a moment on a file system without hard links, where the previous one is a copy).

    When the storage refuses the write (full, over quota, read-only), a StorageError naming `path`,
    the cause, the bytes the file needs and the bytes free there; the temporary is removed and
    `path` is left as it was.
    """
    path = Path(path)
    try:
        if keep_previous:
            previous_path(path).unlink(missing_ok=True)
        atomic_write(path, lambda handle: torch.save(obj, handle),
                     before_replace=(lambda: _keep_as_previous(path)) if keep_previous else None)
    except Exception as err:
        if isinstance(err.__context__, KeyboardInterrupt):  # torch's zip writer turns a Ctrl-C into a RuntimeError
            raise KeyboardInterrupt from None  # (the temporary is gone: `path` is as it was)
        fault = storage_fault(err)
        if fault is None:
            raise
        needed = serialized_bytes(obj)
        raise StorageError(f"cannot write {path} ({fault.strerror or fault}): it needs {needed} bytes "
                           f"({mebibytes(needed)}), {mebibytes(free_bytes(Path(path).parent))} free there") from None


def remove_stale_checkpoint_temporaries(directory: Path) -> list[Path]:
    """Temporaries of killed checkpoint writes in `directory`, deleted (call before writing)."""
    return remove_stale_temporaries(directory, (CHECKPOINT_NAME, PREVIOUS_NAME, BACKBONE_NAME))


def host_copy(obj: Any) -> Any:
    """`obj` (nested dicts, lists and tuples) with every tensor copied to host memory: a snapshot that
    training may go on changing the originals of."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: host_copy(value) for key, value in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(host_copy(value) for value in obj)
    return obj


class BackgroundSave:
    """`atomic_save` on a thread of its own, one save at a time, so that training goes on while a
    checkpoint is written: ResNet-50 + 8192-8192-8192 with LARS's momentum is 1.3 GiB, seconds of
    writing that every rank would otherwise wait for (docs/performance.md). torch.save lets go of the
    GIL while it writes."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, obj: Any, path: Path, **kwargs: Any) -> None:
        """Wait for the previous save, take a host copy of `obj` and start writing it to `path`."""
        self.wait()
        snapshot = host_copy(obj)

        def write() -> None:
            try:
                atomic_save(snapshot, path, **kwargs)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = err
        self._thread = threading.Thread(target=write, name="checkpoint writer")
        self._thread.start()

    def wait(self) -> None:
        """Return once the save started last is on disk; raise what it raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


@dataclass(frozen=True)
class Progress:
    """How far the pretraining run that saved a checkpoint had come: `step` of the `total_steps` of all its
    epochs, and `epoch` (the epochs complete) of `epochs`. A run paused by max_steps is not finished."""

    step: int
    total_steps: int
    epoch: int
    epochs: int

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "finished": self.finished}


def saved_progress(state: Any) -> Progress | None:
    """The progress a bt_fast checkpoint (`state` as torch.load returned it) records; None for anything
    that records none: a state dict, another trainer's checkpoint, or a bt_fast checkpoint written before
    checkpoints recorded their `schedule_steps`."""
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        return None
    found = (state.get("step"), state.get("schedule_steps"), state.get("epoch"), state["config"].get("epochs"))
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in found):
        return None
    return Progress(*found)


class RunCheckpoint:
    """A run's checkpoint.pth as rank 0 writes it, in the background (`BackgroundSave`), and the step of
    the one on disk, which error messages name as where the run can resume."""

    def __init__(self, out_dir: Path, total_steps: int):
        self.out_dir, self.total_steps = out_dir, total_steps
        self.path = out_dir / CHECKPOINT_NAME
        self.saved_step: int | None = None  # None: there is none
        self._save, self._writing_step = BackgroundSave(), None

    def start(self, state: dict[str, Any]) -> None:
        """Start writing `state` (the previous checkpoint becomes checkpoint.prev.pth)."""
        self.wait()
        self._save.start(state, self.path, keep_previous=True)
        self._writing_step = state["step"]

    def wait(self) -> None:
        """Return once the checkpoint being written (if any) is on disk; raise what its write raised. A Ctrl-C
        interrupts only the waiting: the write goes on (its thread ends before the process does), and the next
        wait counts it."""
        try:
            self._save.wait()
        except KeyboardInterrupt:
            raise
        except BaseException:
            self._writing_step = None
            raise
        step, self._writing_step = self._writing_step, None
        if step is not None:
            self.saved_step = step

    def kept(self) -> str | None:
        """What an interrupted run leaves to resume from, for its message; None if no checkpoint was written."""
        if self.saved_step is None:
            return None
        then = "finish the run" if self.saved_step >= self.total_steps else "resume"
        return (f"the last checkpoint is step {self.saved_step} of {self.total_steps} in {self.path}: run the same "
                f"command again to {then} from it")

    @contextlib.contextmanager
    def faults(self) -> Iterator[None]:
        """A full or read-only out_dir inside the block is a StorageError naming the last good checkpoint."""
        try:
            yield
        except Exception as err:
            fault = storage_fault(err)
            if fault is None and not isinstance(err, StorageError):
                raise
            cause = err if isinstance(err, StorageError) else f"cannot write into {self.out_dir} ({fault.strerror})"
            raise StorageError(f"{cause}; {self.last_good()}") from None

    def last_good(self, fix: str = "free space there (or make it writable)") -> str:
        """Where the run can resume from, for an error's message: `fix`, then rerun."""
        if self.saved_step is None:
            return f"no checkpoint was written yet in {self.out_dir}: {fix} and rerun"
        return (f"the last good checkpoint is step {self.saved_step} of {self.total_steps} in {self.path}: "
                f"{fix} and rerun the same command to resume from it")


def rng_state(device: torch.device) -> dict[str, Any]:
    """The host's generators, and the CUDA one of `device` where the run trains on a GPU."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if device.type == "cuda":  # GPU: this rank's device, not every GPU the process sees
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore `rng_state()` for a run on `device`; the states may come back on the device a checkpoint
    was mapped to."""
    state = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in state.items()}
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # written before 2026-12-06: one state per visible GPU, rank 0's first
        cuda = cuda[0] if cuda else None
    if cuda is not None and device.type == "cuda":  # GPU: a machine that sees fewer GPUs resumes too
        torch.cuda.set_rng_state(cuda.cpu(), device)


_ZIP_START = b"PK\x03\x04"  # how torch.save's zip archive begins
_PICKLE_START = b"\x80"  # how the pickle of its older format begins


def _start(path: Path) -> bytes | None:
    """The first bytes of `path` that tell a torch.save file, or None where it cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read(len(_ZIP_START))
    except OSError:
        return None


def cut_short(path: Path) -> bool:
    """Whether `path` begins as torch.save's zip archive does but lacks the directory that ends a complete
    one: a write or a copy that stopped part-way."""
    return _start(path) == _ZIP_START and not zipfile.is_zipfile(path)


def not_torch_saved(path: Path) -> bool:
    """Whether `path` begins as no file torch.save writes: neither as its zip archive nor as the pickle of its
    older format (a config, an image, text)."""
    start = _start(path)
    return start is not None and not start.startswith((_ZIP_START, _PICKLE_START))


CUT_SHORT = "is incomplete (it ends before the directory a torch-saved file ends with: a write or a copy cut short)"


def load_weights_only(path: Path, **options) -> Any:
    """`torch.load(path, weights_only=True, **options)` without torch's warning about a pickle protocol it may
    not read (a plain pickle file): whatever the load makes of such a file, the caller says in one line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, weights_only=True, **options)


def unreadable_reason(path: Path, err: BaseException) -> str:
    """Why torch.load could not read the file `path` (raising `err`), as the words after "checkpoint PATH"."""
    if cut_short(path):
        return CUT_SHORT
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            return "is empty (0 bytes)"
    return "is not a file torch.save wrote" if not_torch_saved(path) else f"cannot be read ({type(err).__name__})"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at `path`, or a CheckpointError saying what to do. With `mmap`, tensors stay on
    disk until used: a cheap check that the file is complete (its zip directory sits at the end).
    Without it, every byte is also checked against the CRC-32 torch.save wrote (`damaged_entry`)."""
    try:
        damaged = None if mmap else damaged_entry(Path(path))
        if damaged is None:
            return load_weights_only(path, map_location=map_location, mmap=mmap)
        reason = f"is damaged (its entry {damaged} fails the CRC-32 it was written with)"
    except PermissionError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err.strerror}); make it readable and "
                              f"rerun") from None
    except Exception as err:  # unpickling errors come in many types; all mean the same to the user
        if out_of_memory(err):  # the file may well be good: no advice to delete it
            raise CheckpointError(f"checkpoint {path} does not fit in memory here ({flat_message(err, 200)}); "
                                  f"free memory and rerun") from None
        reason = unreadable_reason(Path(path), err)
    previous = previous_path(Path(path))
    way_out = (f"rename {previous.name} (the one before it) to {Path(path).name} to resume from there, "
               f"delete it to start afresh," if previous.is_file() else "delete it")
    raise CheckpointError(f"checkpoint {path} {reason}; {way_out} or choose another out_dir")


def damaged_entry(path: Path) -> str | None:
    """The first entry of torch.save's zip archive at `path` whose bytes do not match the CRC-32 stored
    for them, or None (also for a file that is no zip archive: torch.load judges those). torch.load
    does not check the CRCs, so bytes changed on disk would otherwise be trained on. Entries written
    without a CRC (`torch.serialization.set_crc32_options(False)` stores 0) are not checked."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0:
                continue
            try:
                with archive.open(info) as entry:  # zipfile compares the CRC once the entry is read to its end
                    while entry.read(1 << 24):
                        pass
            except zipfile.BadZipFile:
                return info.filename
    return None


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

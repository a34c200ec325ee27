"""Atomic file output: a crash at any moment leaves either the old file or the complete new one.

Every file bt_fast writes for later reading (checkpoints, reports, metrics rewrites, JSON
results) goes through `atomic_write`. Temporaries are hidden siblings of the target,
`.<name>.<host>.<pid>.<token>.tmp`, so `remove_stale_temporaries` can find what a killed
writer left behind.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def temporary_name(path: Path) -> Path:
    """A unique hidden sibling of `path`. Host, pid and a random token: pids repeat across nodes."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def published_mode(directory: bool = False) -> int:
    """The permissions a plain `open()` or `mkdir()` would give under the current umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def ensure_writable_directory(directory: str | Path) -> Path:
    """Create `directory` if needed and prove that a file can be written in it; OSError otherwise."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
        pass
    return directory


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(handle)` on a temporary sibling of `path`, fsync it, then rename it over `path`.

    The parent directory is created if needed. On any exception (KeyboardInterrupt included)
    the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, published_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(path: str | Path, payload: Any) -> Path:
    """`payload` as indented JSON with a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def _writer_is_gone(temporary: Path) -> bool:
    """True if `temporary` was made by a process on this host that no longer runs."""
    parts = temporary.name.rsplit(".", 4)  # [.name, host, pid, token, tmp]
    if len(parts) != 5 or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_orphaned_temporaries(directory: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporaries (files or directories) for `names` in `directory` whose writer on this
    host was killed. Safe while other processes write: a live writer's temporary is kept."""
    directory = Path(directory)
    orphans = [p for name in names for p in directory.glob(f".{name}.*.tmp") if _writer_is_gone(p)] \
        if directory.is_dir() else []
    for p in orphans:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    return orphans


def remove_stale_temporaries(directory: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporaries that killed `atomic_write` calls for `names` left in `directory`.

    Only call this from the one process that writes into `directory`, before it writes.
    """
    directory = Path(directory)
    stale = [p for name in names for p in directory.glob(f".{name}.*.tmp")] if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale

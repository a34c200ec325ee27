"""Atomic file output: a crash at any moment leaves either the old file or the complete new one.

Every file bt_fast writes for later reading (checkpoints, reports, metrics rewrites, JSON
results) goes through `atomic_write`. Temporaries are hidden siblings of the target,
`.<name>.<host>.<pid>.<token>.tmp`, so `remove_stale_temporaries` can find what a killed
writer left behind.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import stat
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


def check_writable_directory(directory: str | Path) -> None:
    """OSError unless `directory`, or where it does not exist yet its nearest existing ancestor, is a
    directory a file can be written in. Creates nothing (the probe file is anonymous and gone at once)."""
    directory = Path(directory).absolute()
    existing = next(d for d in (directory, *directory.parents) if d.exists())
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    with tempfile.TemporaryFile(dir=existing):
        pass


def check_output_file(path: str | Path) -> None:
    """OSError unless `atomic_write` can write `path`: a regular file or nothing (through a symbolic link,
    what it points to), and its directory, or where that does not exist yet its nearest existing ancestor,
    writable. Creates nothing."""
    path = Path(os.path.realpath(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    _refuse_special_file(path)
    check_writable_directory(path.parent)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether `a` and `b` name one file: the same path once resolved (symbolic links followed; neither need
    exist), or two hard links of it."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_special_file(path: Path) -> None:
    """OSError where `path` is a device, a named pipe or a socket: a new file renamed over it would replace
    it (for root, /dev/null too)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there, or no way there: the write itself says why
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a named pipe" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a special file")
        raise OSError(errno.EEXIST, f"it is {kind}, not a file to replace", str(path))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None],
                 before_replace: Callable[[], None] | None = None) -> Path:
    """Call `write(handle)` on a temporary sibling of `path`, fsync it, then rename it over `path`.

    `before_replace`, if given, runs after the new content is durable and before the rename (while
    `path` still holds the old one).

    The parent directory is created if needed. On any exception (KeyboardInterrupt included)
    the temporary is removed and `path` is left as it was; the exception raised is always the
    first one: a cleanup that fails too (a directory turned read-only) never replaces it.
    A symbolic link is written through (the file it points to is replaced, the link kept); a device,
    named pipe or socket at `path` is an OSError, not replaced.
    """
    given, path = Path(path), Path(os.path.realpath(path))
    _refuse_special_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, published_mode())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return given


# The file system refused space or writing: the user can act on these (free space, remount), unlike a bug.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def storage_fault(err: BaseException | None) -> OSError | None:
    """The OSError in `err` or its causes that means the storage refused a write (full, over quota,
    read-only, no permission), or None. Writers such as torch.save may wrap it in another error. Full
    shared memory is not storage (`shared_memory_full`)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if shared_memory_full(err):
            return None
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# Where torch's DataLoader workers put each batch for the main process, and where multiprocessing makes the
# semaphores of its locks and queues: a tmpfs, often small in containers (Docker's default is 64 MiB).
SHARED_MEMORY = "/dev/shm"


def shared_memory_full(err: BaseException) -> str | None:
    """What `err` found where it means that shared memory is full, None for any other error: a DataLoader
    worker that could not put its batch there (torch: "unable to allocate shared memory(shm) for file
    </torch_...>: No space left on device", re-raised in the main process), or a multiprocessing lock or
    queue that could not be made (an ENOSPC OSError from its SemLock). A retry meets the same limit."""
    text = " ".join(str(err).split())
    in_a_worker = isinstance(err, RuntimeError) and ("unable to allocate shared memory" in text or (
        "</torch_" in text and "No space left on device" in text))
    if not (in_a_worker or isinstance(err, OSError) and err.errno == errno.ENOSPC and _raised_by_semlock(err)):
        return None
    size = size_bytes(SHARED_MEMORY)
    return f"shared memory ({SHARED_MEMORY}{'' if size is None else ', ' + size_text(size)}) is full"


def _raised_by_semlock(err: BaseException) -> bool:
    """Whether `err` comes from making a multiprocessing semaphore (its traceback ends in multiprocessing's
    synchronize module: `_multiprocessing.SemLock` is C and has no frame of its own)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "synchronize.py"))


def free_bytes(directory: str | Path) -> int | None:
    """Bytes an unprivileged writer may still use on `directory`'s file system (None if unknown)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def size_bytes(directory: str | Path) -> int | None:
    """The size of `directory`'s file system (None if unknown)."""
    try:
        return shutil.disk_usage(directory).total
    except OSError:
        return None


def size_text(count: float) -> str:
    """`count` bytes in the unit that reads best: "384.0 KiB", "4.0 MiB", "1.30 GiB", "4.0 EiB"."""
    for unit, power, digits in (("KiB", 10, 1), ("MiB", 20, 1), ("GiB", 30, 2), ("TiB", 40, 1), ("PiB", 50, 1)):
        if count < 2 ** (power + 10):
            return f"{count / 2**power:.{digits}f} {unit}"
    return f"{count / 2**60:.1f} EiB"


def mebibytes(count: int | None) -> str:
    return "an unknown amount" if count is None else f"{count / 2**20:.1f} MiB"


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


def remove_path(path: Path) -> None:
    """Delete the file, link or directory tree at `path`, if any (a link, not what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_orphaned_temporaries(directory: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporaries (files or directories) for `names` in `directory` whose writer on this
    host was killed. Safe while other processes write: a live writer's temporary is kept."""
    directory = Path(directory)
    orphans = [p for name in names for p in directory.glob(f".{name}.*.tmp") if _writer_is_gone(p)] \
        if directory.is_dir() else []
    for p in orphans:
        remove_path(p)
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

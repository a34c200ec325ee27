"""One run per out_dir: an exclusive `flock` on `<out_dir>/.bt_fast.lock`, held for the run's life.

Rank 0 takes the lock before it writes anything into out_dir and keeps the file open until the
run ends. The kernel drops an flock when its holder dies however it dies (kill -9 included), so
a lock is never stale; a second run on the same out_dir fails at once with a `RunLockError`
naming the holder's PID and host, which the holder writes into the file.

Releasing deletes the file, and the directories the lock had to create if they are still empty,
so a run refused at start leaves no empty out_dir. A process that opened the file just before the
holder deleted it may then lock the deleted inode; `acquire` checks that the inode it locked is
still the one at the path and tries again otherwise.

Across nodes the lock is only as good as the shared file system's flock (README, "One run per
out_dir"). Where the file system refuses locks altogether (Lustre mounted with `noflock`, NFS
without a lock service), the run goes ahead without one, after a warning.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

from bt_fast.errors import UserError

LOCK_NAME = ".bt_fast.lock"
_ATTEMPTS = 5  # inode changes in a row (each needs another process deleting the file meanwhile)
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}  # the file system offers no locks at all


class RunLockError(UserError):
    """Another process holds out_dir's run lock; the message names it."""


def _holder(path: Path) -> str:
    try:
        pid, host = path.read_text().split()[:2]
        return f"process {pid} on {host}"
    except (OSError, ValueError):
        return "another process"


def _refusal(out_dir: Path) -> RunLockError:
    return RunLockError(f"out_dir {out_dir} is in use by {_holder(out_dir / LOCK_NAME)} (it holds "
                        f"{out_dir / LOCK_NAME}); wait for that run to end, stop it, or choose another out_dir")


def _try_lock(fd: int) -> bool:
    """True if this call took the lock, False if another holds it; OSError if locks are unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def check_unlocked(out_dir: str | Path) -> None:
    """RunLockError if a live process holds out_dir's lock. Creates nothing (for `--check`)."""
    out_dir = Path(out_dir)
    try:
        fd = os.open(out_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return  # no lock file (or none readable): no run holds it
    try:
        if not _try_lock(fd):
            raise _refusal(out_dir)
    except OSError as err:
        if err.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)  # also drops the probe's lock


class RunLock:
    """`with RunLock(out_dir):` holds the lock for the block (see the module docstring)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []  # directories made for the lock, deepest last

    def acquire(self) -> "RunLock":
        missing = [d for d in (self.out_dir, *self.out_dir.parents) if not d.exists()]
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):
                directory.mkdir()
                self.created.append(directory)
        for _ in range(_ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_lock(fd)
            except OSError as err:
                os.close(fd)
                if err.errno not in _UNSUPPORTED:
                    raise
                with contextlib.suppress(OSError):
                    self.path.unlink()
                print(f"warning: the file system of {self.out_dir} refuses locks ({err.strerror}): nothing stops "
                      f"a second run from writing into it; make sure only this one does", file=sys.stderr)
                return self
            if not locked:
                os.close(fd)
                raise _refusal(self.out_dir)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)  # we locked a file its holder has just deleted: take the new one
        raise _refusal(self.out_dir)

    def release(self) -> None:
        """Delete the lock file and the still-empty directories made for it, then drop the lock."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        for directory in reversed(self.created):
            with contextlib.suppress(OSError):  # not empty: the run wrote something there
                directory.rmdir()
        self.created = []
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

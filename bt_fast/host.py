"""The host as this process sees it."""
from __future__ import annotations

import ctypes
import os


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what SLURM's `--cpus-per-task`, taskset
    and container cpusets set), not every core of the machine (`os.cpu_count()`). Worker counts
    default to it and are capped by it."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


class HeapTrim:
    """For a long-lived worker process: `after_task()` gives the C heap's free memory back to the
    kernel (glibc's `malloc_trim`) once the resident size has grown by `growth` bytes since it last
    did, so the process's high-water mark is its steady size plus the largest task's own memory.

    Without it glibc keeps what a large task freed: after freeing a block it had mapped, it raises
    its mapping threshold to that block's size (up to 32 MiB) and places later large blocks on the
    heap, where freed memory stays resident. A converter worker that decoded one 12-megapixel
    progressive JPEG (libjpeg holds the whole image's DCT coefficients, 36 MB) then holds that
    memory, and the next large image lands beside it. The check is one read of /proc/self/statm
    (its cost and effect: docs/performance.md). Where that file or glibc is missing, it does nothing.
    """

    def __init__(self, growth: int = 16 << 20):
        self.growth = growth
        self._pid = -1
        self._statm = -1
        self._trim = None
        self._floor = 0

    def _start(self) -> bool:
        """Open this process's statm (after a fork, the child's own) and find malloc_trim."""
        self._pid = os.getpid()
        if self._statm >= 0:  # the parent's, inherited
            os.close(self._statm)
        try:
            self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
            self._trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not Linux, or a C library without malloc_trim
            self._statm, self._trim = -1, None
            return False
        self._floor = self._resident()
        return True

    def _resident(self) -> int:
        return int(os.pread(self._statm, 64, 0).split()[1]) * _PAGE

    def after_task(self) -> None:
        if self._pid != os.getpid() and not self._start():
            return
        if self._trim is None or self._resident() < self._floor + self.growth:
            return
        self._trim(0)
        self._floor = self._resident()


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

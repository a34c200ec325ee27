"""The host as this process sees it."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what SLURM's `--cpus-per-task`, taskset
    and container cpusets set), not every core of the machine (`os.cpu_count()`). Worker counts
    default to it and are capped by it."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1

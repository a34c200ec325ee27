"""Progress bars: live on a terminal, and a few plain lines (not hundreds of redraws) in a log file."""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # without a terminal, at most one progress line this often


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", initial: int = 0, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr. When stderr is not a terminal it writes its first line after LOG_INTERVAL_S
    (a job shorter than that logs none) and then at most one every LOG_INTERVAL_S."""
    terminal = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not enabled,
                delay=0.0 if terminal else LOG_INTERVAL_S,
                dynamic_ncols=terminal, mininterval=0.1 if terminal else LOG_INTERVAL_S,
                maxinterval=10.0 if terminal else LOG_INTERVAL_S * 4)

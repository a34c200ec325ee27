"""Progress bars: live on a terminal, and a few plain lines (not hundreds of redraws) in a log file."""
from __future__ import annotations

import sys
from typing import Iterable

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # without a terminal, at most one progress line this often


class _LogLines(tqdm):
    """tqdm for a log: every draw is one whole line, and none comes before `delay`.

    Plain tqdm redraws in place with carriage returns, also redraws before `delay` when `write` or
    `set_postfix` refreshes it, and then ends no line at close, so the log's next line ran on after
    the bar (`...loss=257.19]done: 32 steps`).
    """

    def display(self, msg=None, pos=None):
        start = getattr(self, "start_t", None)  # None while tqdm's __init__ draws a first line (delay 0)
        if msg == "" or (start is not None and self._time() < start + self.delay):
            return False
        self.fp.write(f"{self if msg is None else msg}\n")
        self.fp.flush()
        self._drawn = (self.n, self.postfix)
        return True

    def clear(self, nolock=False):
        pass  # a written line stays written

    def close(self):
        # A signal raised inside tqdm's __init__ leaves a bar without `disable`, which __del__ still closes.
        if not getattr(self, "disable", True) and getattr(self, "_drawn", None) not in (None, (self.n, self.postfix)):
            self.display()  # lines were written: the final state too
        super().close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", initial: int = 0, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr. When stderr is not a terminal it writes whole lines: its first after
    LOG_INTERVAL_S (a job shorter than that logs none), then at most one every LOG_INTERVAL_S, and
    the final state at close."""
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not enabled,
                    dynamic_ncols=True, mininterval=0.1, maxinterval=10.0)
    return _LogLines(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not enabled,
                     delay=LOG_INTERVAL_S, mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S * 4, leave=False)

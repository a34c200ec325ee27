"""The process pool of the converter and the data generator: `multiprocessing.Pool` without CPython's
busy worker handler, and with Ctrl-C left to the parent."""
from __future__ import annotations

import signal
from multiprocessing.pool import Pool


def ignore_interrupts() -> None:
    """Initializer of a worker process: Ctrl-C reaches the whole process group, and only the parent
    acts on it (it stops the pool); a worker would print a KeyboardInterrupt traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class WorkerPool(Pool):
    """`multiprocessing.Pool(processes, initializer=ignore_interrupts)` whose worker-handler thread
    sleeps while results stream in.

    CPython's handler (3.8+, bpo-35493) also wakes whenever the result pipe is readable, which it is
    for as long as results arrive faster than the result thread takes them: it loops, rebuilds its
    list of sentinels and waits again. In the converter that took 2 of the main process's 5
    CPU-seconds per 20,000 images, on cores the workers need. The handler has work only when a
    worker exits (their sentinels, which it adds itself) or the pool changes state (the change
    notifier): that is all it waits for here.
    """

    def __init__(self, processes: int):
        super().__init__(processes, initializer=ignore_interrupts)

    def _get_sentinels(self) -> list:
        return [self._change_notifier._reader]

"""The process pool of the converter and the data generator: `multiprocessing.Pool` without CPython's
busy worker handler, with Ctrl-C left to the parent, an error where a worker dies, and a stop that
cannot hang; and the guard every fork of worker processes runs in (`garbage_kept_from_forks`)."""
from __future__ import annotations

import gc
import signal
from contextlib import contextmanager
from functools import partial
from itertools import islice
from multiprocessing import TimeoutError as ResultNotReady
from multiprocessing.pool import TERMINATE, Pool
from typing import Iterable, Iterator

from bt_fast.errors import WorkerLost


def ignore_interrupts() -> None:
    """Initializer of a worker process: Ctrl-C reaches the whole process group, and only the parent
    acts on it (it stops the pool); a worker would print a KeyboardInterrupt traceback of its own.
    SIGTERM, SIGHUP and SIGUSR1 end a worker at once and quietly, as by default, whatever it is doing: a
    handler inherited from the parent (a conversion's, `pipelines.convert.ConversionSignals`) is not the
    worker's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        if callable(signal.getsignal(sig)):  # not SIG_IGN: a SIGHUP that nohup made ignored stays ignored
            signal.signal(sig, signal.SIG_DFL)


@contextmanager
def garbage_kept_from_forks() -> Iterator[None]:
    """Processes forked inside the block never collect the garbage they inherit (`gc.freeze`); this
    process collects it as before once the block ends. A collection runs finalizers in the process that
    collects: a DALI pipeline's, in a fork, waits forever for the pipeline's threads, which a fork does
    not copy (a DALI pipeline left in a reference cycle was collected in a worker, and the worker hung)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class WorkerPool(Pool):
    """`multiprocessing.Pool(processes, initializer=ignore_interrupts)` whose worker-handler thread
    sleeps while results stream in, and whose `imap`/`imap_unordered` raise `WorkerLost` where a
    worker process dies.

    CPython's handler (3.8+, bpo-35493) also wakes whenever the result pipe is readable, which it is
    for as long as results arrive faster than the result thread takes them: it loops, rebuilds its
    list of sentinels and waits again. In the converter that took 2 of the main process's 5
    CPU-seconds per 20,000 images, on cores the workers need. The handler has work only when a
    worker exits (their sentinels, which it adds itself) or the pool changes state (the change
    notifier): that is all it waits for here.

    The workers are forked, so they start at once with what this process holds. A task should find
    what it needs already loaded (modules, PIL's plugins, kernels, source data): an import or a
    library's first use in a child takes locks that another thread of this process may have held at
    the fork, and then waits on them forever. For the same reason a worker never collects the garbage
    it inherits (`garbage_kept_from_forks`).

    A worker that dies (the kernel's out-of-memory killer sends SIGKILL) takes its task with it;
    CPython's pool starts another worker and waits for that task's result forever.

    `terminate` (and leaving a `with` block) stops the workers first. CPython's puts an end marker on
    the result pipe before it stops them, and its result thread stops reading that pipe once it is
    told to end: a worker then blocked writing a large result (an encoded image) holds the pipe's
    lock, and the marker waits for it forever. That is what a Ctrl-C early in a conversion met.
    """

    WATCH_S = 1.0  # how long a wait for the next result lasts before the workers are checked
    # How long `terminate` waits for a worker to die of its SIGTERM. One forked while its parent held a Python
    # handler for SIGTERM (a conversion's) can lose the signal: it arrives before the worker's initializer
    # sets the default, and Python then drops the pending call of a handler that is no longer there.
    STOP_GRACE_S = 5.0

    def __init__(self, processes: int):
        with garbage_kept_from_forks():
            super().__init__(processes, initializer=ignore_interrupts)
        self._started = list(self._pool)  # the pool only replaces a worker that has died

    def _get_sentinels(self) -> list:
        return [self._change_notifier._reader]

    def terminate(self) -> None:
        """Stop the workers now (SIGTERM), however far their tasks are, and wait for them to exit.

        The pool's threads are daemons: after a complete run they end by themselves; after a stop
        mid-run one may wait on a pipe the stopped workers left behind, until the process exits.
        """
        if self._state == TERMINATE:
            return
        self._state = TERMINATE
        self._worker_handler._state = TERMINATE  # it starts no worker in place of the ones stopped below
        self._change_notifier.put(None)
        self._worker_handler.join()
        for worker in self._pool:
            if worker.exitcode is None:
                worker.terminate()
        for worker in self._pool:
            worker.join(self.STOP_GRACE_S)
            if worker.exitcode is None:  # the SIGTERM was lost (below): SIGKILL
                worker.kill()
                worker.join()
        self._terminate.cancel()  # CPython's own stop, which the process's exit would otherwise run

    def join(self) -> None:
        """After `close`, CPython's join; after `terminate`, the workers' exit only, not the pool's threads."""
        if self._state == TERMINATE:
            for worker in self._pool:
                worker.join()
        else:
            super().join()

    def imap(self, func, iterable, chunksize: int = 1) -> Iterator:
        return self._watched(super().imap(partial(_each, func), _chunks(iterable, chunksize)))

    def imap_unordered(self, func, iterable, chunksize: int = 1) -> Iterator:
        return self._watched(super().imap_unordered(partial(_each, func), _chunks(iterable, chunksize)))

    def _watched(self, chunks) -> Iterator:
        """The results of `chunks` (an IMapIterator over lists of results), one at a time."""
        while True:
            try:
                yield from chunks.next(timeout=self.WATCH_S)
            except ResultNotReady:
                self._check_workers()
            except StopIteration:
                return

    def _check_workers(self) -> None:
        for worker in self._started:
            code = worker.exitcode
            if code is None:
                continue
            if code < 0:
                how = f"was killed by {signal.Signals(-code).name}"
                if -code == signal.SIGKILL:
                    how += " (what the kernel's out-of-memory killer sends)"
            else:
                how = f"exited with status {code}"
            raise WorkerLost(f"worker process {worker.pid} {how}")


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def _each(func, chunk: list) -> list:
    return [func(item) for item in chunk]

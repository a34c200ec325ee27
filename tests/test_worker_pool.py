"""Worker processes that die. `bt_fast.worker_pool.WorkerPool`: the results of CPython's Pool without its
busy handler, and an error instead of a hang. A DataLoader worker's death: one line through `cli_errors`."""
from __future__ import annotations

import multiprocessing.pool
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bt_fast.errors import WorkerLost
from bt_fast.worker_pool import WorkerPool

REPO = Path(__file__).resolve().parents[1]


def _square_or_die(x: int) -> int:
    if x == 37:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def _handler_wakeups(pool_class, monkeypatch) -> int:
    """How often the pool's worker-handler thread woke while 400 results of 256 KB streamed in."""
    wakeups = []
    wait = multiprocessing.pool.Pool._wait_for_updates
    monkeypatch.setattr(multiprocessing.pool.Pool, "_wait_for_updates",
                        staticmethod(lambda *args, **kw: wakeups.append(1) or wait(*args, **kw)))
    with pool_class(2) as pool:
        assert sum(len(block) for block in pool.imap(bytes, [1 << 18] * 400)) == 400 << 18
    return len(wakeups)


def test_the_worker_pool_does_not_spin_while_results_stream_in(monkeypatch):
    """CPython's Pool wakes its worker handler whenever a result is waiting in the pipe; WorkerPool's
    handler wakes for workers that exit and for changes of state only (the pool's start and end)."""
    stock = _handler_wakeups(multiprocessing.pool.Pool, monkeypatch)
    ours = _handler_wakeups(WorkerPool, monkeypatch)
    assert stock > 20 and ours <= 3, (stock, ours)


@pytest.mark.parametrize("chunksize", [1, 4, 7])
def test_results_are_the_stock_pools(chunksize):
    items = list(range(30)) + [5, 5]
    with multiprocessing.pool.Pool(2) as stock, WorkerPool(2) as ours:
        assert list(ours.imap(abs, items, chunksize)) == list(stock.imap(abs, items, chunksize))
        assert sorted(ours.imap_unordered(abs, items, chunksize)) == sorted(items)
        assert list(ours.imap(abs, [], chunksize)) == []


@pytest.mark.timeout(60)  # CPython's pool waits forever for the task of a worker that died
@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("chunksize", [1, 4])
def test_a_worker_that_dies_is_an_error_not_a_hang(ordered, chunksize):
    with WorkerPool(2) as pool:
        results = (pool.imap if ordered else pool.imap_unordered)(_square_or_die, range(100), chunksize)
        got = []
        with pytest.raises(WorkerLost, match=r"^worker process \d+ was killed by SIGKILL \(what the kernel's out-of"):
            for value in results:
                got.append(value)
    assert set(got) <= {x * x for x in range(100)} - {37 * 37} and len(set(got)) == len(got)
    if ordered:
        assert got == [x * x for x in range(len(got))] and len(got) <= 37


class _FinalizedOnce:
    """A reference cycle, so only the collector frees it; its finalizer records the process it ran in."""

    def __init__(self, record: Path):
        self.record, self.cycle = record, self

    def __del__(self):
        with open(self.record, "a") as out:
            out.write(f"{os.getpid()}\n")


def _collect(_) -> int:
    import gc
    gc.collect()
    return os.getpid()


@pytest.mark.timeout(60)
def test_a_worker_never_collects_the_garbage_it_inherits(tmp_path):
    """A DALI pipeline that an earlier test had left in a reference cycle was collected in an ImageNet-like worker:
    its finalizer waited forever for the pipeline's threads, which the fork had not copied (1 full run in 9 hung).
    The workers collect here; the garbage is finalized once, by this process."""
    import gc
    record = tmp_path / "finalized"
    gc.disable()  # garbage at the fork: no automatic collection here frees it first
    try:
        _FinalizedOnce(record)
        with WorkerPool(2) as pool:
            workers = set(pool.map(_collect, range(2), chunksize=1))
    finally:
        gc.enable()
    assert not record.exists() and workers and os.getpid() not in workers
    gc.collect()
    assert record.read_text().split() == [str(os.getpid())]


class _CollectingDataset:
    """Each item collects this process's garbage, then names the process."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        import gc
        gc.collect()
        return os.getpid()


@pytest.mark.timeout(60)
def test_a_dataloader_worker_never_collects_the_garbage_it_inherits(tmp_path):
    """The same for the workers a DataLoader forks (the reference pipeline's, the k-NN monitor's and the
    evaluations'), which torch starts when an iteration begins."""
    import gc

    from pipelines.reference import ForkingLoader
    record = tmp_path / "finalized"
    gc.disable()
    try:
        _FinalizedOnce(record)
        workers = {int(pid) for pid in ForkingLoader(_CollectingDataset(), batch_size=1, num_workers=2,
                                                     multiprocessing_context="fork")}
    finally:
        gc.enable()
    assert not record.exists() and len(workers) == 2 and os.getpid() not in workers
    gc.collect()
    assert record.read_text().split() == [str(os.getpid())]


@pytest.mark.parametrize("torch_says, likely", [
    ("DataLoader worker (pid 4242) is killed by signal: Killed. ", True),
    ("DataLoader worker (pid(s) 4242) exited unexpectedly", True),
    ("DataLoader worker (pid 4242) is killed by signal: Segmentation fault. ", False),
])
def test_a_command_whose_dataloader_worker_died_says_so_in_one_line(torch_says, likely, capsys):
    """torch's RuntimeError (what `torch.utils.data` raises, from wherever the loop is) through `cli_errors`."""
    from bt_fast.errors import cli_errors
    with pytest.raises(SystemExit) as exit_info, cli_errors():
        raise RuntimeError(torch_says)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {torch_says.strip().rstrip('.')}")
    assert ("out-of-memory killer" in err) == likely and err.endswith("run again with fewer workers")
    with pytest.raises(RuntimeError, match="CUDA out of memory"), cli_errors():
        raise RuntimeError("CUDA out of memory")


_STOP_WHILE_A_WORKER_WRITES = """
import sys, threading, time
from bt_fast.worker_pool import WorkerPool

def megabyte(_):
    return bytes(1 << 20)

class UnreadPool(WorkerPool):  # its result thread reads nothing, as once CPython's has been told to end
    def _setup_queues(self):
        super()._setup_queues()
        self._quick_get = lambda: threading.Event().wait()

pool = UnreadPool(2)
workers = list(pool._pool)
results = pool.imap(megabyte, range(8))
deadline = time.monotonic() + 10
while pool._outqueue._wlock.acquire(block=False):  # until a worker, blocked writing, holds the pipe's lock
    pool._outqueue._wlock.release()
    if time.monotonic() > deadline:
        sys.exit("no worker ever blocked writing its result")
    time.sleep(0.01)
pool.terminate()
pool.join()
print(sorted(worker.exitcode for worker in workers))
"""


@pytest.mark.timeout(60)
def test_terminate_returns_while_a_worker_is_blocked_writing_a_result_nobody_reads():
    """CPython's terminate first puts an end marker on the result pipe, under the lock that a worker blocked
    writing a large result holds: it waited forever (a Ctrl-C early in a conversion)."""
    done = subprocess.run([sys.executable, "-c", _STOP_WHILE_A_WORKER_WRITES], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [f"[-{signal.SIGTERM.value},", f"-{signal.SIGTERM.value}]"]


def _stop_handlers(_) -> list[str]:
    return [repr(signal.getsignal(sig)) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]


@pytest.mark.timeout(60)
def test_workers_leave_ctrl_c_to_the_parent_and_die_of_sigterm_and_sighup_quietly_whatever_the_parents_handlers():
    """A conversion's SIGTERM / SIGHUP handler (it raises where the parent stops its pool) is inherited at the
    fork: in a worker it would raise in the worker's own code and print a traceback, and wait for the worker's
    next Python instruction (not a long decode). The workers take the defaults instead; an ignored SIGHUP
    (nohup) stays ignored."""
    def parents(signum, frame):
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, parents) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with WorkerPool(1) as pool:
            handlers = pool.apply(_stop_handlers, (None,))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with WorkerPool(1) as pool:
            nohup = pool.apply(_stop_handlers, (None,))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert handlers == [repr(signal.SIG_IGN), repr(signal.SIG_DFL), repr(signal.SIG_DFL)]
    assert nohup == [repr(signal.SIG_IGN), repr(signal.SIG_DFL), repr(signal.SIG_IGN)]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_worker_counts_default_to_the_cores_the_process_may_use():
    """Under SLURM's --cpus-per-task or taskset, the process may run on fewer cores than the machine has."""
    script = ("import os; from bt_fast.host import usable_cores; "
              "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(usable_cores())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    assert done.stdout.split() == ["1"]
    help_text = subprocess.run([sys.executable, "-c", "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
                                "sys.argv = ['make_demo_data', '--help']; import runpy; "
                                "runpy.run_module('tools.make_demo_data', run_name='__main__')"],
                               capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert "(default and cap: the usable cores, 1 here)" in " ".join(help_text.stdout.split())


_HEAP_AFTER_TASKS = """
import ctypes, os, sys
from bt_fast.host import HeapTrim
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
MiB = 1 << 20

def resident():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) // 1024

def task(blocks):  # what a large image leaves: glibc maps a 24 MiB block, then puts the next ones on its heap
    for size in (24 * MiB,) + (4 * MiB,) * blocks:
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block) if size > 4 * MiB else held.append(block)
    while held:
        libc.free(held.pop())

held = []
heap = HeapTrim(growth=16 * MiB)
heap.after_task()  # in the parent, as the converter's module-level one may be before the pool forks
if os.fork() == 0:
    floor = resident()
    task(2)
    small = resident()
    heap.after_task()
    after_small = resident()
    task(10)
    large = resident()
    heap.after_task()
    print(floor, small, after_small, large, resident())
    sys.stdout.flush()
    os._exit(0)
os.wait()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="HeapTrim acts on glibc's heap only")
def test_a_worker_gives_back_the_heap_a_large_task_left_and_keeps_a_small_one():
    """The premise is checked too: without the trim glibc keeps what the task freed resident."""
    done = subprocess.run([sys.executable, "-c", _HEAP_AFTER_TASKS], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=True)
    floor, small, after_small, large, after_large = map(int, done.stdout.split())
    # 8 MiB kept: under the 16 MiB growth, no trim (what Python allocates meanwhile moved it by 1 MiB in one run)
    assert small >= floor + 7 and after_small >= floor + 7
    assert large >= floor + 38  # 40 MiB freed and still resident
    assert after_large <= floor + 2


def _ignore_sigterm_and_wait(_):
    import time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a worker that lost its SIGTERM behaves
    time.sleep(120)


@pytest.mark.timeout(60)
def test_terminate_ends_a_worker_that_its_sigterm_does_not():
    """A worker forked as a stop began can lose terminate's SIGTERM (WorkerPool.STOP_GRACE_S): terminate still
    returns with every worker gone, by SIGKILL, instead of waiting on it forever."""
    import time
    pool = WorkerPool(1)
    pool.map_async(_ignore_sigterm_and_wait, [0])
    worker = pool._pool[0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _ignored_signals(worker.pid) & 1 << (signal.SIGTERM - 1):
        time.sleep(0.01)
    pool.terminate()
    assert worker.exitcode == -signal.SIGKILL


def _ignored_signals(pid: int) -> int:
    """/proc's SigIgn mask of process `pid` (0 once it is gone)."""
    try:
        return next(int(line.split()[1], 16) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("SigIgn"))
    except (OSError, StopIteration):
        return 0

"""Stop requests: signals recorded between steps, and agreed on by every rank without a device sync.

SIGINT, SIGHUP, SIGTERM and SIGUSR1 only record a request (`StopSignals`); the training loop acts on it
at a step boundary, after `StopAgreement.poll` has made every rank see the same request at the same
step. After SIGUSR1's checkpoint, `requeue_slurm_job` puts the job back in SLURM's queue.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from bt_fast.errors import leave_a_lost_terminal

# Stop requests, agreed across ranks by MAX: SIGUSR1 (requeue) wins over SIGTERM over SIGHUP (the terminal
# closed) over SIGINT.
STOP_SIGNALS = {signal.SIGINT: 1, signal.SIGHUP: 2, signal.SIGTERM: 3, signal.SIGUSR1: 4}
STOP_NAMES = {code: sig.name for sig, code in STOP_SIGNALS.items()}
# A person's interruption ends with the shell's 128 + signal, so that `make pretrain && make eval` stops there;
# a scheduler's stop (SIGTERM, SIGUSR1) with its checkpoint is a success.
INTERRUPTIONS = (signal.SIGINT, signal.SIGHUP)
# A Ctrl-C reaches a worker twice under torchrun (from the terminal, then forwarded by torchrun):
# a repeat this soon is the same request; a later one aborts at once.
REPEATED_SIGINT_S = 2.0


def stop_exit_code(name: str | None) -> int:
    """The exit status of a run that the signal named `name` stopped with a checkpoint (None: not stopped)."""
    sig = getattr(signal, name) if name else None
    return 128 + sig if sig in INTERRUPTIONS else 0


class StopSignals:
    """While active, SIGINT / SIGHUP / SIGTERM / SIGUSR1 only record a request; the loop acts on it at a step
    boundary. A second Ctrl-C (after REPEATED_SIGINT_S) raises KeyboardInterrupt at once. A SIGHUP that
    `nohup` made ignored stays ignored; one from a terminal that closed also sends stdout and stderr, if they
    were that terminal, to /dev/null (`leave_a_lost_terminal`): writing there would fail with EIO and end
    the run before its checkpoint."""

    def __init__(self):
        self.code = 0
        self._first_sigint: float | None = None
        self._previous: dict[int, object] = {}
        self._terminals: list[int] = []

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > REPEATED_SIGINT_S:
                raise KeyboardInterrupt
            self._first_sigint = self._first_sigint or now
        if signum == signal.SIGHUP:
            leave_a_lost_terminal(self._terminals)
        self.code = max(self.code, STOP_SIGNALS[signum])

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._terminals = [fd for fd in (1, 2) if os.isatty(fd)]  # stdout, stderr
            for sig in STOP_SIGNALS:
                if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # nohup: the run outlives its terminal
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def leave_stops_to_the_rank(worker_id: int) -> None:
    """`worker_init_fn` of the DataLoaders a training rank runs: the stop signals are the rank's.

    SLURM and torchrun signal a rank's whole process group. torch's worker dies of a SIGTERM that its
    parent did not send, and the rank would then fail with "DataLoader worker ... killed by signal"
    instead of stopping at the step boundary with a checkpoint. So the worker ignores SIGINT, SIGHUP and
    SIGUSR1, and a thread takes its SIGTERMs: one from the rank (multiprocessing's `terminate()` of what
    is left at exit) ends the worker, any other is ignored. A worker whose rank is gone exits on its own
    (torch's watchdog)."""
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit it
    threading.Thread(target=_exit_on_the_ranks_sigterm, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-rank").start()


def _exit_on_the_ranks_sigterm(rank_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != rank_pid:
        pass
    os._exit(0)


class StopAgreement:
    """Every rank's stop request, agreed by MAX, polled once per step by every rank.

    One process: the request itself, at once. Several: each poll posts this rank's request in an
    asynchronous all-reduce on a host-side (gloo) group of its own and returns the result of the
    previous poll's, so the ranks agree one step after a request and stop after the same step, and no
    rank waits on its device or blocks on the others' step. The trainer also waits for rank 0's k-NN
    monitor on that `group`, away from NCCL's watchdog.
    """

    def __init__(self, world_size: int):
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def poll(self, code: int) -> int:
        if self.group is None:
            return code
        agreed = self._collect()
        request = torch.tensor([code], dtype=torch.int64)
        self._pending = (dist.all_reduce(request, op=dist.ReduceOp.MAX, group=self.group, async_op=True), request)
        return agreed

    def _collect(self) -> int:
        if self._pending is None:
            return 0
        (work, request), self._pending = self._pending, None
        work.wait()
        return int(request.item())  # a CPU tensor: no device involved

    def close(self, code: int = 0) -> int:
        """After the loop: complete the last posted all-reduce (every rank has posted the same number), then
        agree on `code` at once, blocking: the request any rank had by the end of the run."""
        self._collect()
        if self.group is None:
            return code
        request = torch.tensor([code], dtype=torch.int64)
        dist.all_reduce(request, op=dist.ReduceOp.MAX, group=self.group)
        return int(request.item())


def requeue_slurm_job() -> None:
    """SIGUSR1 is SLURM's warning before preemption or the time limit: put the job back in the queue
    (rank 0 only), or say that it must be resubmitted."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        ok, detail = result.returncode == 0, result.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        ok, detail = False, str(err)
    print(f"requeued SLURM job {job}" if ok else f"warning: scontrol requeue {job} failed: {detail}; "
          f"resubmit the job to resume", file=sys.stderr)

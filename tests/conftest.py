"""Shared fixtures: a tiny ImageFolder of real-looking JPEGs, built once per session, a guard that
fails a test whose ranks would each need a GPU of their own that this machine may not have, and a
terminal's Ctrl-C (`ctrl_c_once`).

Every process of the suite runs torch on one thread (unless OMP_NUM_THREADS says otherwise): the test
process, and through the inherited OMP_NUM_THREADS every rank, launcher and `python -m bt_fast.train`
it starts. `make test` runs two test processes on two cores, each starting ranks of its own: a second
intra-op thread per process mostly spins waiting for a core, and costs CPU time without saving any.
"""
from __future__ import annotations

import ast
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, and for every child process

# A suite started in the background by a shell without job control (`make test &` in a script) inherits
# SIGINT ignored, and an ignored signal stays ignored across exec: every command a test interrupts the way
# a terminal's Ctrl-C does would ignore it too. A handler, unlike SIG_IGN, is reset to the default at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import numpy as np
import pytest
import torch
import torch.multiprocessing
from PIL import Image

import bt_fast.distributed

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # (in case torch was imported before this file)

REPO = Path(__file__).resolve().parents[1]
RESOLVE_DEVICE = bt_fast.distributed.resolve_device


class UnpinnedRanksError(RuntimeError):
    """A test started more ranks than this machine has GPUs without pinning device=cpu."""


def resolve_device_pinned(preference: str, local_rank: int = 0, setting: str = "config key 'device'") -> torch.device:
    """`resolve_device`, refusing a rank of a multi-rank run that could not have a GPU of its own.

    With device auto, such a test runs on the CPU here but asks for a missing GPU on a machine with
    fewer GPUs than ranks, so it fails everywhere instead, naming the fix.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and preference != "cpu" and local_rank >= torch.cuda.device_count():
        raise UnpinnedRanksError(f"this test starts {world_size} ranks with {setting} '{preference}', but local rank "
                                 f"{local_rank} has no GPU ({torch.cuda.device_count()} visible); pin device=cpu")
    return RESOLVE_DEVICE(preference, local_rank, setting)


# What a rank imports before its test's function runs. None of it starts a thread (with OMP_NUM_THREADS=1,
# set above, OpenBLAS starts none either) or touches CUDA, so the forkserver that imports it once stays
# single-threaded and a rank forked from it is sound and can use CUDA. Ranks import the rest themselves:
# FFCV's import starts numba's TBB workers, and DALI's initialises its backend, GPU allocator included.
RANK_PRELOAD = ["torch", "torchvision", "numpy", "PIL.Image", "bt_fast.train", "pipelines"]


def _pinned_rank(rank: int, fn, args: tuple, environ: dict, cwd: str) -> None:
    os.environ.clear()  # the starting test's environment and directory, as a spawned rank inherits them
    os.environ.update(environ)
    os.chdir(cwd)
    tempfile.tempdir = None  # the TMPDIR of `environ`, not the forkserver's
    bt_fast.distributed.resolve_device = resolve_device_pinned
    fn(rank, *args)


def spawn_pinned(fn, args=(), nprocs=1, **kwargs):
    """`torch.multiprocessing.spawn` whose ranks resolve their device through `resolve_device_pinned`
    (what `mp.spawn` is inside a test; a module-scoped fixture, set up before that patch, calls this).

    The ranks are forked from a forkserver that imported `RANK_PRELOAD` once per test process: seconds
    saved per rank against spawning, and nothing of the test process inherited. A rank forked from the
    test process itself would inherit its threads (FFCV's, DALI's, torch's) with whatever locks they
    held, and could hang; nor could it use CUDA once the test process had. Production ranks are
    torchrun's fresh processes; tests/test_distributed.py starts those through the launcher.

    A rank ends with `os._exit`, as every multiprocessing child does, so no `atexit` handler of its runs: the
    ranks' temporary files (DALI's autograph writes one per graph function and removes it at exit) go into a
    directory of their own, removed once they have ended."""
    if not kwargs.get("join", True):
        raise ValueError("spawn_pinned joins its ranks: their temporary directory goes once they have ended")
    multiprocessing.set_forkserver_preload(RANK_PRELOAD)  # (no effect once the server runs)
    with tempfile.TemporaryDirectory(prefix="bt_fast_ranks_") as scratch:
        environ = {**os.environ, "TMPDIR": scratch}
        return torch.multiprocessing.start_processes(_pinned_rank, nprocs=nprocs, start_method="forkserver",
                                                     args=(fn, tuple(args), environ, os.getcwd()), **kwargs)


@pytest.fixture(autouse=True)
def ranks_pin_their_device(monkeypatch):
    """Every rank a test starts, in this process or through torch.multiprocessing.spawn, resolves its
    device through `resolve_device_pinned`."""
    monkeypatch.setattr(bt_fast.distributed, "resolve_device", resolve_device_pinned)
    monkeypatch.setattr(torch.multiprocessing, "spawn", spawn_pinned)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now: each socket stays bound until all are chosen, so the kernel
    cannot hand one out twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ctrl_c_once(script: str, args: list[str], ready: Callable[[], bool]) -> subprocess.CompletedProcess:
    """`signalled_once` with SIGINT to the whole group, as Ctrl-C in a terminal sends it."""
    return signalled_once(script, args, ready, signal.SIGINT)


def hangup_default() -> None:
    """SIGHUP as a shell in a terminal leaves it to a command it starts: a suite run under `nohup` has it ignored,
    and so would every command a test starts, which then rightly leaves it alone."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def signalled_once(script: str, args: list[str], ready: Callable[[], bool], sig: int, whole_group: bool = True,
                   start_s: float = 60) -> subprocess.CompletedProcess:
    """Run the Python `script` with `args` from the repository root in a process group of its own, as a terminal
    runs a command; once `ready()` holds (within `start_s`), send `sig` to the whole group (a terminal's Ctrl-C, a
    scheduler stopping the job) or to the command's process alone (`kill -TERM <pid>`). Fails the test if the
    command does not end within a minute. `left_behind` of the result: whether a process of its group (a worker,
    or its zombie) outlived it, killed then."""
    command = [sys.executable, "-c", script, *args]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=hangup_default if sig == signal.SIGHUP else None)
    deadline = time.monotonic() + start_s
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    name = signal.Signals(sig).name
    if proc.poll() is not None:  # nothing left to signal (unreaped, the group still exists until now)
        pytest.fail(f"{args} ended (exit {proc.returncode}) before {name}: {proc.communicate()[1][-2000:]}")
    (os.killpg if whole_group else os.kill)(proc.pid, sig)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{args} hung after {name}")
    done = subprocess.CompletedProcess(command, proc.returncode, out, err)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        done.left_behind = True
    except ProcessLookupError:  # no process of the group is left: the workers were stopped and reaped
        done.left_behind = False
    return done


def modules_loaded_by(code: str, modules: tuple[str, ...]) -> list[str]:
    """Those of `modules` that a new Python process, run from the repository root, has loaded once `code`
    has run there (which must succeed)."""
    probe = f"{code}\nimport sys\nprint([m for m in {modules!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def run_with_stdout_unread(command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` from the repository root with its stdout a pipe whose reader has gone (a `| head` that
    has exited); stderr is captured as text."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(command, cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)


def write_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: tuple[int, int] = (80, 60),
                       seed: int = 0) -> Path:
    """Smooth random colour fields (JPEG-friendly), one sub-directory per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
            image = Image.fromarray(low).resize(size, Image.BICUBIC)
            image.save(root / f"class{c}" / f"img{i:03d}.jpg", quality=90)
    return root


# Started first, longest first. `make test` hands whole modules to its two workers (--dist loadscope
# --no-loadscope-reorder); in xdist's own order, the most tests first, the demo pretraining of test_learning.py
# (about two minutes) began near the end and ran on alone while the other worker idled.
LONGEST_MODULES = ("test_learning.py", "test_distributed.py", "test_reliability.py", "test_kill_resume.py")


def pytest_collection_modifyitems(config, items):
    first = {name: index for index, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """A test of a DALI error keeps the refused graph alive in its exception's traceback, then drops it in a
    reference cycle. Collected later in a process forked by another test, its finalizer would wait forever for
    DALI's threads, which the fork does not copy: collect it here, where they run. The project's own workers
    never collect what they inherit (`bt_fast.worker_pool.garbage_kept_from_forks`); a test's own fork or
    DataLoader is not guarded. Only while a DALI pipeline is alive: a full collection is not free."""
    dali = sys.modules.get("nvidia.dali.pipeline")
    if dali is not None and any(ref() is not None for ref in list(dali.Pipeline._pipes)):
        import gc
        gc.collect()


@pytest.fixture(scope="session", autouse=True)
def no_finished_runs_left(tmp_path_factory):
    """Remove the base directories of earlier, finished test sessions (pytest-of-<user>/pytest-<N> with no
    `.lock`: pytest removes that lock when a session ends) at the start. pytest itself removes them only
    when a run exits, so on a machine that keeps /tmp between jobs a run starts beside the earlier runs'
    files (CI ran out of disk once, at pytest-156). Sessions still running keep their lock and files."""
    numbered = re.compile(r"pytest-(\d+)")
    base = tmp_path_factory.getbasetemp()
    run = base.parent if base.name.startswith("popen-gw") else base  # an xdist worker's is inside the run's
    this = numbered.fullmatch(run.name)
    if not (this and run.parent.name.startswith("pytest-of-")):
        return  # a --basetemp of the user's choosing
    for old in run.parent.iterdir():
        earlier = numbered.fullmatch(old.name)
        if earlier and int(earlier[1]) < int(this[1]) and not old.is_symlink() and not (old / ".lock").exists():
            shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """`tmp_path_factory.mktemp` for a module's shared fixtures; what it made is removed once the module's
    tests are done. A module's runs hold hundreds of MB of checkpoints, and CI machines can have little disk
    (docs/performance.md has the suite's peak before and after)."""
    made = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def split_folder(tmp_path_factory) -> Path:
    """train/ (3 classes of 8) and val/ (3 classes of 4) ImageFolders of 48x40 JPEGs."""
    root = tmp_path_factory.mktemp("split")
    write_image_folder(root / "train", classes=3, per_class=8, size=(48, 40), seed=0)
    write_image_folder(root / "val", classes=3, per_class=4, size=(48, 40), seed=1)
    return root


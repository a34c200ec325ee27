"""Issue 21: one run per out_dir, storage faults end in one line, impossible settings refused before start."""
import contextlib
import errno
import importlib.metadata
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import bt_fast.checkpoint
import bt_fast.files
import bt_fast.memory_budget
import bt_fast.trainer
from bt_fast.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME, CheckpointError, atomic_save, load_checkpoint
from bt_fast.config import ConfigError, load_config
from bt_fast.distributed import DistContext
from bt_fast.errors import StorageError, cli_errors
from bt_fast.files import atomic_write
from bt_fast.memory_budget import (check_memory, conv_elements, estimate, parameter_count,
                                   visible_host_memory)
from bt_fast.model import build_model
from bt_fast.preflight import check_run_inputs, refuse_changed_finished_run
from bt_fast.run_lock import LOCK_NAME, RunLock, RunLockError, check_unlocked
from bt_fast.trainer import Trainer
from test_reliability import metric_lines, run_main, tiny_args

RESUMED = {"model": {}, "optimizer": {}, "scaler": {}, "rng": {}}  # the rest of a checkpoint, for those made here

REPO = Path(__file__).resolve().parents[1]
CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# -- 1. one run per out_dir -------------------------------------------------------------------------------

_HOLDER = """
import sys, time
from bt_fast.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_locked_out_dir_is_one_line_naming_the_holder_and_kill_9_leaves_no_lock(
        image_folder, tmp_path, capsys):
    out_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_main(capsys, *tiny_args(image_folder, out_dir, "max_steps=1"))
        assert code == 2
        assert err.strip().splitlines() == [
            f"error: out_dir {out_dir} is in use by process {holder.pid} on {socket.gethostname()} (it holds "
            f"{out_dir / LOCK_NAME}); wait for that run to end, stop it, or choose another out_dir"]
        assert not (out_dir / CHECKPOINT_NAME).exists() and not (out_dir / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    check_unlocked(out_dir)  # the kernel dropped the dead holder's lock: nothing stale
    with RunLock(out_dir):
        pass


def test_the_lock_is_exclusive_and_released_with_its_file_and_the_directories_it_made(tmp_path):
    out_dir = tmp_path / "a" / "b"
    with RunLock(out_dir) as lock:
        assert (out_dir / LOCK_NAME).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        with pytest.raises(RunLockError, match=f"in use by process {os.getpid()} on "):
            RunLock(out_dir).acquire()
        with pytest.raises(RunLockError):
            check_unlocked(out_dir)
    assert lock.fd is None and not (tmp_path / "a").exists()  # made for the lock, empty again: removed
    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept"):
        (tmp_path / "kept" / "metrics.jsonl").write_text("")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["metrics.jsonl"]


# -- 2. a finished run is not rerun with other settings, nor rewritten ---------------------------------------

@pytest.mark.timeout(600)
def test_a_finished_run_refuses_other_data_and_a_rerun_rewrites_nothing(image_folder, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_main(capsys, *tiny_args(image_folder, out_dir, "warmup_epochs=1"))
    assert code == 0 and out.startswith("done: 3 steps"), err
    assert [line for line in err.splitlines() if line.startswith("warning: warmup_epochs")] == [
        "warning: warmup_epochs (1) >= epochs (1): the learning rate never reaches its peak; lower warmup_epochs"]
    before = snapshot(out_dir)
    assert set(before) >= {"config.yaml", "metrics.jsonl", "summary.json", "metrics.png", CHECKPOINT_NAME}
    recorded = json.loads(before["summary.json"])["images_per_s"]

    other = tmp_path / "other"
    shutil.copytree(image_folder, other)
    code, _, err = run_main(capsys, *tiny_args(other, out_dir, "warmup_epochs=1"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {out_dir} holds a finished run (3 steps) that this command would change (data ")
    assert "choose a new OUT= (out_dir=)" in err
    assert snapshot(out_dir) == before

    code, out, err = run_main(capsys, *tiny_args(image_folder, out_dir, "warmup_epochs=1", "workers=1"))
    assert code == 0, err
    assert out.startswith(f"run already complete: 3 steps on 1 process(es), {recorded:.1f} images/s")
    assert snapshot(out_dir) == before  # config.yaml, summary.json, metrics.png: not one byte rewritten


def test_a_missing_data_path_is_named_before_a_finished_run_it_would_change(image_folder, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    atomic_save({**RESUMED, "step": 6, "schedule_steps": 6, "config": {"data": str(image_folder)}},
                out_dir / CHECKPOINT_NAME)
    typo = tmp_path / "typo"
    for pipeline in ("reference", "ffcv", "dali"):
        config = load_config(None, [f"data={typo}", f"out_dir={out_dir}", f"pipeline={pipeline}"])
        with pytest.raises(ConfigError) as refused:
            check_run_inputs(config)
        assert str(refused.value) == (f"config key 'data' names {typo}, which does not exist; give an ImageFolder "
                                      f"that exists (with make: DATA=...; `make pretrain` without DATA trains on "
                                      f"the demo data)")
    # where the pipeline has a dataset of its own, data need not exist: the next check (the finished run) speaks
    (tmp_path / "typo.beton").touch()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "dataset.json").write_text("{}")  # all the check reads of the records
    for pipeline, extra in (("ffcv", []), ("dali", [f"dali.records={tmp_path / 'shards'}"])):
        config = load_config(None, [f"data={typo}", f"out_dir={out_dir}", f"pipeline={pipeline}", *extra])
        with pytest.raises(CheckpointError, match="holds a finished run"):
            check_run_inputs(config)


def test_another_spelling_of_the_same_data_path_does_not_change_a_finished_run(image_folder, tmp_path):
    """A shell's completion of a directory adds a slash: rerunning a finished run so was refused as other data."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    saved = load_config(None, [f"data={image_folder}", f"out_dir={out_dir}"]).to_dict()
    atomic_save({**RESUMED, "step": 6, "schedule_steps": 6, "config": saved}, out_dir / CHECKPOINT_NAME)
    (tmp_path / "link").symlink_to(image_folder)
    for spelling in (f"{image_folder}/", f"{image_folder.parent}/./{image_folder.name}", tmp_path / "link"):
        check_run_inputs(load_config(None, [f"data={spelling}", f"out_dir={out_dir}"]))
    copy = shutil.copytree(image_folder, tmp_path / "copy")
    with pytest.raises(CheckpointError, match=f"would change \\(data '{image_folder}' -> '{copy}'\\)"):
        check_run_inputs(load_config(None, [f"data={copy}", f"out_dir={out_dir}"]))


def test_only_more_epochs_may_change_a_finished_run_and_a_paused_run_may_change_anything(tmp_path):
    finished = {"step": 6, "schedule_steps": 6}
    refuse_changed_finished_run(tmp_path, finished, ["epochs 2 -> 4"], 6)
    refuse_changed_finished_run(tmp_path, {"step": 3}, ["data 'a' -> 'b'"], 6)  # paused by max_steps or a stop
    with pytest.raises(CheckpointError, match=r"holds a finished run \(6 steps\) that this command would change "
                                              r"\(lr_weights 0.2 -> 0.3\)"):
        refuse_changed_finished_run(tmp_path, finished, ["epochs 2 -> 4", "lr_weights 0.2 -> 0.3"], 6)


# -- 3, 4. storage faults while checkpointing ----------------------------------------------------------------

def _failing_checkpoint_writes(monkeypatch, error: OSError, after: int) -> None:
    """From the `after`+1-th checkpoint.pth on, the write stores some bytes and then fails with `error`."""
    real = bt_fast.checkpoint.atomic_write
    calls = []

    def write(path, content, **options):
        if Path(path).name == CHECKPOINT_NAME:
            calls.append(path)
            if len(calls) > after:
                def fail(handle):
                    handle.write(b"x" * 1000)
                    raise error
                return real(path, fail, **options)
        return real(path, content, **options)
    monkeypatch.setattr(bt_fast.checkpoint, "atomic_write", write)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EROFS, "Read-only file system")], ids=["full", "read-only"])
def test_a_storage_fault_while_checkpointing_is_one_line_and_the_run_resumes_from_the_last_good_one(
        error, image_folder, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "run"
    args = tiny_args(image_folder, out_dir, "checkpoint_every=1", "epochs=1")
    with monkeypatch.context() as patch:
        _failing_checkpoint_writes(patch, error, after=1)
        code, _, err = run_main(capsys, *args)
    assert code == 1
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1, err
    state = torch.load(out_dir / CHECKPOINT_NAME, weights_only=True)
    needed = (out_dir / CHECKPOINT_NAME).stat().st_size  # step 1's file: step 2's is the same but for a few floats
    assert errors[0].startswith(f"error: cannot write {out_dir / CHECKPOINT_NAME} ({error.strerror}): it needs ")
    assert f"; the last good checkpoint is step 1 of 3 in {out_dir / CHECKPOINT_NAME}" in errors[0]
    stated = int(errors[0].split("it needs ")[1].split(" bytes")[0])
    assert abs(stated - needed) < 64
    assert state["step"] == 1 and not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]

    code, out, err = run_main(capsys, *args)  # space freed: the same command resumes
    assert code == 0 and out.startswith("done: 3 steps"), err
    assert f"resuming {out_dir} from step 1 of 3" in err.splitlines()
    assert [m["step"] for m in metric_lines(out_dir)] == [1, 2, 3]
    assert torch.load(out_dir / PREVIOUS_NAME, weights_only=True)["step"] == 2


def test_atomic_save_on_a_full_disk_names_the_bytes_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    atomic_save({"step": 1}, path)
    old = path.read_bytes()
    new = {"step": 2, "weights": torch.zeros(1000)}

    real_save = torch.save

    def full(obj, handle):  # a file on the full disk fails part-way; counting the bytes still works
        if not hasattr(handle, "fileno"):
            return real_save(obj, handle)
        handle.write(b"x" * 100)
        raise RuntimeError("PytorchStreamWriter failed writing file") from OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(bt_fast.checkpoint.torch, "save", full)
    with pytest.raises(StorageError) as raised:
        atomic_save(new, path)
    monkeypatch.undo()
    written = io.BytesIO()
    torch.save(new, written)
    assert str(raised.value).startswith(f"cannot write {path} (No space left on device): it needs "
                                        f"{len(written.getvalue())} bytes")
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_atomic_write_cleanup_never_masks_the_first_error(tmp_path, monkeypatch):
    first = OSError(errno.EROFS, "Read-only file system", "the write")

    def write(handle):
        raise first
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name.endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", "the cleanup")
        return real_unlink(self, missing_ok=missing_ok)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(OSError) as raised:
        atomic_write(tmp_path / "x.json", write)
    assert raised.value is first


def test_the_previous_checkpoint_is_kept_beside_the_new_one(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    for step in (1, 2, 3):
        atomic_save({"step": step}, path, keep_previous=True)
    assert torch.load(path, weights_only=True) == {"step": 3}
    assert torch.load(tmp_path / PREVIOUS_NAME, weights_only=True) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_NAME, PREVIOUS_NAME])
    path.unlink()  # to start afresh, as a damaged checkpoint's error offers
    atomic_save({"step": 1}, path, keep_previous=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no other run's checkpoint "before" it


# -- 5. batch size -----------------------------------------------------------------------------------------

def test_a_batch_of_one_image_per_rank_is_refused_before_anything_starts(image_folder, tmp_path, capsys):
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path / "run", "batch_size=1"))
    assert code == 2 and err.strip().splitlines() == [
        "error: config key 'batch_size' must be at least 2 (BatchNorm needs 2 images per rank), got 1"]
    assert not (tmp_path / "run").exists()
    two_ranks = DistContext(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    config = load_config("configs/demo_cpu.yaml", [f"data={image_folder}", f"out_dir={tmp_path}", "batch_size=2"])
    with pytest.raises(ConfigError, match=r"'batch_size' \(2\) gives 1 image per rank over 2 ranks; BatchNorm needs "
                                          r"at least 2 per rank: use batch_size >= 4"):
        Trainer(config, two_ranks)


# -- 6. memory -------------------------------------------------------------------------------------------

def test_the_memory_estimate_is_the_documented_arithmetic():
    side, batch = 32, 4
    model = build_model("resnet18", "64-64", channels_last=False).eval()
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel()))
             for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.backbone(torch.zeros(1, 3, side, side))
    for hook in hooks:
        hook.remove()
    assert conv_elements("resnet18", side) == sum(outputs)
    params = sum(p.numel() for p in model.parameters())
    assert parameter_count("resnet18", "64-64") == params == sum(
        p.numel() for p in torchvision.models.resnet18().parameters()) - (512 * 1000 + 1000) + 512 * 64 + 2 * 64 + 64 * 64

    pixels = 2 * batch * 3 * side * side
    device = pixels * 2 + 2 * batch * sum(outputs) * 2 + 12 * params
    reference = estimate(arch="resnet18", projector="64-64", pipeline="reference", batch=batch, side=side, dtype_bytes=2)
    assert (reference.host, reference.device) == (pixels * 4, device)
    padded = batch * 60 * 80 * 3
    ffcv = estimate(arch="resnet18", projector="64-64", pipeline="ffcv", batch=batch, side=side, dtype_bytes=2,
                    ffcv_crop="device", ffcv_decode="host", padded=(60, 80))
    assert (ffcv.host, ffcv.device) == (padded, device + padded + pixels * 4)
    on_cuda = estimate(arch="resnet18", projector="64-64", pipeline="ffcv", batch=batch, side=side, dtype_bytes=2,
                       ffcv_crop="device", ffcv_decode="host", padded=(60, 80), crop_bytes=2)  # float16 crops
    assert on_cuda.device == device + padded + pixels * 2
    host_crop = estimate(arch="resnet18", projector="64-64", pipeline="ffcv", batch=batch, side=side, dtype_bytes=4,
                         ffcv_crop="host", ffcv_decode="host", padded=(60, 80))
    assert host_crop.host == padded + pixels
    assert host_crop.device == pixels * 4 + 2 * batch * sum(outputs) * 4 + 12 * params
    # Three loader workers, each with two batches of two float32 views ready in /dev/shm.
    workers = estimate(arch="resnet18", projector="64-64", pipeline="reference", batch=batch, side=side, dtype_bytes=2,
                       loader_workers=3)
    assert (workers.shared, reference.shared, ffcv.shared) == (3 * 2 * (2 * batch * 3 * side * side * 4), 0, 0)


def test_the_host_memory_limit_is_the_lowest_of_the_processs_cgroup_and_those_above_it(tmp_path):
    """A SLURM job's limit sits in a cgroup below the root (v2: memory.max; v1: memory.limit_in_bytes); the
    root's own file alone (a container's) missed it. A sibling's lower limit is not this process's."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    root = tmp_path / "cgroup"
    limits = {"system.slice/job_7/memory.max": str(3 << 30), "system.slice/job_7/step_0/memory.max": "max",
              "system.slice/job_8/memory.max": str(1 << 30), "memory.max": "max"}
    for name, text in limits.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    own = tmp_path / "cgroup_of_self"
    own.write_text("0::/system.slice/job_7/step_0\n")
    assert visible_host_memory(root, own) == min(physical, 3 << 30)
    own.write_text("0::/system.slice/job_8_sibling\n")
    assert visible_host_memory(root, own) == physical
    (root / "memory" / "batch" / "job_9").mkdir(parents=True)  # cgroup v1
    (root / "memory" / "batch" / "job_9" / "memory.limit_in_bytes").write_text(str(2 << 30))
    own.write_text("4:memory:/batch/job_9\n0::/\n")
    assert visible_host_memory(root, own) == min(physical, 2 << 30)


def test_an_image_size_that_cannot_fit_is_refused_in_one_line_and_leaves_no_out_dir(image_folder, tmp_path, capsys):
    out_dir = tmp_path / "new" / "run"
    code, _, err = run_main(capsys, *tiny_args(image_folder, out_dir, "augment.image_size=100000"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: config keys 'augment.image_size' (100000) and 'batch_size' (8) need at least ")
    assert "TiB of host memory per step (host views " in err
    assert "lower batch_size (now 8) or augment.image_size (now 100000)" in err
    assert not (tmp_path / "new").exists()


def test_reference_batches_that_cannot_fit_in_dev_shm_are_refused_before_anything_starts(image_folder, tmp_path,
                                                                                          capsys, monkeypatch):
    need = 2 * 2 * (2 * 8 * 3 * 32 * 32 * 4)  # 2 workers x 2 ready batches x two float32 views of 8 images of 32 px
    assert need == 768 * 2**10
    sizes = {}
    monkeypatch.setattr(bt_fast.memory_budget, "size_bytes", lambda path: sizes[path])
    monkeypatch.setattr(bt_fast.memory_budget, "free_bytes", lambda path: sizes[path])
    sizes["/dev/shm"] = need
    config = load_config("configs/demo_cpu.yaml", tiny_args(image_folder, tmp_path / "run", "workers=2")[2:])
    check_memory(config, CPU, None)  # it fits exactly
    sizes["/dev/shm"] = need - 2**10
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path / "run", "workers=2"))
    assert code == 2 and err.strip().splitlines() == [
        "error: config keys 'workers' (2) and 'batch_size' (8) need at least 768.0 KiB of shared memory for the "
        "batches the reference pipeline's loader workers keep ready (2 each), but /dev/shm holds 767.0 KiB; lower "
        "batch_size (now 8) or workers (now 2), or give the machine more shared memory (docker run --shm-size)"]
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"")  # a run to resume, whose batch size cannot change
    with pytest.raises(ConfigError, match=r"holds 767\.0 KiB; lower workers \(now 2\), or give the machine more"):
        check_memory(config, CPU, None)
    # More workers than cores start one per core (`loader_workers`): the same need, which only fewer than that lower.
    monkeypatch.setattr("pipelines.reference.usable_cores", lambda: 2)
    many = load_config("configs/demo_cpu.yaml", tiny_args(image_folder, tmp_path / "other", "workers=16")[2:])
    with pytest.raises(ConfigError, match=r"^config keys 'workers' \(16; 2 start, one per usable core\) and "
                                          r"'batch_size' \(8\) need at least 768\.0 KiB .* lower batch_size \(now 8\) "
                                          r"or workers below 2, or give"):
        check_memory(many, CPU, None)


def _can_mount_a_private_tmpfs() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", "/mnt"], capture_output=True
    ).returncode == 0


def in_a_small_dev_shm(command: list[str], free_kib: int, timeout: float) -> subprocess.CompletedProcess:
    """`command` run where /dev/shm is a 4 MiB tmpfs with `free_kib` KiB left (a private mount namespace)."""
    script = f'mount -t tmpfs -o size=4M tmpfs /dev/shm && fallocate -l {4096 - free_kib}K /dev/shm/filled && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


needs_a_private_dev_shm = pytest.mark.skipif(not _can_mount_a_private_tmpfs(),
                                             reason="needs a private mount namespace (root) for a small /dev/shm")


@pytest.mark.timeout(180)
@needs_a_private_dev_shm
def test_a_full_dev_shm_is_refused_at_start_and_one_filled_while_training_is_one_line(image_folder, tmp_path):
    """/dev/shm with 64 KiB of its 4 MiB left, where the workers' ready batches need 384 KiB (a batch of 8 is
    96 KiB a view): refused at start, naming what is free. Filled after that check (the check skipped here), the
    DataLoader worker's error from torch becomes one line, exit 2 (the same on every retry), not a traceback, nor
    a storage fault of out_dir's."""
    out_dir = tmp_path / "run"
    args = tiny_args(image_folder, out_dir, "workers=1")
    proc = in_a_small_dev_shm([sys.executable, "-m", "bt_fast.train", *args], free_kib=64, timeout=80)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: config keys 'workers' (1) and 'batch_size' (8) need at least 384.0 KiB of shared memory for the "
        "batches the reference pipeline's loader workers keep ready (2 each), but /dev/shm has only 64.0 KiB free of "
        "4.0 MiB; free some (files of stopped programs, such as torch_* ones left by killed runs), or lower batch_size "
        "(now 8) or workers (now 1)"], proc.stderr[-3000:]
    filled_after_the_check = ("import sys, bt_fast.train as t; t.check_memory = lambda *args: None; "
                              "t.main(sys.argv[1:])")
    proc = in_a_small_dev_shm([sys.executable, "-c", filled_after_the_check, *args], free_kib=64, timeout=80)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: the DataLoader cannot pass batches from its workers: shared memory (/dev/shm, 4.0 MiB) is full; no "
        f"checkpoint was written yet in {out_dir}: lower batch_size (now 8) or workers (now 1), or give the machine "
        f"more shared memory (docker run --shm-size) and rerun"], proc.stderr[-3000:]


_MAKE_A_LOCK = """
import multiprocessing
from bt_fast.files import shared_memory_full, storage_fault
try:
    multiprocessing.Lock()
except OSError as err:
    print(shared_memory_full(err), storage_fault(err), err.errno)
"""


@pytest.mark.timeout(180)
@needs_a_private_dev_shm
def test_a_lock_that_a_full_dev_shm_keeps_from_being_made_is_full_shared_memory_not_storage(image_folder, tmp_path):
    proc = in_a_small_dev_shm([sys.executable, "-c", _MAKE_A_LOCK], free_kib=0, timeout=60)
    assert proc.stdout.strip() == f"shared memory (/dev/shm, 4.0 MiB) is full None {errno.ENOSPC}", proc.stderr
    # The converter's worker pool: not "cannot write output".
    convert = [sys.executable, "-m", "tools.convert", str(image_folder), str(tmp_path / "out.beton"),
               "--format", "ffcv", "--workers", "2"]
    proc = in_a_small_dev_shm(convert, free_kib=0, timeout=110)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: shared memory (/dev/shm, 4.0 MiB) is full: free some, give the machine more (docker run --shm-size) "
        "or use fewer worker processes, and rerun"], proc.stderr[-3000:]


def step_that_runs_out_of_memory(at_step: int, allocate):
    """`Trainer.train_step` whose step number `at_step` (1-based) first calls `allocate`, which raises."""
    real_step = Trainer.train_step

    def step(self, y1, y2):
        if self.step + 1 == at_step:
            allocate()
        return real_step(self, y1, y2)
    return step


def test_memory_that_runs_out_in_a_step_is_one_line_naming_what_needs_less_and_the_last_checkpoint(
        image_folder, tmp_path, capsys, monkeypatch):
    """torch's CPU allocator refusing 4 EiB: the settings that would need less, the batch size only while no
    checkpoint holds it (a resume keeps it); a GPU's OutOfMemoryError (torch's message, CUDACachingAllocator.cpp)
    names the GPU and the amount it asked for."""
    out_dir = tmp_path / "run"
    monkeypatch.setattr(Trainer, "train_step", step_that_runs_out_of_memory(3, lambda: torch.empty(2**62,
                                                                                                 dtype=torch.uint8)))
    code, _, err = run_main(capsys, *tiny_args(image_folder, out_dir, "checkpoint_every=2"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: out of host memory at step 3 (asking for 4.0 EiB); the last good checkpoint is step 2 "
        f"of 3 in {out_dir / 'checkpoint.pth'}: free memory or lower augment.image_size (now 32) or workers (now 0) "
        f"and rerun the same command to resume from it"]

    def cuda_out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 1.06 GiB is free.")
    monkeypatch.setattr(Trainer, "train_step", step_that_runs_out_of_memory(1, cuda_out_of_memory))
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path / "new"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: out of GPU memory at step 1 (asking for 2.00 GiB); no checkpoint was written yet in "
        f"{tmp_path / 'new'}: free memory or lower batch_size (now 8) or augment.image_size (now 32) and rerun"]


def test_memory_that_runs_out_between_steps_is_not_blamed_on_a_step(image_folder, tmp_path, capsys, monkeypatch):
    """The k-NN monitor after the epoch's last step: no step ran out, so no step's setting is the fix."""
    out_dir = tmp_path / "run"
    monkeypatch.setattr(Trainer, "monitor_knn", lambda *args, **kwargs: torch.empty(2**62, dtype=torch.uint8))
    code, _, err = run_main(capsys, *tiny_args(image_folder, out_dir, "knn_every=1", f"knn_val={image_folder}"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: out of host memory after step 3 (asking for 4.0 EiB); the last good checkpoint is step 3 of 3 in "
        f"{out_dir / 'checkpoint.pth'}: free memory and rerun the same command to resume from it"]


def test_our_own_error_that_mentions_memory_is_printed_as_it_is(capsys):
    """A checkpoint too large for this host names its file (bt_fast.checkpoint.load_checkpoint); torch's words
    inside it are not another out-of-memory error to reword."""
    line = ("checkpoint /runs/x/checkpoint.pth does not fit in memory here (DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 9437184 bytes); free memory and rerun")
    with pytest.raises(SystemExit) as exit_info, cli_errors():
        raise CheckpointError(line)
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [f"error: {line}"]


def test_memory_that_runs_out_in_any_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info, cli_errors():
        torch.empty(2**62, dtype=torch.uint8)
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "error: out of host memory (asking for 4.0 EiB): free memory, or give the command less to hold at once "
        "(smaller batches or images), and rerun"]


def test_torch_compile_on_the_cpu_without_a_cpp_compiler_is_refused_before_the_pipeline_is_built(
        image_folder, tmp_path, capsys, monkeypatch):
    """Else torch's InductorError traceback at the first step, after a first-use conversion of hours."""
    from torch._inductor import config as inductor_config
    monkeypatch.setattr(bt_fast.trainer, "build_pipeline", lambda *args: pytest.fail("the pipeline was built"))
    with inductor_config.patch({"cpp.cxx": (None, "bt-fast-no-such-compiler")}):  # (monkeypatch's undo deletes it)
        code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path / "run", "compile_optimizer=true",
                                                   "augment.backend=compile"))
    assert inductor_config.cpp.cxx[-1] != "bt-fast-no-such-compiler"
    assert code == 2 and err.strip().splitlines() == [
        "error: torch.compile on the CPU needs a C++ compiler and none works here (bt-fast-no-such-compiler; $CXX "
        "names another): install one (apt-get install g++) or set compile_optimizer=false augment.backend=eager"]


def test_host_crop_sizes_above_what_the_beton_stores_are_refused(image_folder, tmp_path):
    config = load_config("configs/demo_cpu.yaml", [f"data={tmp_path / 'images'}", "pipeline=ffcv", "ffcv.crop=host",
                                                   "ffcv.max_resolution=64", "augment.image_size=96", "device=cpu"])
    with pytest.raises(ConfigError, match=r"'augment.image_size' \(96\) is above ffcv.max_resolution, the largest "
                                          r"side the first-use conversion stores \(64 px\)"):
        check_memory(config, CPU, None)
    assert not (tmp_path / "images.beton").exists()


# -- 7. smaller ----------------------------------------------------------------------------------------------

def test_an_unreadable_checkpoint_is_reported_before_the_first_use_conversion(image_folder, tmp_path, capsys):
    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    atomic_save({"step": 1, "payload": torch.zeros(10000)}, out_dir / CHECKPOINT_NAME)
    whole = (out_dir / CHECKPOINT_NAME).read_bytes()
    (out_dir / CHECKPOINT_NAME).write_bytes(whole[: len(whole) // 2])
    code, _, err = run_main(capsys, *tiny_args(data, out_dir, "pipeline=ffcv"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip() == (f"error: checkpoint {out_dir / CHECKPOINT_NAME} is incomplete (it ends before the directory "
                           f"a torch-saved file ends with: a write or a copy cut short); delete it or choose another "
                           f"out_dir")
    assert not (tmp_path / "images.beton").exists()


def test_a_checkpoint_that_memory_or_permissions_keep_from_loading_is_not_called_damaged(tmp_path, monkeypatch):
    """Only a file that is damaged gets the advice to delete it: a good checkpoint that did not fit in memory,
    or that this user may not read, must not be deleted on the error's word."""
    path = tmp_path / CHECKPOINT_NAME
    atomic_save({"step": 1}, path)

    def refuse(error):
        def load(*args, **kwargs):
            raise error
        return load

    monkeypatch.setattr(torch, "load", refuse(PermissionError(errno.EACCES, os.strerror(errno.EACCES))))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert str(refused.value) == f"checkpoint {path} cannot be read (Permission denied); make it readable and rerun"
    for error in (MemoryError(), torch.OutOfMemoryError("CUDA out of memory."),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 419430400 bytes. Error code 12 (Cannot allocate memory)")):
        monkeypatch.setattr(torch, "load", refuse(error))
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(path)
        assert str(refused.value).startswith(f"checkpoint {path} does not fit in memory here (")
        assert str(refused.value).endswith("); free memory and rerun") and "delete" not in str(refused.value)
    assert path.is_file()


@pytest.mark.parametrize("kind", ["a backbone.pth", "a list", "a directory"])
def test_a_checkpoint_pth_that_is_no_training_checkpoint_is_one_line_before_anything_starts(kind, image_folder,
                                                                                            tmp_path, capsys):
    """A torchvision state dict put there to start from, say: the resume failed with a KeyError traceback."""
    data = shutil.copytree(image_folder, tmp_path / "images")
    out_dir, path = tmp_path / "run", tmp_path / "run" / CHECKPOINT_NAME
    out_dir.mkdir()
    if kind == "a directory":
        path.mkdir()
    else:
        torch.save(torchvision.models.resnet18().state_dict() if kind == "a backbone.pth" else [1, 2], path)
    code, _, err = run_main(capsys, *tiny_args(data, out_dir, "pipeline=ffcv"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: checkpoint {path} is ")
    assert err.strip().endswith(f"move it out of {out_dir} to start afresh there, or choose another out_dir"
                                if kind != "a directory" else f"move it out of {out_dir}, or choose another out_dir")
    assert sorted(p.name for p in out_dir.iterdir()) == [CHECKPOINT_NAME]
    assert not (tmp_path / "images.beton").exists()  # refused before the first-use conversion


def test_a_checkpoint_whose_bytes_changed_on_disk_is_refused_not_trained_on(image_folder, tmp_path, capsys):
    """torch.load does not check the CRC-32s torch.save writes into its zip archive (zipfile does): a
    changed byte inside a tensor resumed the run from wrong weights."""
    out_dir = tmp_path / "run"
    code, _, err = run_main(capsys, *tiny_args(image_folder, out_dir, "max_steps=2", "checkpoint_every=1"))
    assert code == 0, err
    path = out_dir / CHECKPOINT_NAME
    weight = torch.load(path, weights_only=True)["model"]["projector.0.weight"]
    whole = bytearray(path.read_bytes())
    at = bytes(whole).index(weight.numpy().tobytes()) + weight.numel() * 2  # a byte in the middle of the tensor
    whole[at] ^= 0xFF
    path.write_bytes(bytes(whole))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is not None  # the stdlib sees the damage
    code, _, err = run_main(capsys, *tiny_args(image_folder, out_dir, "max_steps=3", "checkpoint_every=1"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: checkpoint {path} is damaged (its entry ")
    assert err.strip().endswith(f"fails the CRC-32 it was written with); rename {PREVIOUS_NAME} (the one before it) "
                                f"to {CHECKPOINT_NAME} to resume from there, delete it to start afresh, or choose "
                                f"another out_dir")


def test_a_checkpoint_written_without_crcs_still_loads(tmp_path):
    state = {"step": 1, "weights": torch.arange(1000.0)}
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        atomic_save(state, tmp_path / CHECKPOINT_NAME)
    finally:
        torch.serialization.set_crc32_options(previous)
    with zipfile.ZipFile(tmp_path / CHECKPOINT_NAME) as archive:
        assert {info.CRC for info in archive.infolist()} == {0}  # nothing to check against
    assert torch.equal(load_checkpoint(tmp_path / CHECKPOINT_NAME)["weights"], state["weights"])


@pytest.mark.parametrize("inside", ["", "runs/x"])
@pytest.mark.parametrize("key", ["data", "knn_val"])
def test_an_out_dir_within_a_folder_the_run_reads_is_refused_before_anything_is_written(key, inside, image_folder,
                                                                                     tmp_path, capsys):
    """Else its checkpoints, plots and logs would be listed as that dataset's images and classes."""
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    before = sorted(folder.rglob("*"))
    out_dir = folder / inside if inside else folder
    code, _, err = run_main(capsys, *tiny_args(image_folder, out_dir, f"{key}={folder}"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: config key 'out_dir' ({out_dir}) is within config key '{key}' ({folder}): the run's files would "
        f"become part of that dataset; choose an out_dir outside it"]
    assert sorted(folder.rglob("*")) == before


def test_the_root_of_a_split_dataset_as_data_is_refused_naming_its_train_folder(image_folder, tmp_path, capsys):
    """tools.evaluate's layout (train/ and val/ in one folder): pretraining would read both splits as two classes."""
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        shutil.copytree(image_folder, root / split)
    code, _, err = run_main(capsys, *tiny_args(root, tmp_path / "run"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: config key 'data' names {root}, which holds train/ and val/: pretraining would read both splits as "
        f"two classes; give data={root / 'train'}"]
    assert not (tmp_path / "run").exists()


def test_class_folders_without_images_fail_the_check_as_they_fail_the_run(tmp_path, capsys):
    """`--check` (and so the launcher) said "check passed" where the only class folder held a text file; the run
    then stopped at its first listing."""
    data = tmp_path / "data"
    (data / "class0").mkdir(parents=True)
    (data / "class0" / "readme.txt").write_text("no images here\n")
    for check in (["--check"], []):
        code, _, err = run_main(capsys, *check, *tiny_args(data, tmp_path / "run"))
        assert code == 2 and err.strip().splitlines() == [
            f"error: data directory {data} holds no images in class sub-directories (expected "
            f"{data}/<class>/<image>.jpg)"]
    assert not (tmp_path / "run").exists()


def test_check_creates_nothing(image_folder, tmp_path, capsys):
    code, _, err = run_main(capsys, "--check", *tiny_args(image_folder, tmp_path / "a" / "b"))
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []


def test_options_may_come_between_and_after_the_overrides(image_folder, tmp_path, capsys):
    """make's ARGS come after the overrides run_pretrain.sh builds: `ARGS="--check epochs=2"`."""
    args = tiny_args(image_folder, tmp_path / "run")
    code, _, err = run_main(capsys, *args[2:5], "--check", *args[5:], "--config", args[1], "augment.blur_p=[0.5,0.5]")
    assert code == 0 and err == ""
    code, _, err = run_main(capsys, "--check", *args, "seed=x")
    assert code == 2 and err.strip() == "error: config key 'seed' expects a number, got 'x'"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, message", [
    (["lr_weights=inf"], "config key 'lr_weights' must be a finite number, got inf"),
    (["lr_biases=.nan"], "config key 'lr_biases' must be a finite number, got nan"),
    (["epochs=inf"], "config key 'epochs' expects a whole number, got 'inf'"),
    (["epochs=1", "epochs=7"], "config key 'epochs' is given twice (epochs=1, epochs=7); give each key once"),
])
def test_infinite_values_and_keys_given_twice_are_refused(overrides, message, image_folder, tmp_path, capsys):
    code, _, err = run_main(capsys, "--config", "configs/demo_cpu.yaml", f"data={image_folder}",
                            f"out_dir={tmp_path / 'run'}", *overrides)
    assert code == 2 and err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


def test_summary_versions_are_the_installed_distributions():
    import ffcv  # noqa: F401  (loaded: its version is reported)
    from bt_fast.run_log import versions
    found = versions()
    for name in ("torch", "torchvision", "numpy", "ffcv"):
        assert found[name] == importlib.metadata.version(name), name


def test_a_file_system_without_locks_gets_a_warning_not_a_refusal(tmp_path, capsys, monkeypatch):
    import bt_fast.run_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(bt_fast.run_lock.fcntl, "flock", no_locks)
    check_unlocked(tmp_path)
    (tmp_path / LOCK_NAME).write_text("")
    check_unlocked(tmp_path)
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / LOCK_NAME).exists()
    assert capsys.readouterr().err.startswith(f"warning: the file system of {tmp_path / 'run'} refuses locks "
                                              f"(No locks available)")
    assert not (tmp_path / "run").exists()


def test_evaluate_prints_throttled_progress_without_a_terminal(split_folder, capsys, monkeypatch):
    import bt_fast.progress
    import tools.evaluate as ev
    monkeypatch.setattr(bt_fast.progress, "LOG_INTERVAL_S", 0.0)  # every update is due
    assert ev.main(["--random-init", "--arch", "resnet18", "--data", str(split_folder), "--mode", "knn",
                    "--image-size", "32", "--workers", "0", "--device", "cpu", "--batch-size", "16"]) == 0
    err = capsys.readouterr().err
    assert "train features: 100%" in err and "val features: 100%" in err


def test_a_bar_that_a_signal_cut_off_while_it_was_built_closes_without_an_error():
    """Its __del__ closes it: "Exception ignored in tqdm.__del__ ... no attribute 'disable'" after the error line."""
    from bt_fast.progress import _LogLines
    bar = _LogLines.__new__(_LogLines)  # what tqdm's __init__ has made when a KeyboardInterrupt leaves it
    bar.close()


def test_progress_in_a_log_is_whole_lines_and_none_for_a_short_job(capsys, monkeypatch):
    import bt_fast.progress
    from bt_fast.progress import progress

    def job():  # what the trainer does: updates, a postfix, a line written through the bar, close
        bar = progress(total=4, unit="step")
        for step in range(4):
            bar.update(1)
            bar.set_postfix(loss=f"{10 - step:.2f}", refresh=step == 1)
            if step == 2:
                bar.write("epoch 0: k-NN top-1 50.00%")
        bar.close()
        print("done: 4 steps")

    job()  # far shorter than LOG_INTERVAL_S
    out, err = capsys.readouterr()
    assert out == "epoch 0: k-NN top-1 50.00%\ndone: 4 steps\n" and err == ""

    monkeypatch.setattr(bt_fast.progress, "LOG_INTERVAL_S", 0.0)  # every update is due
    job()
    out, err = capsys.readouterr()
    assert out == "epoch 0: k-NN top-1 50.00%\ndone: 4 steps\n"
    assert "\r" not in err and err.endswith("\n")
    counts = [line.split("|")[2].split()[0] for line in err.splitlines()]  # '<n>/4' of each line
    assert counts[-1] == "4/4" and "loss=7.00" in err.splitlines()[-1]  # the final state, postfix included


def test_dali_records_given_as_data_are_read_as_records(image_folder, tmp_path):
    from pipelines.base import Placement
    from pipelines.convert import convert
    from pipelines.dali import DALIPipeline, RecordSource
    records = tmp_path / "wds"
    convert(image_folder, records, "dali", workers=1, shard_size=10, progress=False)
    config = load_config(None, [f"data={records}", "pipeline=dali", "workers=1", "augment.image_size=16"])
    pipeline = DALIPipeline(config, Placement(torch.device("cpu"), torch.float32, 0, 1), 4)
    assert isinstance(pipeline.source, RecordSource) and len(pipeline.source) == 24
    view1, view2 = next(iter(pipeline))
    assert view1.shape == view2.shape == (4, 3, 16, 16)


def test_help_gives_every_key_its_allowed_values_and_what_it_does(capsys):
    import dataclasses
    from bt_fast.config import Config
    from bt_fast.train import main

    def keys(node, prefix=""):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            yield from keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [f"{prefix}{f.name}"]
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for key in keys(Config()):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {key} = "))
        allowed, _, what = lines[at + 1].strip().partition(": ")
        assert allowed and what, (key, lines[at + 1])
    assert any(line.startswith("      auto | bfloat16 | float16 | none: autocast dtype") for line in lines)
    assert any(line.startswith("      reference | ffcv | dali: ") for line in lines)


# Every command that loads torch at start-up, with arguments it would accept.
COMMANDS_LOADING_TORCH = {"bt_fast.train": ["--help"], "tools.evaluate": ["--help"], "tools.bench": ["--help"],
                          "tools.gpu_check": ["--help"], "tools.preview": ["--help"], "tools.launch": ["--help"],
                          "tools.dali_semantics": ["--help"]}  # not tools.plot (tests/test_run_log.py -k loads_no_torch)
# A process killed by SIGINT (-2) is what the shell reports as 130 too. CPython ends that way, message and
# all, when the KeyboardInterrupt met code that torch's import runs through PyRun_String.
INTERRUPTED = (130, -signal.SIGINT)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", COMMANDS_LOADING_TORCH)
def test_ctrl_c_while_torch_loads_is_one_line(module):
    process = subprocess.Popen([sys.executable, "-m", module, *COMMANDS_LOADING_TORCH[module]], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{process.pid}/maps")
    with contextlib.suppress(FileNotFoundError):  # (gone already: the assertions below say so)
        while process.poll() is None and "libtorch" not in maps.read_text():  # torch's import has begun
            pass
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode in INTERRUPTED
    assert err.strip().splitlines() == ["error: interrupted while starting (loading torch); nothing was written"]


# Ctrl-C arriving while Python runs a callback it cannot raise from: Python prints "Exception ignored in ..."
# and the command goes on as if no Ctrl-C had come (seen: importlib's module-lock weakref callback while torch
# loads; logging's callback after a fork, as evaluate's DataLoader started its workers).
UNRAISABLE_INTERRUPT = """
import os, signal, sys, time, weakref
from bt_fast.errors import exit_on_interrupt

def interrupted_callback(*_):
    signal.raise_signal(signal.SIGINT)  # the terminal's Ctrl-C: KeyboardInterrupt is raised in the callback

with exit_on_interrupt("at work"):
    if sys.argv[1] == "fork":
        os.register_at_fork(after_in_parent=interrupted_callback)
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
    else:
        referent = type("Referent", (), {})()
        reference = weakref.ref(referent, interrupted_callback)
        del referent
    time.sleep(20)  # the rest of the command's work
    print("went on as if not interrupted")
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("callback", ["fork", "weakref"])
def test_ctrl_c_during_a_callback_python_cannot_raise_from_still_stops_the_command(callback):
    result = subprocess.run([sys.executable, "-c", UNRAISABLE_INTERRUPT, callback], cwd=REPO, capture_output=True,
                            text=True, timeout=50)
    assert (result.returncode, result.stdout) == (130, ""), result.stdout + result.stderr
    assert result.stderr.splitlines() == ["error: interrupted at work; nothing was written"]


@pytest.mark.timeout(300)
def test_ctrl_c_during_the_gpu_checks_is_one_line(tmp_path):
    """On the CPU the checks run for tens of seconds; interrupted after the first check's line."""
    out = tmp_path / "checks.json"
    process = subprocess.Popen([sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--json", str(out)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    first = process.stdout.readline()
    os.killpg(process.pid, signal.SIGINT)  # the terminal's Ctrl-C: every process of the command
    rest, err = process.communicate(timeout=120)
    assert first.startswith("augment float16 ") and " pass " in first, first
    assert process.returncode in INTERRUPTED, err[-2000:]
    assert err.strip().splitlines() == ["error: interrupted; nothing was written (the JSON comes after the checks)"]
    assert "Traceback" not in rest and not out.exists()


@pytest.mark.timeout(300)
def test_ctrl_c_in_the_first_use_conversion_says_what_is_kept_and_the_rerun_trains(image_folder, tmp_path, capsys,
                                                                                  monkeypatch):
    from pipelines.convert import work_dir
    from pipelines.images import ImagePrep
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    args = tiny_args(data, tmp_path / "run", "pipeline=ffcv", "max_steps=1", "workers=1")  # converts in this process
    stored, calls = ImagePrep.stored, []

    def interrupted_at_the_fifth(self, path):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt  # what Ctrl-C raises in the converting process
        return stored(self, path)
    with monkeypatch.context() as patch:
        patch.setattr(ImagePrep, "stored", interrupted_at_the_fifth)
        code, _, err = run_main(capsys, *args)
    beton = Path(f"{data}.beton")
    assert code == 130
    assert err.strip().splitlines() == [
        f"converting {data} to {beton} for the FFCV pipeline (first use)",
        f"error: interrupted while converting {data} to {beton} (first use); no part was finished yet"]
    assert not beton.exists() and work_dir(beton).is_dir()

    code, out, err = run_main(capsys, *args)
    assert code == 0 and out.startswith("done: 1 steps"), err
    assert beton.is_file() and not work_dir(beton).exists()


@pytest.mark.timeout(600)
def test_a_full_disk_while_writing_the_backbone_names_the_complete_checkpoint(image_folder, tmp_path, capsys,
                                                                              monkeypatch):
    out_dir = tmp_path / "run"
    real = bt_fast.checkpoint.atomic_write

    def write(path, content, **options):
        if Path(path).name == "backbone.pth":
            def fail(handle):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, fail, **options)
        return real(path, content, **options)
    with monkeypatch.context() as patch:
        patch.setattr(bt_fast.checkpoint, "atomic_write", write)
        code, _, err = run_main(capsys, *tiny_args(image_folder, out_dir, "max_steps=2"))
    assert code == 1
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: cannot write {out_dir / 'backbone.pth'} (No space left on device): it needs ")
    assert line.endswith(f"; the last good checkpoint is step 2 of 2 in {out_dir / CHECKPOINT_NAME}: free space "
                         f"there (or make it writable) and rerun the same command to resume from it")
    code, out, _ = run_main(capsys, *tiny_args(image_folder, out_dir, "max_steps=2"))
    assert code == 0 and out.startswith("run already complete at max_steps=2 ") and (out_dir / "backbone.pth").is_file()


def test_the_launcher_refuses_a_changed_finished_run_once_before_torchrun(image_folder, tmp_path, capsys):
    from tools import launch
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    atomic_save({**RESUMED, "step": 6, "schedule_steps": 6, "config": {"data": "/elsewhere"}},
                out_dir / CHECKPOINT_NAME)
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["--nproc-per-node", "2", "-m", "bt_fast.train", "--config", "configs/demo_cpu.yaml",
                     f"data={image_folder}", f"out_dir={out_dir}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out_dir} holds a finished run (6 steps) that this command would change (data '/elsewhere' -> "
        f"'{image_folder}'); choose a new OUT= (out_dir=) for a new run, or rerun with the run's own settings "
        f"(raising epochs extends it)"]


@pytest.mark.parametrize("change, message", [
    ("batch_size=4", "was written with batch_size 8, this run uses 4; use a new out_dir or the same batch size"),
    ("projector=32-32", "was written for a different model (projector '64-64' -> '32-32'); use a new out_dir or "
                        "the matching arch/projector"),
])
def test_a_paused_run_refuses_another_model_or_batch_once_before_anything_is_built(change, message, image_folder,
                                                                                   tmp_path, capsys, monkeypatch):
    """Each rank built its pipeline (a first-use conversion) before refusing, once per torchrun restart."""
    from tools import launch
    data = shutil.copytree(image_folder, tmp_path / "images")
    out_dir = tmp_path / "run"
    code, _, err = run_main(capsys, *tiny_args(data, out_dir, "max_steps=1"))
    assert code == 0, err
    monkeypatch.setattr(launch.torchrun, "run", lambda options: pytest.fail("torchrun started"))
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["--nproc-per-node", "2", "-m", "bt_fast.train", *tiny_args(data, out_dir, change)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: checkpoint {out_dir / CHECKPOINT_NAME} {message}"]
    code, _, err = run_main(capsys, *tiny_args(data, out_dir, change, "pipeline=ffcv"))
    assert code == 2 and err.strip() == f"error: checkpoint {out_dir / CHECKPOINT_NAME} {message}"
    assert not (tmp_path / "images.beton").exists()


def test_settings_of_how_not_what_may_change_on_a_finished_run(tmp_path):
    from bt_fast.preflight import changed_settings
    saved = load_config(None, ["data=/d"]).to_dict()
    rerun = load_config(None, ["data=/d", "prefetch=3", "augment.backend=eager", "workers=2"]).to_dict()
    assert changed_settings(saved, rerun) == []
    refuse_changed_finished_run(tmp_path, {"step": 6}, changed_settings(saved, rerun), 6)


@pytest.mark.timeout(600)
def test_a_full_disk_while_drawing_metrics_png_is_one_line_naming_the_last_checkpoint(image_folder, tmp_path, capsys,
                                                                                      monkeypatch):
    import bt_fast.plots

    def full(path, write, **options):
        raise OSError(errno.ENOSPC, "No space left on device")
    out_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(bt_fast.plots, "atomic_write", full)
        code, _, err = run_main(capsys, *tiny_args(image_folder, out_dir))
    assert code == 1
    assert [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line] == [
        f"error: cannot write into {out_dir} (No space left on device); the last good checkpoint is step 3 of 3 in "
        f"{out_dir / CHECKPOINT_NAME}: free space there (or make it writable) and rerun the same command to resume "
        f"from it"]
    assert not (out_dir / "summary.json").exists()
    code, out, _ = run_main(capsys, *tiny_args(image_folder, out_dir))  # room again: the rerun completes the files
    assert code == 0 and out.startswith("run already complete: 3 steps")
    assert json.loads((out_dir / "summary.json").read_text())["steps"] == 3 and (out_dir / "metrics.png").is_file()


def test_ctrl_c_inside_torch_save_is_a_keyboard_interrupt_and_leaves_the_file(tmp_path, monkeypatch):
    """torch's zip writer, cut by a Ctrl-C, raises RuntimeError ("[enforce fail at inline_container.cc:672] .
    unexpected pos ...") while handling it: fine-tuning's checkpoint write then ended in a traceback, exit 1."""
    from bt_fast.checkpoint import atomic_save

    def cut_short(obj, handle):
        handle.write(b"PK partial")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 145547840 vs 145547728")
    path = tmp_path / "finetune.pth"
    path.write_bytes(b"the previous epoch's")
    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, path)
    assert path.read_bytes() == b"the previous epoch's" and [p.name for p in tmp_path.iterdir()] == ["finetune.pth"]

"""kill -9 at a chosen step, then the same command again: for every pipeline the resumed run ends with the
weights and per-step losses of a run that was never interrupted, and metrics.jsonl holds each step once.

The killed run and its resumption are separate `python -m bt_fast.train` processes (one thread, so that
the sums are ordered the same); tests/kill_point/sitecustomize.py kills the first inside the chosen step.
The uninterrupted run is the same command line run by `bt_fast.train.main` in the test process (one
thread too, tests/conftest.py), which spares a third process its imports.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bt_fast.checkpoint import BACKBONE_NAME, CHECKPOINT_NAME
from bt_fast.train import main

REPO = Path(__file__).resolve().parents[1]
KILL_POINT = Path(__file__).resolve().parent / "kill_point"
STEPS = 5  # 24 images / batch 8: 3 steps per epoch, so the runs cross an epoch boundary


def train_args(data: Path, out_dir: Path, pipeline: str) -> list[str]:
    return ["--config", str(REPO / "configs/demo_cpu.yaml"), f"data={data}", f"out_dir={out_dir}",
            f"pipeline={pipeline}", "arch=resnet18", "projector=32-32", "batch_size=8", "augment.image_size=32",
            "epochs=2", "warmup_epochs=1", f"max_steps={STEPS}", "checkpoint_every=2", "log_every=1000",
            "knn_every=0", "workers=1", "device=cpu"]


def train_process(data: Path, out_dir: Path, pipeline: str, kill_at_loss: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(KILL_POINT), str(REPO)])}
    env.pop("BT_KILL_AT_LOSS", None)
    # SIGKILL skips the exit handlers that remove the temporary files DALI's autograph writes, one per
    # pipeline function: they go to the test's directory, not /tmp
    env["TMPDIR"] = str(out_dir.parent)
    if kill_at_loss is not None:
        env["BT_KILL_AT_LOSS"] = str(kill_at_loss)
    return subprocess.Popen([sys.executable, "-m", "bt_fast.train", *train_args(data, out_dir, pipeline)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return process.returncode, err[-3000:]


def logged(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("pipeline", ["reference", "ffcv", "dali"])
def test_kill_9_and_resume_is_bit_exact(pipeline, image_folder, tmp_path):
    data = shutil.copytree(image_folder, tmp_path / "images")
    if pipeline == "ffcv":  # converted once, before two runs would race to convert it on first use
        from pipelines.convert import convert
        convert(data, tmp_path / "images.beton", "ffcv", workers=1, progress=False)
    kill_at = random.Random(pipeline).randint(3, STEPS)  # a step after the first checkpoint, in either epoch
    # One thread each, side by side: the run that is killed, and here the uninterrupted one.
    killed = train_process(data, tmp_path / "killed", pipeline, kill_at_loss=kill_at)
    try:
        main(train_args(data, tmp_path / "straight", pipeline))
    finally:
        code, err = finished(killed)
    assert code == -signal.SIGKILL, err
    # checkpoints every 2 steps and at the end of epoch 1 (step 3), written while training goes on: on disk is
    # the last one started before the kill, or the one before it if the kill came while it was being written
    started = [s for s in range(1, kill_at) if s % 2 == 0 or s == 3]
    path = tmp_path / "killed" / CHECKPOINT_NAME
    on_disk = torch.load(path, weights_only=True)["step"] if path.exists() else None
    assert on_disk in started[-2:] or (on_disk is None and len(started) == 1), (on_disk, started)
    code, err = finished(train_process(data, tmp_path / "killed", pipeline))
    assert code == 0, err

    expected, got = logged(tmp_path / "straight"), logged(tmp_path / "killed")
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))  # no gap, no step twice
    assert [m["loss"] for m in got] == [m["loss"] for m in expected]
    assert [m["lr_weights"] for m in got] == [m["lr_weights"] for m in expected]
    for name in (BACKBONE_NAME, CHECKPOINT_NAME):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "killed" / name, weights_only=True)
        a, b = (a, b) if name == BACKBONE_NAME else (a["model"], b["model"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

"""Everyday paths that must end in a clean result or one line: reruns, Ctrl-C, bad settings, resumes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bt_fast.files
import bt_fast.run_control as run_control
import bt_fast.train as train_module
from bt_fast.checkpoint import CHECKPOINT_NAME
from bt_fast.config import ConfigError, load_config, parse_overrides
from bt_fast.train import main
from bt_fast.trainer import Trainer
from conftest import hangup_default, modules_loaded_by, run_with_stdout_unread
from pipelines.image_folder import find_image_folder
from test_train import tiny_config

REPO = Path(__file__).resolve().parents[1]


def run_main(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def tiny_args(data, out_dir, *extra) -> list[str]:
    """A tiny run's command line, on the CPU also where CUDA is visible; a key in `extra` replaces the tiny value
    (the CLI refuses a key given twice)."""
    tiny = [f"data={data}", f"out_dir={out_dir}", "device=cpu", "pipeline=reference", "knn_every=0", "workers=0",
            "batch_size=8", "projector=64-64", "augment.image_size=32", "epochs=1", "warmup_epochs=0"]
    given = {pair.split("=", 1)[0] for pair in extra}
    return ["--config", "configs/demo_cpu.yaml", *[p for p in tiny if p.split("=", 1)[0] not in given], *extra]


def metric_lines(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_rerunning_a_finished_run_reports_it_complete(image_folder, tmp_path, capsys):
    args = tiny_args(image_folder, tmp_path, "max_steps=2")
    code, first, _ = run_main(capsys, *args)
    assert code == 0 and first.startswith("done: 2 steps")
    last_loss = metric_lines(tmp_path)[-1]["loss"]
    code, again, err = run_main(capsys, *args)
    assert code == 0, err
    # max_steps ended it: the line says so, and how to train on (it read as if the epochs were done)
    assert again.startswith("run already complete at max_steps=2 (its epochs hold 3 steps: raise max_steps, or set "
                            "it to 0, to train on): 2 steps") and f"-> {last_loss:.1f}" in again
    assert len(metric_lines(tmp_path)) == 2  # nothing was trained twice


def test_a_lower_max_steps_than_the_checkpoints_step_trains_nothing_and_says_so(image_folder, tmp_path, capsys):
    """A run paused at step 2, rerun with max_steps=1, said "run already complete"; it is not (3 steps)."""
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=2"))
    assert code == 0, err
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir() if not path.name.startswith(".")}
    recorded = json.loads(files["summary.json"])
    code, out, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=1"))
    assert code == 0, err
    assert out.splitlines() == [
        f"nothing trained (the checkpoint is already past max_steps=1): 2 steps on 1 process(es), "
        f"{recorded['images_per_s']:.1f} images/s, loss {recorded['first_loss']:.1f} -> {recorded['last_loss']:.1f}",
        f"checkpoint: {tmp_path / CHECKPOINT_NAME}", f"backbone:   {tmp_path / 'backbone.pth'}"]
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if not path.name.startswith(".")} == files
    (tmp_path / "backbone.pth").unlink()  # as a stop by a signal leaves it: none is written for step 2 either
    code, out, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=1"))
    assert code == 0 and out.splitlines()[-1] == "backbone:   none written" and not (tmp_path / "backbone.pth").exists()


def _signal_after_step(monkeypatch, signum: int, after_step: int, repeat_after_s: float | None = None):
    """Deliver `signum` to this process from inside step `after_step` (deterministic, unlike a timer)."""
    real_step = Trainer.train_step

    def step(self, y1, y2):
        loss = real_step(self, y1, y2)
        if self.step + 1 == after_step:
            os.kill(os.getpid(), signum)
            if repeat_after_s is not None:
                monkeypatch.setattr(run_control, "REPEATED_SIGINT_S", repeat_after_s)
                os.kill(os.getpid(), signum)
        return loss
    monkeypatch.setattr(Trainer, "train_step", step)


def test_ctrl_c_checkpoints_at_the_step_boundary_and_exits_130(image_folder, tmp_path, capsys, monkeypatch):
    _signal_after_step(monkeypatch, signal.SIGINT, after_step=2)
    code, out, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "log_every=100"))
    assert code == 130, err
    assert out.startswith("stopped by SIGINT after step 2 of 3")
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    assert [m["step"] for m in metric_lines(tmp_path)] == [1, 2]  # flushed although log_every is 100


def test_a_second_ctrl_c_aborts_at_once_with_one_line(image_folder, tmp_path, capsys, monkeypatch):
    _signal_after_step(monkeypatch, signal.SIGINT, after_step=1, repeat_after_s=-1.0)
    code, out, err = run_main(capsys, *tiny_args(image_folder, tmp_path))
    assert code == 130
    assert err.strip().splitlines()[-1].startswith("error: interrupted; stopped without writing a checkpoint")
    assert not (tmp_path / CHECKPOINT_NAME).exists()


class Unhandled(Exception):
    pass


def _unhandled(signum, frame):
    raise Unhandled(signal.Signals(signum).name)


def test_sighup_checkpoints_at_the_step_boundary_and_exits_129(image_folder, tmp_path, capsys, monkeypatch):
    """`kill -HUP` (stdout and stderr pipes here): the stop of Ctrl-C, with its lines; its default action ended
    the run (here `Unhandled`, not this test process)."""
    _signal_after_step(monkeypatch, signal.SIGHUP, after_step=2)
    previous = signal.signal(signal.SIGHUP, _unhandled)
    try:
        code, out, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "log_every=100"))
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert code == 129, err
    assert out == (f"stopped by SIGHUP after step 2 of 3\ncheckpoint: {tmp_path / CHECKPOINT_NAME} (run the same "
                   f"command again to resume)\n")
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 2


def _on_a_terminal(command: list[str]) -> tuple[subprocess.Popen, int]:
    """`command` started as the session leader of a new pseudo-terminal, its stdin, stdout and stderr: (the
    process, the terminal's master side, whose closing hangs the terminal up as a closed ssh session does)."""
    import fcntl
    import struct
    import termios
    master, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))

    def in_the_terminals_session() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        hangup_default()  # under `nohup` the run would rightly outlive its terminal
    run = subprocess.Popen(command, cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal,
                           start_new_session=True, preexec_fn=in_the_terminals_session)
    os.close(terminal)
    return run, master


def _read_until(master: int, pattern: str, timeout_s: float) -> str:
    """What the terminal showed until `pattern` (a regular expression) appeared in it."""
    import re
    import select
    shown, deadline = "", time.monotonic() + timeout_s
    while not re.search(pattern, shown):
        assert select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0], shown
        shown += os.read(master, 1 << 16).decode(errors="replace")
    return shown


@pytest.mark.timeout(240)
def test_a_run_whose_terminal_closes_stops_with_a_checkpoint(image_folder, tmp_path):
    """The kernel hangs the terminal up (every write to it fails with EIO) and sends SIGHUP: the run checkpoints
    at the step boundary and exits 129, its progress bar and stop lines going to /dev/null. It died of SIGHUP."""
    # 120 steps: a run that the test process's reader falls behind (2 busy cores) still cannot finish first
    run, master = _on_a_terminal([sys.executable, "-m", "bt_fast.train",
                                  *tiny_args(image_folder, tmp_path, "epochs=40", "log_every=1")])
    try:
        _read_until(master, r"\| *[1-9]\d*/120 \[", timeout_s=180)  # the progress bar past step 1
    finally:
        os.close(master)
        code = run.wait(timeout=60)
    assert code == 129
    step = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"]
    assert 1 < step < 120 and [m["step"] for m in metric_lines(tmp_path)] == list(range(1, step + 1))
    assert json.loads((tmp_path / "summary.json").read_text())["stopped_by"] == "SIGHUP"


def test_the_launcher_ends_a_closed_terminals_stop_with_129(image_folder, tmp_path, monkeypatch):
    """torchrun passes SIGHUP on to the ranks (run_pretrain.sh's --signals-to-handle), then raises; the launcher
    ended that checkpointed stop with 0, a success, where the single process run ends with 129."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from tools import launch

    def hung_up(options):
        (tmp_path / CHECKPOINT_NAME).write_bytes(b"the ranks' checkpoint")
        raise SignalException("Process got signal: 1", signal.SIGHUP)
    monkeypatch.setattr(launch.torchrun, "run", hung_up)
    monkeypatch.setenv(launch.LAUNCHER_ENV, "")  # main sets it for its ranks: gone again after the test
    assert launch.main(["--nproc-per-node", "1", "-m", "bt_fast.train", *tiny_args(image_folder, tmp_path)]) == 129


def test_under_nohup_a_hangup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with run_control.StopSignals():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def _ctrl_c_before(monkeypatch, owner, name: str, when=lambda *args: True, second: bool = False) -> None:
    """A Ctrl-C as `owner.name` starts (where `when(*its arguments)`): SIGINT, or with `second` the
    KeyboardInterrupt that a second one raises. Once."""
    real = getattr(owner, name)

    def interrupted(*args, **kwargs):
        if when(*args) and not getattr(interrupted, "done", False):
            interrupted.done = True
            if second:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, interrupted)


def _final_save(save, *args) -> bool:
    return getattr(save, "final", False)


def _mark_the_final_save(monkeypatch):
    """BackgroundSave.final: the save under way is the run's last checkpoint (step 3 of 3), slowed down."""
    from bt_fast.checkpoint import BackgroundSave
    real_start, real_save = BackgroundSave.start, bt_fast.checkpoint.atomic_save

    def start(self, obj, path, **options):
        real_start(self, obj, path, **options)
        self.final = obj.get("step") == 3

    def slow_save(obj, path, **options):
        time.sleep(0.5 if path.name == CHECKPOINT_NAME and obj.get("step") == 3 else 0)
        real_save(obj, path, **options)
    monkeypatch.setattr(BackgroundSave, "start", start)
    monkeypatch.setattr(bt_fast.checkpoint, "atomic_save", slow_save)


STOPPED_AT_THE_END = ("stopped by SIGINT after step 3 of 3\n"
                      "checkpoint: {} (run the same command again to finish the run)\n")
INTERRUPTED_AT_THE_END = ("error: interrupted after step 3 of 3; the last checkpoint is step 3 of 3 in {}: "
                          "run the same command again to finish the run from it\n")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("moment", ["final k-NN", "final checkpoint write", "second Ctrl-C in its write", "backbone"])
def test_ctrl_c_at_the_end_of_a_run_says_what_it_kept(moment, image_folder, tmp_path, capsys, monkeypatch):
    """A Ctrl-C after the last step was swallowed (the final k-NN ran on, then "done", exit 0) or said "stopped
    without writing a checkpoint" where the run's last checkpoint was complete on disk."""
    from bt_fast.checkpoint import BackgroundSave
    _mark_the_final_save(monkeypatch)
    if moment == "final k-NN":
        _ctrl_c_before(monkeypatch, Trainer, "monitor_knn")
    elif moment == "backbone":
        _ctrl_c_before(monkeypatch, Trainer, "save_backbone", second=True)  # outside the loop Ctrl-C raises at once
    else:
        _ctrl_c_before(monkeypatch, BackgroundSave, "wait", _final_save, second=moment.startswith("second"))
    code, out, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "knn_every=1", f"knn_val={image_folder}"))
    assert code == 130
    checkpoint = tmp_path / CHECKPOINT_NAME
    out = "".join(line for line in out.splitlines(keepends=True) if not line.startswith("epoch 1 of 1: k-NN top-1"))
    if moment in ("second Ctrl-C in its write", "backbone"):
        assert (out, err.splitlines(keepends=True)[-1]) == ("", INTERRUPTED_AT_THE_END.format(checkpoint))
    else:
        assert out == STOPPED_AT_THE_END.format(checkpoint), err
        assert json.loads((tmp_path / "summary.json").read_text())["stopped_by"] == "SIGINT"
    assert torch.load(checkpoint, weights_only=True)["step"] == 3 and not (tmp_path / "backbone.pth").exists()
    assert ("knn_top1" in metric_lines(tmp_path)[-1]) == moment.endswith(("write", "backbone"))  # cut short: none
    code, out, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "knn_every=1", f"knn_val={image_folder}"))
    assert code == 0 and out.startswith("run already complete: 3 steps") and (tmp_path / "backbone.pth").is_file()
    # the rerun trains nothing, so it runs no k-NN either: said where the log holds none at the last step
    assert ("note: no k-NN ran: the run is already complete" in err) == (not moment.endswith(("write", "backbone")))


@pytest.mark.timeout(240)
def test_ctrl_c_after_the_result_is_printed_leaves_it_the_last_output(image_folder, tmp_path):
    """A Ctrl-C while the interpreter shuts down (tqdm's atexit handler, loader threads) printed
    "Exception ignored ... KeyboardInterrupt" tracebacks after a finished run's result."""
    command = [sys.executable, "-m", "bt_fast.train", *tiny_args(image_folder, tmp_path / "run", "workers=2")]
    run = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in run.stdout:
        if line.startswith("backbone:"):
            os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends, to the whole group
            break
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0 and "Traceback" not in err and "Exception ignored" not in err, err

    # The same command again, its stdout a pipe whose reader has gone (`| head`, a `| tee` that went with its
    # terminal): the result, "run already complete", ended in a BrokenPipeError traceback and exit 1.
    again = run_with_stdout_unread(command)
    assert again.returncode == 0 and again.stderr == "", again.stderr


def test_every_checkpoint_finds_its_steps_already_in_the_metrics_log(image_folder, tmp_path, monkeypatch):
    """Counted when the checkpoint's state is taken (it is written on a thread of its own after that)."""
    from bt_fast.checkpoint import BackgroundSave
    seen = []
    real_start = BackgroundSave.start

    def start(self, obj, path, **options):
        if path.name == CHECKPOINT_NAME:
            seen.append((obj["step"], len((tmp_path / "metrics.jsonl").read_text().splitlines())))
        real_start(self, obj, path, **options)
    monkeypatch.setattr(BackgroundSave, "start", start)
    train_module.train(tiny_config(image_folder, tmp_path, "checkpoint_every=2", "log_every=1000", "epochs=1"))
    assert seen and all(step == lines for step, lines in seen), seen


@pytest.mark.parametrize("override, message", [
    ("augment.image_size=0", "config key 'augment.image_size' must be at least 8 pixels"),
    ("augment.image_size=-4", "config key 'augment.image_size' must be at least 8 pixels"),
    ("projector=abc", "config key 'projector' must be layer widths joined by '-'"),
    ("projector=512-0-512", "config key 'projector' must be layer widths joined by '-'"),
    ("augment.crop_scale=[0.5,0.1]", "config key 'augment.crop_scale' must be a [low, high] pair"),
    ("augment.blur_sigma=[0,0]", "config key 'augment.blur_sigma' must be a [low, high] pair"),
    ("lr_weights=-0.1", "config key 'lr_weights' must be 0 or positive"),
    ("lr_biases=-1", "config key 'lr_biases' must be 0 or positive"),
    ("warmup_epochs=-1", "config key 'warmup_epochs' must be 0 or positive"),
    ("pipeline=ffvc", "config key 'pipeline' must be one of reference, ffcv, dali, got 'ffvc' (did you mean 'ffcv'?)"),
    ("knn_val=/does/not/exist", "config key 'knn_val' names /does/not/exist, which is not a directory"),
    ("ffcv.decode=gpu", "config key 'ffcv.decode' must be one of host, device, got 'gpu'"),
    ("ffcv.crop=devices", "config key 'ffcv.crop' must be one of auto, device, host, got 'devices' (did you mean 'device'?)"),
    ("ffcv.max_padded_side=0", "config key 'ffcv.max_padded_side' must be positive"),
])
def test_bad_settings_are_one_line_naming_the_key(override, message, image_folder, tmp_path, capsys):
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, override))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_host_crop_needs_host_decode(image_folder, tmp_path, capsys):
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path), "ffcv.decode=device", "ffcv.crop=host")
    assert code == 2 and err.startswith("error: config key 'ffcv.crop' must be device when ffcv.decode=device")


def test_an_unreadable_image_in_a_loader_worker_is_one_line_without_object_reprs(tmp_path, capsys):
    for c in range(2):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            (tmp_path / "data" / f"class{c}" / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    code, _, err = run_main(capsys, *tiny_args(tmp_path / "data", tmp_path / "out", "workers=2"))
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code == 2 and len(errors) == 1, err
    assert errors[0].startswith(f"error: cannot read image {tmp_path / 'data'}/class") and "<" not in errors[0]
    assert errors[0].endswith(": not a recognised image file; remove or replace the file (tools.convert's report lists "
                              "every unreadable image of a folder)")


def test_data_is_required(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the repository root holds images: a missing data= must not train on them
    code, _, err = run_main(capsys, "--config", "configs/demo_cpu.yaml", f"out_dir={tmp_path}")
    assert code == 2 and err.startswith("error: config key 'data' is required")


def test_out_dir_that_is_a_file_or_not_writable_is_refused(image_folder, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run_main(capsys, *tiny_args(image_folder, a_file))
    assert code == 2 and f"config key 'out_dir' names {a_file}, which is a file" in err

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(bt_fast.files.tempfile, "TemporaryFile", read_only)
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path / "out"))
    assert code == 2 and "which is not writable (Read-only file system)" in err


def test_overrides_keep_string_keys_as_typed_and_accept_1_0_booleans():
    config = load_config("configs/demo_cpu.yaml", ["out_dir=010", "compile_optimizer=1", "channels_last=0"])
    assert config.out_dir == "010" and config.compile_optimizer is True and config.channels_last is False
    assert load_config(None, ["epochs=010"]).epochs == 8  # numbers keep YAML's meaning (octal here)
    with pytest.raises(ConfigError, match="give each key once"):
        parse_overrides(["x=1", "x.y=2"])
    with pytest.raises(ConfigError, match="give each key once"):
        parse_overrides(["augment.image_size=32", "augment=1"])


def test_resume_with_changed_settings_lists_them_and_they_apply(image_folder, tmp_path, capsys):
    """Among them the weight decay, which the optimizer's saved state holds too, and the precision: here amp
    none -> float16, with a GradScaler whose state the first run did not have; then the precision alone, as
    amp=auto gives another one on another device (the checkpoint's is rewritten, as a GPU run's would read)."""
    run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=1"))
    changes = ["lr_weights=0.7", "augment.image_size=40", "weight_decay=0.01", "amp=float16"]
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=2", *changes))
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning: resuming")]
    assert len(warning) == 1
    for change in ("augment.image_size 32 -> 40", "lr_weights 1.0 -> 0.7", "weight_decay 1.5e-06 -> 0.01",
                   "amp 'none' -> 'float16'"):
        assert change in warning[0], warning[0]
    assert "max_steps" not in warning[0] and "precision" not in warning[0]  # amp's own line says it
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert [group["weight_decay"] for group in state["optimizer"]["param_groups"]] == [0.01, 0.01]
    assert state["precision"] == "float16" and state["scaler"]["scale"] > 0

    torch.save({**state, "precision": "bfloat16"}, tmp_path / CHECKPOINT_NAME)
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=3", *changes))
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning: resuming")] == [
        f"warning: resuming {tmp_path / CHECKPOINT_NAME} (step 2) with settings that differ from the run that wrote "
        f"it: precision bfloat16 -> float16; use a new out_dir to start afresh"]


def test_resume_with_another_number_of_processes_says_so(image_folder, tmp_path, capsys):
    """Each rank's share of an epoch follows the number of ranks: resumed mid-epoch by another number, the rest of
    the epoch reads some images twice and skips others, which the resume did without a word."""
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=1"))  # step 1 of epoch 0's 3
    assert code == 0, err
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["world_size"] == 1
    torch.save({**state, "world_size": 2}, tmp_path / CHECKPOINT_NAME)  # as two processes write it
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=2"))
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning: resuming")] == [
        f"warning: resuming {tmp_path / CHECKPOINT_NAME} (step 1) with settings that differ from the run that wrote "
        f"it: processes 2 -> 1: the rest of epoch 1 reads some images twice and skips others; use a new out_dir to "
        f"start afresh"]
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=3"))
    assert code == 0 and "warning" not in err


def test_resume_after_images_were_removed_or_added_says_so(image_folder, tmp_path, capsys):
    """The epoch's order is a permutation of the data's images: resumed mid-epoch on a folder that lost an image
    (a corrupt one removed), the rest of the epoch reads some images twice and skips others, without a word."""
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=1"))  # step 1 of epoch 0's 3
    assert code == 0, err
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    images = len(find_image_folder(image_folder)[1])
    assert state["num_samples"] == images
    torch.save({**state, "num_samples": images + 1}, tmp_path / CHECKPOINT_NAME)  # as written before one was removed
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=2"))
    assert code == 0 and [line for line in err.splitlines() if line.startswith("warning: resuming")] == [
        f"warning: resuming {tmp_path / CHECKPOINT_NAME} (step 1) with settings that differ from the run that wrote "
        f"it: images {images + 1} -> {images}: the rest of epoch 1 reads some images twice and skips others; use a "
        f"new out_dir to start afresh"]


def test_resume_after_metrics_jsonl_was_deleted_says_what_the_summary_leaves_out(image_folder, tmp_path, capsys):
    """summary.json, drawn from metrics.jsonl, silently gave the first loss of the resumed segment as the run's."""
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=2"))
    assert code == 0, err
    (tmp_path / "metrics.jsonl").unlink()
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "max_steps=3"))
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: {tmp_path / 'metrics.jsonl'}, which held steps 1 to 2, is missing: summary.json and metrics.png "
        f"will describe steps 3 on only"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("processes", [{"GPUS": "2"}, {"NODES": "3", "LOCAL_NODES": "1"}],
                         ids=["2 ranks", "3 simulated nodes"])  # these printed it once per node
def test_launcher_reports_a_config_error_once_without_starting_torchrun(processes, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CONFIG": "configs/demo_cpu.yaml", **processes,
           "DATA": str(tmp_path), "OUT": str(tmp_path / "run")}
    result = subprocess.run(["bash", "run_pretrain.sh", "epochs=abc", "device=cpu"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: config key 'epochs' expects a number, got 'abc'"]


def test_launcher_checks_a_run_without_loading_the_trainer():
    """The launcher's checks (bt_fast.preflight) leave torchvision, the pipelines and the trainer to the ranks:
    loading them would double the launcher's start-up before every run and restart."""
    assert modules_loaded_by("import tools.launch", ("torchvision", "pipelines", "bt_fast.train", "bt_fast.trainer")) == []


# -- first-use conversion and tools.convert --------------------------------------------------------
def _folder_with_problems(root: Path, image_folder: Path) -> Path:
    import shutil
    shutil.copytree(image_folder, root)
    (root / "class0" / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "class1" / "bad.jpg").write_bytes(b"not a jpeg")
    return root


def test_convert_checks_source_and_output_before_doing_any_work(image_folder, tmp_path, monkeypatch):
    from bt_fast.errors import DataError
    from pipelines import convert as conversion
    with pytest.raises(DataError, match="does not exist"):
        conversion.convert(tmp_path / "missing", tmp_path / "deep" / "out.beton", "ffcv", workers=1)
    assert not (tmp_path / "deep").exists()
    monkeypatch.setattr(conversion, "WorkDir", lambda *a, **k: pytest.fail("converted before the output check"))
    (tmp_path / "blocked").write_text("a file where a directory is needed")
    with pytest.raises(DataError, match="cannot write into"):
        conversion.convert(image_folder, tmp_path / "blocked" / "out.beton", "ffcv", workers=1)


def test_convert_removes_what_killed_conversions_left_and_keeps_live_ones(image_folder, tmp_path):
    import socket
    from pipelines.convert import convert
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".out.tar.{socket.gethostname()}.{dead.stdout.strip()}.0000.tmp"
    orphan.mkdir()  # dali writes a directory
    live = tmp_path / f".out.tar.{socket.gethostname()}.{os.getpid()}.0001.tmp"
    live.write_text("another conversion, still running")
    convert(image_folder, tmp_path / "out.tar", "dali", workers=1, progress=False)
    assert not orphan.exists() and live.exists()


def test_dangling_symlinks_and_unreadable_files_are_reported_not_dropped(image_folder, tmp_path):
    from pipelines.convert import convert
    source = _folder_with_problems(tmp_path / "src", image_folder)
    report = convert(source, tmp_path / "out.beton", "ffcv", workers=1, progress=False)
    skipped = {Path(entry["path"]).name: entry["reason"] for entry in report["files"] if entry["status"] == "skipped"}
    assert set(skipped) == {"dangling.jpg", "bad.jpg"} and skipped["dangling.jpg"] == "broken symbolic link"
    assert report["written"] == 24 and report["skipped"] == 2


def test_first_use_conversion_says_what_it_skipped_and_leaves_no_lock(image_folder, tmp_path, capsys):
    from pipelines.ffcv import ensure_beton
    source = _folder_with_problems(tmp_path / "train", image_folder)
    config = load_config(None, [f"data={source}", "pipeline=ffcv", "workers=1"])
    path = ensure_beton(config)
    err = capsys.readouterr().err
    assert path == tmp_path / "train.beton" and path.is_file()
    assert err.splitlines()[1:] == [
        f"wrote 24 images to {tmp_path / 'train.beton'} (2 skipped: 1 broken symbolic link, 1 not a recognised image "
        f"file; 0 converted; report: {tmp_path / 'train.beton.report.json'})",
        f"warning: 2 of 26 images in {source} are unreadable and were left out; they are listed in "
        f"{tmp_path / 'train.beton.report.json'}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "train.beton", "train.beton.report.json"]
    # A .beton given as data= is used as it is, not converted again into train.beton.beton.
    beton_as_data = load_config(None, [f"data={path}", "pipeline=ffcv"])
    assert ensure_beton(beton_as_data) == path


def test_a_full_disk_in_the_first_use_conversion_names_the_beton_not_out_dir(image_folder, tmp_path, monkeypatch):
    import errno
    from bt_fast.errors import StorageError
    from pipelines.ffcv_format import BetonPart

    def full(self, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(BetonPart, "add", full)
    beton = tmp_path / "elsewhere" / "train.beton"
    beton.parent.mkdir()
    config = tiny_config(image_folder, tmp_path / "run", "pipeline=ffcv", f"ffcv.beton={beton}")
    with pytest.raises(StorageError, match=rf"^cannot write {beton} \(No space left on device; .*\); nothing was "
                                           rf"written$"):
        train_module.train(config)


def test_first_use_conversion_on_read_only_storage_is_one_line(image_folder, tmp_path):
    from bt_fast.errors import DataError
    from pipelines.ffcv import ensure_beton
    (tmp_path / ".images.beton.lock").mkdir()  # stands in for storage where the lock cannot be created
    config = load_config(None, [f"data={tmp_path / 'images'}", "pipeline=ffcv"])
    import shutil
    shutil.copytree(image_folder, tmp_path / "images")
    with pytest.raises(DataError, match=r"convert it elsewhere with `python -m tools.convert .* and pass ffcv.beton="):
        ensure_beton(config)


def test_a_file_as_data_is_named_as_a_file(tmp_path):
    from bt_fast.errors import DataError
    from pipelines.image_folder import find_image_folder
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="is a file; give the ImageFolder directory"):
        find_image_folder(tmp_path / "x.jpg")


@pytest.mark.timeout(300)
def test_make_pretrain_trains_through_run_pretrain_sh_and_a_rerun_reports_the_run_complete(image_folder, tmp_path):
    """`make pretrain` as a user types it (the Makefile, run_pretrain.sh, bt_fast.train's main), twice."""
    stamp = tmp_path / "installed"  # this interpreter's environment is the installed venv
    stamp.touch()
    run = tmp_path / "run"
    command = ["make", "--no-print-directory", "pretrain", f"VENV={sys.prefix}", f"STAMP={stamp}",
               f"DATA={image_folder}", f"OUT={run}",
               "ARGS=pipeline=reference knn_every=0 workers=0 batch_size=8 projector=32-32 augment.image_size=32 "
               "max_steps=2 warmup_epochs=0 device=cpu"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done: 2 steps on 1 process(es)" in first.stdout
    assert sorted(p.name for p in run.iterdir()) == sorted(["backbone.pth", CHECKPOINT_NAME, "config.yaml", "metrics.jsonl",
                                                             "metrics.png", "summary.json"])
    last_loss = metric_lines(run)[-1]["loss"]
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run already complete at max_steps=2 " in again.stdout and f"-> {last_loss:.1f}" in again.stdout
    assert f"checkpoint: {run / CHECKPOINT_NAME}" in again.stdout
    assert [m["step"] for m in metric_lines(run)] == [1, 2]

"""tools.gpu_check: every check's code path on the CPU, and proof that its comparisons can fail."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import bt_fast.optim
import bt_fast.trainer
from bt_fast.errors import DataError
from conftest import requires_cuda
from tools.gpu_check import __main__ as gpu_check
from tools.gpu_check.measure import SIZES, Result, compare
from tools.gpu_check.train_checks import TRAINING_RUNS, check_lars, check_resume

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"augment float16", "augment bfloat16", "amp float16", "amp bfloat16", "lars", "resume batch",
            "resume step", "ddp", "ffcv crops", "dali ids", "dali view means", "dali resume", "device crop float16",
            "device crop bfloat16", "device decode", "no host sync", "rank devices", "augment triton"}
CUDA_ONLY = {"no host sync", "rank devices", "augment triton"}  # skipped on the CPU, with the reason


@pytest.mark.timeout(600)  # the run's own limit is 580 s: on shared cores it outlasts pytest's default
def test_cpu_run_passes_every_check_and_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=580)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    checks = {c["check"]: c for c in summary["checks"]}
    assert set(checks) == SECTIONS and summary["passed"] and summary["device"] == "cpu"
    for name in CUDA_ONLY:
        assert checks.pop(name)["status"].startswith("skipped: ")
    for check in checks.values():
        assert check["status"] == "pass" and 0 <= check["error"] <= check["tolerance"], check
        assert f"{check['check']:<18} pass" in result.stdout
    # Only the check lines and the table: no warning, resume notice or converter progress from the code checked.
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    table = lines.index("throughput")
    assert all(line.split()[0] in {name.split()[0] for name in SECTIONS} for line in lines[:table - 1])
    assert lines[table - 1] == "" and lines[-2:] == ["", "all checks passed on cpu"]
    assert all(line.startswith("  ") for line in lines[table + 1:-2])
    for name in ("augment float16", "augment bfloat16", "amp float16", "amp bfloat16"):
        assert checks[name]["error"] > 0  # low precision against float32: a comparison that saw a difference
    throughput = summary["throughput"]
    assert throughput["augment_images_per_s"] > 0 and throughput["lars_step_ms"] > 0
    for key in (*TRAINING_RUNS, "peak_gpu_memory_gib"):
        assert throughput[key] == "n/a"  # CUDA only


def test_a_reader_gone_from_stdout_leaves_the_checks_and_their_json_to_finish(tmp_path, monkeypatch, capsys):
    """`make gpu-check | head -3`: once head has exited, the check lines go nowhere and the run goes on to its JSON."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone
    with os.fdopen(write_end, "w", buffering=1) as unread:  # line by line, as the run's output appears
        monkeypatch.setattr(sys, "stdout", unread)
        out = tmp_path / "gpu_check.json"
        with pytest.raises(SystemExit) as ended:
            gpu_check.main(["--device", "cpu", "--only", "rank-devices", "--json", str(out)])
    assert ended.value.code == 0 and capsys.readouterr().err == ""
    assert [check["check"] for check in json.loads(out.read_text())["checks"]] == ["rank devices"]


def test_an_end_to_end_part_that_fails_keeps_the_checks_json_and_fails_the_run(tmp_path, monkeypatch, capsys):
    """The checks' results are written before the end-to-end part, which a GPU job's time limit may cut short;
    its error is recorded beside them and the run exits 1."""
    out = tmp_path / "gpu_check.json"
    written = []

    def end_to_end_fails(device):
        written.append(json.loads(out.read_text()))  # already on disk when the end-to-end part starts
        raise DataError("no photographs to cut the data set from")
    monkeypatch.setattr(gpu_check, "run_end_to_end", end_to_end_fails)
    with pytest.raises(SystemExit) as ended:
        gpu_check.main(["--device", "cpu", "--only", "rank-devices", "--end-to-end", "--json", str(out)])
    summary = json.loads(out.read_text())
    assert ended.value.code == 1 and written and "end_to_end" not in written[0] and written[0]["passed"]
    assert summary["end_to_end"] == {"error": "no photographs to cut the data set from"} and not summary["passed"]
    assert [check["check"] for check in summary["checks"]] == ["rank devices"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == ["end to end: error: no photographs to cut the data set from", "", "some checks FAILED on cpu"]


def test_an_end_to_end_pipeline_that_crashed_fails_the_run_where_a_missing_package_is_a_skip(tmp_path, monkeypatch,
                                                                                               capsys):
    """A pipeline child that crashed or timed out leaves an "unavailable" entry like a missing package's; only
    the missing package may pass (docs/gpu.md: a crashed child fails the run)."""
    out = tmp_path / "gpu_check.json"
    section = {"device": "cpu", "reference": {"images_per_s": 1.0},
               "ffcv": {"unavailable": "training-step process failed (exit -11): no output"},
               "dali": {"unavailable": "training-step process timed out after 150 s"}}
    monkeypatch.setattr(gpu_check, "run_end_to_end", lambda device: section)
    with pytest.raises(SystemExit) as ended:
        gpu_check.main(["--device", "cpu", "--only", "rank-devices", "--end-to-end", "--json", str(out)])
    assert ended.value.code == 1 and not json.loads(out.read_text())["passed"]
    assert capsys.readouterr().out.splitlines()[-3] == "end to end: FAILED for ffcv, dali (see their lines above)"

    monkeypatch.setattr(gpu_check, "installed", lambda module: module != "nvidia.dali")  # DALI absent: a skip
    section.pop("ffcv")
    with pytest.raises(SystemExit) as ended:
        gpu_check.main(["--device", "cpu", "--only", "rank-devices", "--end-to-end", "--json", str(out)])
    assert ended.value.code == 0 and json.loads(out.read_text())["passed"]


def test_compare_fails_above_the_tolerance_and_on_nan():
    want = torch.tensor([1.0, -2.0])
    assert compare("lars", want * (1 + 5e-6), want).status == "pass"
    assert compare("lars", want * (1 + 5e-5), want).status == "fail"
    assert compare("lars", torch.tensor([float("nan"), -2.0]), want).status == "fail"
    mean = compare("augment float16", torch.tensor([0.0, 0.008]), torch.zeros(2), relative=False, mean=True)
    assert mean.error == pytest.approx(0.004) and mean.status == "pass"


def test_compiled_lars_with_a_perturbed_learning_rate_fails_the_run(monkeypatch, capsys):
    """The compiled side runs with lr 1% high (no real compile): the check and the exit code say so."""
    monkeypatch.setattr(bt_fast.optim.torch, "compile",
                        lambda fn, **kw: lambda p, g, m, lr, *rest: fn(p, g, m, lr * 1.01, *rest))
    monkeypatch.setattr(gpu_check, "CHECKS", [check_lars])
    monkeypatch.setattr(gpu_check, "measure_training", lambda *args: None)
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cpu"])
    assert exit_.value.code == 1
    assert "lars               fail" in capsys.readouterr().out


def test_only_runs_the_named_checks_and_refuses_an_unknown_name(monkeypatch, capsys):
    """`--only` (to rerun what failed within a GPU session's time): the named checks alone, the throughput
    only when named, and a name that is no check is argparse's error, exit 2, before anything runs."""
    ran = []

    def check_crop(device, sizes, workdir, measured):
        ran.append("crop")
        return [Result("crop", "pass", 0.0, 0.0)]

    def check_no_sync(device, sizes, workdir, measured):
        ran.append("no sync")
        return [Result("no sync", "pass", 0.0, 0.0)]

    monkeypatch.setattr(gpu_check, "CHECKS", [check_crop, check_no_sync])
    monkeypatch.setattr(gpu_check, "measure_training", lambda *args: ran.append("throughput"))
    for only, expected in (("no-sync", ["no sync"]), ("crop,throughput", ["crop", "throughput"]),
                           (None, ["crop", "no sync", "throughput"])):
        ran.clear()
        with pytest.raises(SystemExit) as exit_:
            gpu_check.main(["--device", "cpu", *(["--only", only] if only else [])])
        assert exit_.value.code == 0 and ran == expected, only
    ran.clear()
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cpu", "--only", "crop,bogus"])
    assert exit_.value.code == 2 and ran == []
    assert capsys.readouterr().err.splitlines() == [
        "error: --only takes names from crop, no-sync, throughput; got 'crop,bogus' (see --help)"]


def test_a_step_that_syncs_fails_the_no_host_sync_check(monkeypatch, tmp_path):
    """The steps after the warm-up raise as CUDA's sync debug mode does: the check reports the failure."""
    from tools.gpu_check.hot_path_checks import check_no_host_sync
    step = bt_fast.trainer.Trainer.train_step
    calls = []

    def syncing_step(self, y1, y2):
        calls.append(self.step)
        if len(calls) > 1:
            raise RuntimeError("called a synchronizing CUDA operation")
        return step(self, y1, y2)
    monkeypatch.setattr(bt_fast.trainer.Trainer, "train_step", syncing_step)
    [result] = check_no_host_sync(torch.device("cpu"), SIZES["cpu"], tmp_path, {})
    assert result.check == "no host sync" and result.status == "fail: called a synchronizing CUDA operation"
    assert calls == [0, 1]


def test_rank_devices_flags_memory_on_another_ranks_gpu():
    from tools.gpu_check.hot_path_checks import foreign_allocations
    assert foreign_allocations([{"rank": 0, "allocated": [512, 0]}, {"rank": 1, "allocated": [0, 512]}]) == []
    assert foreign_allocations([{"rank": 0, "allocated": [512, 0]}, {"rank": 1, "allocated": [2**21, 512]}]) == \
        ["rank 1 holds 2.0 MiB on cuda:0"]
    assert foreign_allocations([{"rank": 0, "allocated": [0, 0]}, {"rank": 1, "allocated": [0, 512]}]) == \
        ["rank 0 holds nothing on its own cuda:0"]


def test_end_to_end_prints_only_its_table(tmp_path, capfd, monkeypatch):
    """The bench's section, measured in this process (tests/test_bench.py runs it in its child process)."""
    import tools.bench.end_to_end as end_to_end
    from conftest import write_image_folder
    monkeypatch.setattr(end_to_end, "train_in_child", end_to_end.end_to_end_pipeline)
    data = write_image_folder(tmp_path / "train", classes=2, per_class=8, size=(48, 40))
    section = gpu_check.run_end_to_end(torch.device("cpu"), options=[
        "--data", str(data), "--pipelines", "reference", "--train-image-size", "16", "--train-batch-size", "4",
        "--projector", "16-16", "--workers", "1", "--train-steps", "1", "--train-warmup", "1"])
    out, err = capfd.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "" and lines[1].startswith("End to end (resnet18 + 16-16 projector, 16 px, 4 images per view")
    assert lines[4].startswith("reference ") and f"{section['reference']['images_per_s']:.1f}" in lines[4]
    assert len(lines) == 6


def test_resume_without_restoring_the_rng_state_fails(monkeypatch):
    monkeypatch.setattr(bt_fast.trainer, "set_rng_state", lambda state, device: None)
    with tempfile.TemporaryDirectory() as tmp:
        results = check_resume(torch.device("cpu"), SIZES["cpu"], Path(tmp), {})
    assert [r.status for r in results] == ["fail", "fail"]


def test_dali_resume_fails_when_the_saved_graph_state_is_not_used(monkeypatch, tmp_path):
    from pipelines.dali import DALIPipeline
    from tools.gpu_check.data_checks import check_dali
    ignore_state = DALIPipeline.restore_position
    monkeypatch.setattr(DALIPipeline, "restore_position", lambda self, state: ignore_state(self, None))
    results = {r.check: r for r in check_dali(torch.device("cpu"), SIZES["cpu"], tmp_path, {})}
    assert results["dali ids"].status == "pass"
    assert results["dali resume"].status == "fail: the saved graph state was not used"


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the notice of a machine without CUDA")
def test_without_cuda_the_default_run_says_so_in_one_line_and_exits_0(capsys):
    gpu_check.main([])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out


@requires_cuda
def test_cuda_run_passes_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--json", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=580)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert json.loads(out.read_text())["passed"]

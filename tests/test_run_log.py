"""Run artefacts: config.yaml, stamped metrics, summary.json, metrics.png, tools.plot and TensorBoard events."""
import importlib.metadata
import json
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from PIL import Image

from bt_fast.config import load_config
from bt_fast.plots import PANELS, Curves, plot_runs
from bt_fast.run_log import config_yaml, summarise, truncate_metrics
from bt_fast.train import train
from conftest import modules_loaded_by, run_with_stdout_unread
from test_reliability import run_main, tiny_args
from test_train import tiny_config
from tools import plot as plot_tool

STEPS_PER_EPOCH = 3  # the 24 images of the image_folder fixture in batches of 8


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def knn_run(image_folder, module_tmp) -> tuple[Path, dict]:
    """Two epochs with a k-NN evaluation after each and TensorBoard on: (out_dir, what train() returned)."""
    out_dir = module_tmp("knn_run")
    result = train(tiny_config(image_folder, out_dir, "knn_every=1", f"knn_val={image_folder}", "tensorboard=true"))
    return out_dir, result


def test_config_yaml_loads_back_into_the_same_config(tmp_path):
    config = load_config("configs/demo_cpu.yaml", ["out_dir=010", "data=/x y/train", "augment.crop_scale=[0.2,0.9]",
                                                   "augment.solarize_threshold=0.3", "weight_decay=1e-7",
                                                   "knn_val=", "tensorboard=true", "ffcv.order=quasi_random"])
    (tmp_path / "config.yaml").write_text(config_yaml(config))
    assert load_config(tmp_path / "config.yaml") == config


def test_resume_drops_the_lines_after_the_checkpoint_and_a_torn_one(tmp_path):
    kept = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "knn_top1": 50.0}]
    lost = [{"step": 3, "loss": 3.0}, {"step": 4, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept + lost) + '{"step": 5, "lo')
    truncate_metrics(tmp_path, step=2)
    assert records(tmp_path) == kept


def test_resume_keeps_lines_that_are_no_record_where_they_are_and_says_so(tmp_path, capsys):
    """Training writes only records; other lines were written by someone else, and are not its to drop.
    Bytes that are not UTF-8 come back as they were."""
    lines = [b'{"step": 1, "loss": 5.0}\n', b"# lr halved by hand here\n", b'{"note": "no step"}\n',
             b'{"step": 2, "loss": 4.0, "tag": "\xff"}\n', b'{"step": 3, "loss": 3.0}\n', b"not json \xfe\n",
             b'{"step": 4, "loss": 2.0}\n', b'{"step": 5, "lo']
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b"".join(lines))
    truncate_metrics(tmp_path, step=2)
    assert metrics.read_bytes() == b"".join(lines[:4] + lines[5:6])
    assert capsys.readouterr().err == (f"warning: {metrics} 3 lines, the first line 2, hold no metrics record (a JSON "
                                       f"object with a step); kept in the file, left out of metrics.png and summary.json\n")


def test_the_summary_of_hand_edited_records_leaves_out_only_the_fields_they_lack():
    records = [{"step": 1, "loss": 5.0, "images_per_s": 8.0, "elapsed_s": 1.0, "time": "t1"},
               {"step": 2, "loss": 4.0, "elapsed_s": 2.0, "time": "t2"},  # no images_per_s
               {"step": 3, "loss": 3.0, "images_per_s": 0, "elapsed_s": 3.0, "time": "t3"},
               {"step": 4, "loss": 2.0, "images_per_s": 16.0, "elapsed_s": 4.0, "time": "t4"},
               {"step": 4, "knn_top1": 40.0}]  # no top-5, no clock
    assert summarise(records, steps_per_epoch=2, batch_size=8) == {
        "steps": 4, "epochs": 2.0, "images": 4 * 8,
        "images_per_s": pytest.approx(2 * 8 / (8 / 8.0 + 8 / 16.0)),  # the two steps that give a rate
        "first_loss": 5.0, "last_loss": 2.0, "last_knn": {"step": 4, "top1": 40.0, "top5": None},
        "wall_time_s": 4.0, "finished_at": "t4"}


def test_a_run_writes_its_resolved_config(knn_run, image_folder):
    out_dir, _ = knn_run
    expected = tiny_config(image_folder, out_dir, "knn_every=1", f"knn_val={image_folder}", "tensorboard=true")
    assert load_config(out_dir / "config.yaml") == expected


def test_every_metrics_line_has_a_wall_clock_time_and_elapsed_seconds(knn_run):
    lines = records(knn_run[0])
    assert [line["step"] for line in lines] == [1, 2, 3, 3, 4, 5, 6, 6]  # k-NN after each epoch
    times = [datetime.fromisoformat(line["time"]) for line in lines]
    elapsed = [line["elapsed_s"] for line in lines]
    assert all(t.utcoffset().total_seconds() == 0 for t in times)
    assert times == sorted(times) and elapsed == sorted(elapsed) and elapsed[0] >= 0
    # the two clocks agree on how long the run took between its first and last line
    span = (times[-1] - times[0]).total_seconds()
    assert elapsed[-1] - elapsed[0] == pytest.approx(span, abs=0.5)  # two reads apart: a busy core may come between


def test_summary_matches_the_metrics_log_and_the_trainer(knn_run):
    out_dir, result = knn_run
    lines, found = records(out_dir), summary(out_dir)
    steps = [line for line in lines if "loss" in line]
    knn = [line for line in lines if "knn_top1" in line]
    assert found["steps"] == steps[-1]["step"] == result["steps"] == 6
    assert found["epochs"] == 2
    assert found["images"] == 6 * 8
    assert found["first_loss"] == steps[0]["loss"] == result["first_loss"]
    assert found["last_loss"] == steps[-1]["loss"] == result["last_loss"]
    # images/s: all images over the summed step times, as the trainer measured it for this one segment
    assert found["images_per_s"] == pytest.approx(result["images_per_s"], rel=1e-9)
    assert found["last_knn"] == {"step": 6, "top1": knn[-1]["knn_top1"], "top5": knn[-1]["knn_top5"]}
    assert found["wall_time_s"] == lines[-1]["elapsed_s"] and found["finished_at"] == lines[-1]["time"]
    assert found["versions"]["torch"] == importlib.metadata.version("torch")  # installed, not a module's string
    assert found["versions"]["torch_cuda"] == torch.version.cuda
    assert found["device"]["type"] == "cpu" and found["device"]["world_size"] == 1
    assert found["stopped_by"] is None and found["total_steps"] == 6


def test_metrics_png_plots_the_logged_series(knn_run):
    out_dir, _ = knn_run
    lines = records(out_dir)
    with Image.open(out_dir / "metrics.png") as image:
        assert image.format == "PNG" and image.size == (1600, 700)  # 2 rows of 4 panels
    figure = plot_runs({"run": Curves(lines)})
    for ax, (key, title) in zip(figure.axes, PANELS):
        assert ax.get_title() == title
        [line] = ax.get_lines()
        expected = [(entry["step"], entry[key]) for entry in lines if key in entry]
        assert list(zip(line.get_xdata(), line.get_ydata())) == expected, key
    assert len(figure.axes[PANELS.index(("knn_top1", "k-NN top-1 (%)"))].get_lines()[0].get_xdata()) == 2


def test_a_long_series_is_drawn_as_the_means_of_runs_of_consecutive_points():
    from statistics import fmean
    from bt_fast.plots import MAX_POINTS
    n = 5 * MAX_POINTS + 3  # runs of 5 and of 6 points
    lines = [{"step": step, "loss": float(step % 7) + step / n} for step in range(1, n + 1)]
    [line] = plot_runs({"run": Curves(lines)}).axes[0].get_lines()
    bounds = [i * n // MAX_POINTS for i in range(MAX_POINTS + 1)]
    runs = [lines[start:end] for start, end in zip(bounds, bounds[1:])]
    assert {len(run) for run in runs} == {5, 6}
    assert list(line.get_xdata()) == pytest.approx([fmean(entry["step"] for entry in run) for run in runs], rel=1e-12)
    assert list(line.get_ydata()) == pytest.approx([fmean(entry["loss"] for entry in run) for run in runs], rel=1e-12)


def test_the_epoch_end_redraw_waits_its_interval_and_reads_no_metrics_file(tmp_path, monkeypatch):
    """A 1,000-epoch ImageNet run logs 625,000 records, and every rank waits while rank 0 redraws metrics.png at
    an epoch end: the redraw uses the curves the log keeps (the earlier segments' read once, at the start), and
    comes only once the last drawing (or the segment's start) is PLOT_INTERVAL_S old."""
    import bt_fast.run_log
    from bt_fast.run_log import RunLog
    earlier = {"step": 1, "epoch": 0, "loss": 5.0, "lr_weights": 0.1, "lr_biases": 0.01, "images_per_s": 9.0,
               "data_wait_fraction": 0.5, "image_size": 32}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(earlier) + "\n")
    log = RunLog(load_config(None, [f"out_dir={tmp_path}", "augment.image_size=32"]), 1, 0.0)

    def unread(path):
        raise AssertionError(f"{path} read at an epoch end")
    monkeypatch.setattr(bt_fast.run_log, "numbered_metrics", unread)
    log.write({**earlier, "step": 2, "loss": 4.0})
    log.epoch_end()
    assert not (tmp_path / "metrics.png").exists()  # within 10 s of the segment's start
    monkeypatch.setattr(bt_fast.run_log, "PLOT_INTERVAL_S", 0.0)
    log.epoch_end()
    log.close()
    with Image.open(tmp_path / "metrics.png") as image:
        assert image.size == (1600, 700)
    [line] = plot_runs({"run": log.curves}).axes[0].get_lines()
    assert list(zip(line.get_xdata(), line.get_ydata())) == [(1, 5.0), (2, 4.0)]


def test_tensorboard_holds_the_logged_scalars_and_a_view_grid(knn_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out_dir, _ = knn_run
    events = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    lines = records(out_dir)
    for key in ("loss", "lr_weights", "lr_biases", "images_per_s", "data_wait_fraction", "knn_top1", "knn_top5"):
        logged = [(line["step"], line[key]) for line in lines if key in line]
        read = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in read] == [step for step, _ in logged], key
        assert [value for _, value in read] == pytest.approx([value for _, value in logged], rel=1e-6), key
    [grid] = events.Images("views")
    # 8 pairs of 32 px views, four pairs to a row, 2 px padding: 2 rows of 8 tiles
    assert (grid.step, grid.width, grid.height) == (0, 8 * 34 + 2, 2 * 34 + 2)


def test_tensorboard_without_the_package_is_one_line_naming_it(image_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    code, _, err = run_main(capsys, *tiny_args(image_folder, tmp_path, "tensorboard=true"))
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and "package 'tensorboard' is not installed" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resumed_and_rerun_runs_keep_the_artefacts_consistent(image_folder, tmp_path, capsys):
    args = tiny_args(image_folder, tmp_path, "epochs=2", "tensorboard=true")
    run_main(capsys, *args, "max_steps=2")
    first_segment = records(tmp_path)
    assert summary(tmp_path)["steps"] == 2
    kept_checkpoint = (tmp_path / "checkpoint.pth").read_bytes()
    run_main(capsys, *args, "max_steps=4")
    # killed after step 4 with its last checkpoint at step 2: steps 3 and 4 are lost work
    (tmp_path / "checkpoint.pth").write_bytes(kept_checkpoint)
    _, resumed, _ = run_main(capsys, *args)
    lines = records(tmp_path)
    assert lines[:2] == first_segment and [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    elapsed = [line["elapsed_s"] for line in lines]
    assert elapsed == sorted(elapsed)  # the clock continues from the checkpoint, not from zero
    found = summary(tmp_path)
    assert (found["steps"], found["epochs"], found["first_loss"], found["last_loss"]) == \
        (6, 2, lines[0]["loss"], lines[-1]["loss"])
    assert found["images_per_s"] == pytest.approx(6 / sum(1 / line["images_per_s"] for line in lines), rel=1e-12)
    assert load_config(tmp_path / "config.yaml") == load_config("configs/demo_cpu.yaml", args[2:])
    # TensorBoard shows each step once, the lost steps replaced by their redone ones
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == \
        [(line["step"], pytest.approx(line["loss"], rel=1e-6)) for line in lines]

    code, out, _ = run_main(capsys, *args)
    assert code == 0 and out.startswith("run already complete")
    assert records(tmp_path) == lines and summary(tmp_path) == found
    rate = f", {found['images_per_s']:.1f} images/s,"  # the resumed run said the rate of its own steps
    assert rate in resumed.splitlines()[0] and rate in out.splitlines()[0]
    (tmp_path / "metrics.jsonl").unlink()  # deleted by hand: the figure it held cannot be given
    code, out, err = run_main(capsys, *args)
    assert code == 0 and ", n/a images/s," in out and err == (
        f"warning: {tmp_path / 'metrics.jsonl'} is missing, so the run's images/s (measured in it) is not known\n")


def test_plot_tool_overlays_runs(knn_run, image_folder, tmp_path, capsys):
    other = tmp_path / "other"
    train(tiny_config(image_folder, other, "max_steps=2"))
    runs = plot_tool.load_runs([knn_run[0], other / "metrics.jsonl"])
    assert list(runs) == [knn_run[0].name, "other"]
    figure = plot_runs(runs)
    loss_axes = figure.axes[0]
    assert [line.get_label() for line in loss_axes.get_lines()] == [knn_run[0].name, "other"]
    assert list(loss_axes.get_lines()[1].get_ydata()) == [line["loss"] for line in records(other)]
    assert [t.get_text() for t in loss_axes.get_legend().get_texts()] == [knn_run[0].name, "other"]

    plot_tool.main([str(knn_run[0]), "--out", str(tmp_path / "compare.png"), str(other)])  # runs around an option
    with Image.open(tmp_path / "compare.png") as image:
        assert image.format == "PNG" and image.size == (1600, 700)  # 2 rows of 4 panels


def test_plot_tool_loads_no_torch():
    """Overlaying curves needs matplotlib and the metrics file, not torch: loading torch and torchvision
    took the tool from about 1 s to about 4 s."""
    assert modules_loaded_by("import tools.plot", ("torch", "torchvision", "pipelines")) == []


def test_plot_tool_whose_stdout_reader_has_gone_writes_its_plot_and_exits_0(tmp_path):
    """`python -m tools.plot RUN | head -0`: the PNG was written, then "wrote ..." ended the command in a
    BrokenPipeError traceback and exit 1."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "loss": 10.0 - step}) + "\n"
                                                    for step in (1, 2)))
    result = run_with_stdout_unread([sys.executable, "-m", "tools.plot", str(tmp_path), "--out", str(tmp_path / "p.png")])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    with Image.open(tmp_path / "p.png") as image:
        assert image.format == "PNG"


def test_plot_tool_names_a_run_without_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_tool.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"error: run {tmp_path} has no metrics.jsonl; give a run's " \
                                                f"out_dir or its metrics.jsonl\n"


def test_plot_tool_names_a_metrics_file_it_cannot_read(tmp_path, capsys, monkeypatch):
    """An unreadable metrics.jsonl (no read permission, a failing disk) was a PermissionError traceback. Root
    reads any file whatever its permissions, so the EACCES is simulated at `open`."""
    import builtins
    import errno
    import os
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == str(run / "metrics.jsonl"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(SystemExit) as exit_info:
        plot_tool.main([str(run), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: cannot read {run / 'metrics.jsonl'} ({os.strerror(errno.EACCES)}); make it readable or give "
        f"another run\n")
    assert not (tmp_path / "x.png").exists()


def test_plot_tool_refuses_a_file_of_no_metrics_records(tmp_path, capsys):
    """Text, an empty file, JSON that is no object with a step and a metric, a PNG: one line, no plot."""
    files = {"README.md": b"# bt_fast\n\nBarlow Twins.\n", "empty.jsonl": b"", "list.jsonl": b"[1, 2]\n",
             "steps.jsonl": b'{"step": 1}\n', "metrics.png": b"\x89PNG\r\n\x1a\n\xff\xd8\x00"}
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SystemExit) as exit_info:
            plot_tool.main([str(path), "--out", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2 and capsys.readouterr().err == (
            f"error: {path} holds no metrics records (JSON objects of a step and its loss, one a line); "
            f"give a run's out_dir or its metrics.jsonl\n"), name
    assert not (tmp_path / "x.png").exists()


def test_plot_tool_names_the_line_and_field_that_is_not_a_number(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    for lines, problem in (([{"step": "x", "loss": "y"}], "line 1: 'step' holds a string, not an integer"),
                           ([{"step": 1, "loss": 2.0}, {"step": 2, "loss": [1.5]}],
                            "line 2: 'loss' holds a list, not a number")):
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        with pytest.raises(SystemExit) as exit_info:
            plot_tool.main([str(path), "--out", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2 and capsys.readouterr().err == (
            f"error: {path} {problem}; give a metrics.jsonl that training wrote\n")
    assert not (tmp_path / "x.png").exists()


def test_plot_tool_warns_of_lines_that_hold_no_record_and_plots_the_rest(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\nnot json\n\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')  # torn last
    steps, values = plot_tool.read_curves(path).series("loss")
    assert steps.tolist() == [1, 2] and values.tolist() == [3.0, 2.0]
    assert capsys.readouterr().err == (f"warning: {path} 2 lines, the first line 2, hold no metrics record (a JSON "
                                       f"object with a step); left out of the plot\n")
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    plot_tool.read_curves(path)
    assert capsys.readouterr().err == ""  # a killed writer's torn line is no news


STEP_OUT_OF_RANGE = "'step' holds an integer outside -2**63..2**63 - 1, the 64-bit range of a step"


@pytest.mark.parametrize("bad, problem", [
    ({"step": 2**63, "loss": 1.0}, STEP_OUT_OF_RANGE),
    ({"step": -2**63 - 1, "loss": 1.0}, STEP_OUT_OF_RANGE),
    ({"step": 2, "loss": 10**400}, "'loss' holds an integer beyond the range of a 64-bit float (about 1.8e308)"),
])
def test_plot_tool_names_the_line_and_field_out_of_range(bad, problem, tmp_path, capsys):
    # These overflowed the curves' int64 / float64 columns with an OverflowError traceback.
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        plot_tool.main([str(path), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: {path} line 2: {problem}; give a metrics.jsonl that training wrote\n")
    assert not (tmp_path / "x.png").exists()


def test_plot_tool_takes_the_extreme_steps_and_values_a_curve_can_hold(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": -2**63, "loss": 10**308}, {"step": 2**63 - 1, "loss": 1}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    steps, values = plot_tool.read_curves(path).series("loss")
    assert steps.tolist() == [-2**63, 2**63 - 1] and values.tolist() == [1e308, 1.0]


@pytest.mark.parametrize("edit, reason", [({"step": 2**63}, STEP_OUT_OF_RANGE),
                                          ({"step": -2**63 - 1}, STEP_OUT_OF_RANGE),
                                          ({"loss": "abc"}, "'loss' holds a string, not a number")])
def test_a_resumed_run_keeps_a_hand_edited_record_the_plots_cannot_take_and_warns_of_it(edit, reason, image_folder,
                                                                                       tmp_path, capsys):
    # These stopped the resumed run with an OverflowError or TypeError traceback from the curves, or (a step of
    # 2**63) were dropped from metrics.jsonl without a word, as if they were lost work after the checkpoint.
    args = tiny_args(image_folder, tmp_path, "epochs=2", "max_steps=3")
    run_main(capsys, *args[:-1], "max_steps=2")
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), **edit})
    path.write_text("".join(line + "\n" for line in lines))
    warning = (f"warning: {path} line 1: {reason}; the record stays in the file but is left out of metrics.png and "
               f"summary.json")
    code, out, err = run_main(capsys, *args)
    assert code == 0 and out.startswith("done: 3 steps")
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [warning]
    after = path.read_text().splitlines()
    assert after[:2] == lines and [json.loads(line)["step"] for line in after[2:]] == [3]
    found = summary(tmp_path)
    assert (found["steps"], found["images"], found["first_loss"]) == (3, 2 * 8, json.loads(lines[1])["loss"])
    # the rerun of the complete run says so again, and rewrites nothing
    kept = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "summary.json", "metrics.png")}
    code, out, err = run_main(capsys, *args)
    assert code == 0 and out.startswith("run already complete at max_steps=3 ")
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [warning]
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept


def test_each_step_line_holds_its_epochs_crop_side(tmp_path):
    from bt_fast.run_log import RunLog
    config = load_config(None, [f"out_dir={tmp_path}", "epochs=4", "augment.start_image_size=32",
                                "augment.image_size=64"])  # ramp [0.75, 0.875] of epochs 0..3: 2.25 to 2.625
    log = RunLog(config, step=0, elapsed_s=0.0)
    for epoch in range(4):
        log.write({"step": epoch + 1, "epoch": epoch, "loss": 1.0})
    log.write({"step": 4, "epoch": 3, "knn_top1": 50.0})
    log.close()
    assert [record.get("image_size") for record in records(tmp_path)] == [32, 32, 32, 64, None]


def _plot_in_a_fresh_process(tmp_path: Path, env: dict) -> tuple[str, dict]:
    """(stderr, what the process saw) of plotting one curve in a new interpreter with `env` (plus PATH and
    TMPDIR=tmp_path/tmp), as the first metrics.png of a run does."""
    import subprocess
    (tmp_path / "tmp").mkdir()
    script = ("import json, os, sys\n"
              "from bt_fast.plots import Curves, plot_runs, save_png\n"
              "save_png(plot_runs({'run': Curves([{'step': 1, 'loss': 2.0}])}), sys.argv[1])\n"
              "import matplotlib\n"
              "print(json.dumps({'configdir': matplotlib.get_configdir(), 'cachedir': matplotlib.get_cachedir(),\n"
              "                  'MPLCONFIGDIR': os.environ.get('MPLCONFIGDIR')}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "metrics.png")], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
                          env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(tmp_path / "tmp"),
                               **env})
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "metrics.png") as image:
        assert image.format == "PNG"
    return done.stderr, json.loads(done.stdout)


def test_a_home_matplotlib_cannot_write_gets_a_temporary_config_dir_without_its_warning(tmp_path):
    """HOME not writable (here a file, which root cannot write into either): matplotlib warned "mkdir -p
    failed ... it is highly recommended to set the MPLCONFIGDIR environment variable" on every training run."""
    home = tmp_path / "home"
    home.write_text("a file, not a directory")
    err, seen = _plot_in_a_fresh_process(tmp_path, {"HOME": str(home)})
    assert err == ""
    temporary = Path(seen["MPLCONFIGDIR"])
    assert temporary.parent == tmp_path / "tmp" and temporary.name.startswith("matplotlib-")
    assert seen["configdir"] == seen["cachedir"] == str(temporary)
    assert list((tmp_path / "tmp").iterdir()) == []  # removed at exit


def test_a_writable_home_or_a_given_mplconfigdir_is_what_matplotlib_uses(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    err, seen = _plot_in_a_fresh_process(tmp_path, {"HOME": str(home)})
    assert (err, seen["MPLCONFIGDIR"]) == ("", None)
    assert (seen["configdir"], seen["cachedir"]) == (str(home / ".config" / "matplotlib"),
                                                    str(home / ".cache" / "matplotlib"))
    (tmp_path / "tmp").rmdir()
    (tmp_path / "metrics.png").unlink()
    given, unwritable_home = tmp_path / "given", tmp_path / "file"
    given.mkdir()
    unwritable_home.write_text("a file")
    err, seen = _plot_in_a_fresh_process(tmp_path, {"HOME": str(unwritable_home), "MPLCONFIGDIR": str(given)})
    assert (err, seen["MPLCONFIGDIR"], seen["configdir"]) == ("", str(given), str(given))

"""tools.bench (package): a --quick run on a tiny dataset writes every section with consistent, measured figures."""
from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

from bt_fast.optim import LARS
from tests.conftest import write_image_folder
from tools.bench.__main__ import main, parse_args
from tools.bench.decode_floor import beton_jpegs, decode_cpu_seconds, shard_jpegs
from tools.bench.measure import time_interleaved, tree_cpu_seconds
from tools.bench.optimizer import official_lars_step, optimizer_parameters
from tools.bench.report import format_table

SECTIONS = ("environment", "decode_floor", "loaders", "augment", "optimizer", "train_step")


def is_figure(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"median", "min", "max"}
            and all(isinstance(v, float) and math.isfinite(v) for v in value.values())
            and 0 < value["min"] <= value["median"] <= value["max"])


@pytest.fixture(scope="module")
def quick_run(module_tmp):
    """One quick run: reference measured, dali made unavailable (its import fails), ffcv as it is
    (measured if it builds here, else reported unavailable: both are checked). The training step fed
    by reference runs in this process: the child-process path is the end-to-end run's below."""
    import tools.bench.train_step as train_step
    tmp = module_tmp("bench")
    data = write_image_folder(tmp / "train", classes=3, per_class=8, size=(96, 72))
    json_path, plot_path = tmp / "out" / "bench.json", tmp / "out" / "bench.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "pipelines.dali", None)  # `from pipelines.dali import ...` raises ImportError
        mp.setattr(train_step, "train_in_child", train_step.train_with_pipeline)
        code = main(["--quick", "--data", str(data), "--pipelines", "reference,ffcv,dali",
                     "--train-pipelines", "reference,dali",
                     "--batch-size", "8", "--image-size", "32", "--train-image-size", "16", "--train-batch-size", "4",
                     "--projector", "32-32", "--loader-batches", "2", "--train-steps", "2",
                     "--decode-images", "12", "--workers", "1", "--optimizer-params", "small",
                     "--device", "cpu", "--json", str(json_path), "--plot", str(plot_path)])
    assert code == 0
    return json.loads(json_path.read_text()), plot_path


def test_every_section_is_written_and_the_plot_exists(quick_run):
    result, plot_path = quick_run
    assert all(section in result for section in SECTIONS)
    assert plot_path.is_file() and plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    env = result["environment"]
    assert env["batch_size"] == 8 and env["image_size"] == 32 and env["cpu_count"] >= 1
    assert env["torch"] == torch.__version__


def test_unavailable_pipeline_is_reported_not_measured(quick_run):
    result, _ = quick_run
    for section in ("loaders", "train_step", "decode_floor"):
        entry = result[section]["dali"]
        assert set(entry) == {"unavailable"} and "pipelines.dali" in entry["unavailable"]


def test_loader_figures_are_consistent(quick_run):
    result, _ = quick_run
    measured = {k: v for k, v in result["loaders"].items() if "unavailable" not in v}
    assert "reference" in measured
    for name, entry in measured.items():
        images = entry["images_per_rep"]
        assert images == 2 * 8  # --loader-batches 2 of --batch-size 8
        for key in ("images_per_s", "host_cpu_s_per_image", "seconds", "host_cpu_seconds"):
            assert is_figure(entry[key]), (name, key)
        # images/s x seconds = images counted; CPU s/image x images = CPU seconds
        assert entry["images_per_s"]["median"] * entry["seconds"]["median"] == pytest.approx(images)
        assert entry["images_per_s"]["min"] * entry["seconds"]["max"] == pytest.approx(images)
        floor = result["decode_floor"][name]["cpu_s_per_image"]
        assert is_figure(floor)
        assert entry["vs_decode_floor"] == pytest.approx(entry["host_cpu_s_per_image"]["median"] / floor["median"])
        if "host_stage_images_per_rep" in entry:  # measured on the host stage alone (CPU device)
            assert entry["host_stage_images_per_s"]["median"] * entry["host_stage_seconds"]["median"] == \
                pytest.approx(entry["host_stage_images_per_rep"])
            assert entry["host_cpu_s_per_image"]["median"] * entry["host_stage_images_per_rep"] == \
                pytest.approx(entry["host_stage_cpu_seconds"]["median"])
        else:
            assert entry["host_cpu_s_per_image"]["median"] * images == pytest.approx(entry["host_cpu_seconds"]["median"])
    # reference decodes the original files: its floor is the top-level one
    assert result["decode_floor"]["reference"]["cpu_s_per_image"] == result["decode_floor"]["cpu_s_per_image"]
    ffcv = result["loaders"]["ffcv"]
    if "unavailable" not in ffcv:
        assert result["decode_floor"]["ffcv"]["source"] == "beton"


def test_augment_optimizer_and_train_step_figures(quick_run):
    result, _ = quick_run
    aug = result["augment"]
    assert is_figure(aug["ours_images_per_s"]) and is_figure(aug["kornia_images_per_s"])
    assert aug["speedup"] == pytest.approx(aug["ours_images_per_s"]["median"] / aug["kornia_images_per_s"]["median"])

    opt = result["optimizer"]
    assert opt["parameter_set"] == "small" and opt["tensors"] == 8
    for key in ("fused_ms", "reference_ms", "foreach_ms"):
        assert is_figure(opt[key])
    assert opt["speedup"] == pytest.approx(opt["reference_ms"]["median"] / opt["fused_ms"]["median"])
    assert opt["foreach_speedup"] == pytest.approx(opt["reference_ms"]["median"] / opt["foreach_ms"]["median"])
    assert opt["fused_compile_s"] > 0
    assert opt["reference_ops_per_step"] > opt["foreach_ops_per_step"] > 0 and opt["fused_ops_per_step"] > 0
    probe = opt["ops_growth_probe"]
    assert probe["foreach"][0] == probe["foreach"][1] and probe["reference"][1] > probe["reference"][0]

    ts = result["train_step"]
    assert is_figure(ts["synthetic_images_per_s"])
    ref = ts["reference"]
    assert is_figure(ref["images_per_s"]) and is_figure(ref["step_seconds"])
    assert ref["images_per_s"]["median"] * ref["step_seconds"]["median"] == pytest.approx(4)  # --train-batch-size
    stall = ref["data_stall_fraction"]
    assert set(stall) == {"median", "min", "max"} and 0 <= stall["min"] <= stall["median"] <= stall["max"] <= 1

    targets = {t["target"]: t for t in result["targets"]}
    assert len(targets) == 7


def test_the_table_prints_the_fused_triton_augmentation_when_measured(quick_run):
    """The CUDA-only figure (tools.bench.augment on a GPU), added to this CPU run's section."""
    result, _ = quick_run
    triton = {"median": 5000.0, "min": 4000.0, "max": 6000.0}
    speedup = triton["median"] / result["augment"]["kornia_images_per_s"]["median"]
    measured = {**result, "augment": {**result["augment"], "ours_triton_images_per_s": triton,
                                      "triton_speedup": speedup}}
    line = next(line for line in format_table(measured).splitlines() if line.startswith("Augmentation"))
    assert line.endswith(f"; fused Triton 5000.0 [4000.0-6000.0] images/s, speedup {speedup:.2f}x")
    failed = {**result, "augment": {**result["augment"], "ours_triton": {"unavailable": "triton: ImportError"}}}
    line = next(line for line in format_table(failed).splitlines() if line.startswith("Augmentation"))
    assert line.endswith("; fused Triton unavailable: triton: ImportError")
    assert "Triton" not in format_table(result)


def test_device_crop_section_counts_ops_at_two_batch_sizes_and_its_flops(quick_run):
    result, _ = quick_run
    crop = result["device_crop"]
    (small, ops_small), (large, ops_large) = crop["ops_per_batch"].items()
    assert int(large) == 2 * int(small) and ops_small == ops_large > 0
    (height, width), size = crop["slot"], crop["image_size"]
    # Two views, each: columns (S x W per row of H, 3 channels) then rows (S x H per output column).
    assert crop["flops_per_image"] == 2 * 2 * 3 * (size * width * height + size * height * size)
    if "unavailable" not in result["loaders"]["ffcv"]:  # the slot of the .beton the loader read: 72 x 96 images
        assert [height, width] == [72, 96] and crop["slot_from"].startswith("largest stored image of ")
    assert is_figure(crop["images_per_s"])
    flat = next(t for t in result["targets"] if t["target"].startswith("device crop op count"))
    assert flat["met"] is True


def test_cpu_meter_counts_live_and_exited_child_processes():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(30)"
    before = tree_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        deadline = time.monotonic() + 30
        while tree_cpu_seconds() - before < 0.35 and time.monotonic() < deadline:
            time.sleep(0.05)
        live = tree_cpu_seconds() - before  # the child is alive (sleeping) here
    finally:
        child.kill()
        child.wait()
    exited = tree_cpu_seconds() - before  # reaped: now in this process's children times
    assert live >= 0.35
    assert exited >= live - 0.05


def test_stored_jpegs_are_read_from_beton_and_shards(tmp_path):
    from pipelines.convert import convert
    data = write_image_folder(tmp_path / "train", classes=2, per_class=3, size=(40, 30))
    convert(data, tmp_path / "shards", "dali", workers=1, progress=False)
    jpegs = shard_jpegs(tmp_path / "shards", limit=100)
    assert len(jpegs) == 6
    assert all(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR).shape == (30, 40, 3) for b in jpegs)
    assert len(shard_jpegs(tmp_path / "shards", limit=4)) == 4

    convert(data, tmp_path / "train.beton", "ffcv", workers=1, progress=False)
    stored = beton_jpegs(tmp_path / "train.beton", limit=100)
    assert len(stored) == 6
    assert all(b[:2] == b"\xff\xd8" and b.rstrip(b"\x00")[-2:] == b"\xff\xd9" for b in stored)  # whole JPEGs
    assert all(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR).shape == (30, 40, 3) for b in stored)
    assert decode_cpu_seconds(stored, reps=2)[0] > 0


def test_official_loop_matches_lars():
    """The loop the speedup is measured against has the optimizer's semantics."""
    groups = optimizer_parameters("small", torch.device("cpu"), seed=0)
    twins = [{"params": [torch.nn.Parameter(p.detach().clone()) for p in g["params"]],
              "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in groups]
    for g, t in zip(groups, twins):
        for p, q in zip(g["params"], t["params"]):
            q.grad = p.grad.clone()
    opt = LARS(twins, lr=0.0, weight_decay_filter=True, lars_adaptation_filter=True)
    state: dict = {}
    for _ in range(3):
        official_lars_step(groups, state)
        opt.step()
    for g, t in zip(groups, twins):
        for p, q in zip(g["params"], t["params"]):
            torch.testing.assert_close(p, q)


def test_quick_feeds_the_training_step_synthetic_batches_only_unless_asked():
    assert parse_args(["--quick"]).train_pipelines == []
    assert parse_args(["--quick", "--train-pipelines", "ffcv"]).train_pipelines == ["ffcv"]
    assert parse_args([]).train_pipelines == ["reference", "ffcv", "dali"]


def test_bad_arguments_exit_with_one_line():
    with pytest.raises(SystemExit) as exc:
        parse_args(["--pipelines", "reference,bogus"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["--pipelines", "reference", "--train-pipelines", "dali"])
    with pytest.raises(SystemExit) as exc:
        parse_args(["--arch", "resnet1"])  # choices come from bt_fast.model.BACKBONE_DIM
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        parse_args(["--train-warmup", "-1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        parse_args(["--conversion", "--end-to-end"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:  # the generated set would be too small for one training batch
        parse_args(["--end-to-end", "--device", "cpu", "--e2e-images", "15"])
    assert exc.value.code == 2
    assert parse_args(["--end-to-end", "--device", "cpu", "--e2e-images", "16"]).e2e_images == 16


# The sections that read each option that not all of them read: "bench" is the default run. Every other option of
# the parser (--data, --workers, --json and the section switches) every section reads.
OPTION_SECTIONS = {
    "--batch-size 8": "bench", "--image-size 64": "bench", "--train-pipelines none": "bench", "--plot PLOT": "bench",
    "--loader-batches 4": "bench", "--augment-compile": "bench", "--optimizer-params small": "bench",
    "--quick": "bench conversion", "--reps 2": "bench conversion", "--decode-images 8": "bench conversion",
    "--e2e-images 64": "end_to_end", "--conversion-images 64": "conversion",
    **dict.fromkeys(["--pipelines reference", "--threads 1", "--device cpu", "--arch resnet18", "--projector 16-16",
                     "--train-image-size 16", "--train-batch-size 4", "--amp none", "--train-steps 1",
                     "--train-warmup 0", "--config c.yaml", "--set ffcv.beton=x.beton", "--seed 1",
                     "--child-timeout 5"], "bench end_to_end"),
}
SECTION_OPTIONS = {"bench": [], "end_to_end": ["--end-to-end"], "conversion": ["--conversion"]}
SECTION_NAMES = {"bench": "the default sections", "end_to_end": "--end-to-end", "conversion": "--conversion"}


def test_every_option_that_some_section_leaves_unread_is_listed():
    from tools.bench.__main__ import _parser
    every = {action.option_strings[0] for action in _parser()._actions if action.option_strings}
    read_by_all = {"-h", "--data", "--workers", "--json", "--end-to-end", "--conversion", "--_train-child",
                   "--_child-out"}
    assert every - read_by_all == {option.split()[0] for option in OPTION_SECTIONS}


@pytest.mark.parametrize("option", OPTION_SECTIONS)
def test_an_option_of_a_section_not_run_is_one_error_line(option, tmp_path, capsys):
    """`--e2e-images 0` or `--conversion-images -5` without their section ran the whole default bench (minutes) and
    ignored them; so did every option below in a section that does not read it."""
    flag, *value = option.replace("PLOT", str(tmp_path / "bench.png")).split()
    sections = OPTION_SECTIONS[option].split()
    for section, switch in SECTION_OPTIONS.items():
        argv = [*switch, flag, *value, "--json", str(tmp_path / "out.json")]
        if section in sections:
            assert parse_args(argv).end_to_end == (section == "end_to_end")
            continue
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
        readers = " or ".join(SECTION_NAMES[s] for s in sections)
        instead = {"--batch-size": " (--end-to-end reads --train-batch-size)",
                   "--image-size": " (--end-to-end reads --train-image-size)",
                   "--reps": " (--end-to-end reads --train-steps)"}.get(flag, "") if section == "end_to_end" else ""
        assert capsys.readouterr().err.splitlines() == [
            f"error: {flag} applies to {readers} only, not {SECTION_NAMES[section]}{instead} (see --help)"]


@pytest.mark.parametrize("switch, option", [("--end-to-end", "--e2e-images"), ("--conversion", "--conversion-images")])
def test_the_size_of_the_generated_set_is_refused_with_data(switch, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args([switch, option, "64", "--data", str(tmp_path), "--json", str(tmp_path / "out.json")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {option} applies without --data only: it sizes the ImageNet-like set built when no --data is given; "
        f"drop one of them (see --help)"]
    # the training-step process of `--end-to-end --e2e-images 64` gets the set it built as --data
    child = parse_args(["--end-to-end", "--e2e-images", "64", "--device", "cpu", "--data", str(tmp_path),
                        "--_train-child", "reference", "--_child-out", str(tmp_path / "child.json")])
    assert child.e2e_images == 64


@pytest.mark.parametrize("argv, message", [
    (["--pipelines", ""], "--pipelines takes names from reference,ffcv,ffcv_device_decode,ffcv_host_crop,dali, got "
                          "nothing"),
    (["--pipelines", " , "], "--pipelines takes names from reference,ffcv,ffcv_device_decode,ffcv_host_crop,dali, "
                             "got nothing"),
    (["--end-to-end", "--pipelines", ""], "--pipelines takes names from reference,ffcv,ffcv_device_decode,"
                                          "ffcv_host_crop,dali, got nothing"),
    (["--train-pipelines", ""], "--train-pipelines got nothing; name pipelines of --pipelines, or 'none' for "
                                "synthetic batches only"),
    (["--threads", "-1"], "--threads must be at least 0, got -1"),
    (["--workers", "-2"], "--workers must be at least 0, got -2"),
    (["--train-warmup", "-1"], "--train-warmup must be at least 0, got -1"),
])
def test_an_empty_list_or_a_negative_count_is_refused_by_its_name(argv, message, capsys):
    """An empty --pipelines meant every pipeline; one line named --workers, --threads and --train-warmup at once."""
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", "cpu", *argv])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message} (see --help)"]


def test_torchs_no_cuda_runtime_warning_stays_out_of_the_progress_lines(tmp_path, monkeypatch):
    """torch warns once, on importing its C++-extension helper (the compiled optimizer does, mid-run), that a machine
    with a CUDA toolkit has no CUDA runtime: between the progress lines, and no finding of the bench."""
    import logging

    import tools.bench.__main__ as bench
    from tools.bench.measure import BenchError
    logger, emitted = logging.getLogger("torch.utils.cpp_extension"), []
    handler = logging.Handler()
    handler.emit = emitted.append

    def section(args):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")  # as torch's import does
        raise BenchError("stop here")

    monkeypatch.setattr(bench, "resolve_data", lambda args: None)
    monkeypatch.setattr(bench, "run", section)
    level = logger.level
    logger.addHandler(handler)
    try:
        with pytest.raises(SystemExit):
            main(["--device", "cpu", "--data", "unused", "--json", str(tmp_path / "bench.json")])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert emitted == []


def test_the_device_crop_without_a_beton_read_takes_the_runs_max_resolution(tmp_path):
    """With a .beton read, its padded slot (the quick run's test above; a catch-all put a 512x512 slot there);
    without one (ffcv not measured), the largest image the run's first-use conversion would store."""
    from tools.bench.device_crop import bench_device_crop
    sizes = ["--device", "cpu", "--data", str(tmp_path), "--batch-size", "2", "--image-size", "16", "--reps", "1",
             "--json", str(tmp_path / "bench.json")]
    crop = bench_device_crop(parse_args([*sizes, "--set", "ffcv.max_resolution=64"]), {"reference": None})
    assert crop["slot"] == [64, 64] and crop["slot_from"] == "ffcv.max_resolution (64) square: no .beton was read"


def test_loader_windows_shorter_than_the_reference_workers_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", "cpu", "--pipelines", "reference,ffcv", "--workers", "2", "--loader-batches", "1"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --loader-batches must be at least --workers (2) when the reference loader is measured: each worker "
        "builds a whole batch, so batches arrive 2 at a time and a shorter window can time only batches built "
        "before it began; got 1 (see --help)"]
    # FFCV and DALI build one batch at a time: one batch a window is measurable
    assert parse_args(["--device", "cpu", "--pipelines", "ffcv,dali", "--workers", "2", "--loader-batches", "1"]
                      ).loader_batches == 1
    assert parse_args(["--device", "cpu", "--pipelines", "reference", "--workers", "6"]).loader_batches == 6  # default


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda", "--data", "unused"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device is cuda")


def test_a_missing_data_folder_is_one_error_line_before_any_section(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--device", "cpu", "--data", str(tmp_path / "missing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: data directory {tmp_path / 'missing'} does not exist; give an existing ImageFolder "
                   f"(a directory of class folders)"]


@pytest.mark.parametrize("options, flag", [([], "--batch-size"), (["--train-pipelines", "reference",
                                                                     "--batch-size", "2"], "--train-batch-size")])
def test_a_data_folder_smaller_than_one_batch_is_one_error_line_before_any_section(tmp_path, capsys, options, flag):
    """Each section reported every pipeline unavailable, after minutes of the others, and the run exited 0."""
    data = write_image_folder(tmp_path / "train", classes=1, per_class=3, size=(40, 30))
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--device", "cpu", "--data", str(data), *options])
    assert exc.value.code == 2
    size = {"--batch-size": 32, "--train-batch-size": 16}[flag]  # --quick's on the CPU
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --data {data} has 3 images, fewer than one batch of {flag} {size}; pass {flag} 3 or less, or a "
        f"folder of more images"]


def test_a_file_as_data_is_refused_without_offering_a_beton(tmp_path, capsys):
    """The ImageFolder check's line offered "(or, with pipeline=ffcv, a .beton)", which no section reads."""
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--device", "cpu", "--data", str(beton)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --data {beton} is a file; the benchmark reads an ImageFolder and converts it to each pipeline's "
        f"format itself: give the directory of class folders"]


def test_the_demo_set_is_checked_against_the_batch_size_as_data_is(tmp_path, monkeypatch, capsys):
    """Without --data nothing compared the demo set with --batch-size: the device-crop section was killed for
    memory at a batch of 2000."""
    import pipelines.demo_data
    demo = tmp_path / "demo"
    write_image_folder(demo / "train", classes=2, per_class=3, size=(40, 30))
    monkeypatch.setattr(pipelines.demo_data, "build", lambda root, *counts: demo)
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--device", "cpu", "--batch-size", "2000"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: the demo set {demo / 'train'} has 6 images, fewer than one batch of --batch-size 2000; pass "
        f"--batch-size 6 or less, or --data, a folder of more images"]


def test_ctrl_c_says_no_result_was_written_and_keeps_the_data(tmp_path, monkeypatch, capsys):
    """It said "nothing was written" where the run had built the demo set and converted it on first use."""
    import tools.bench.__main__ as bench
    data = write_image_folder(tmp_path / "train", classes=1, per_class=4, size=(40, 30))

    def interrupted(args, name):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "bench_loader", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--device", "cpu", "--data", str(data), "--batch-size", "2", "--json",
              str(tmp_path / "bench.json")])
    assert exc.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: interrupted; no result was written (the JSON and the plot come at the end); the data sets it built "
        "and the pipelines' first-use conversions stay, and the next run reuses or completes them")
    assert not (tmp_path / "bench.json").exists() and len(list(data.rglob("*.jpg"))) == 4


def test_interleaved_timing_warms_up_each_runner_then_alternates():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    seconds = time_interleaved(runners, torch.device("cpu"), reps=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one untimed call each, then one timed call each per round
    assert {name: len(s) for name, s in seconds.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for s in seconds.values() for t in s)


def test_kornia_views_use_each_views_probabilities():
    from bt_fast.config import AugmentSpec
    from tools.bench.augment import KorniaTwoView
    spec = AugmentSpec(image_size=16)
    views = KorniaTwoView(spec, torch.device("cpu")).views
    for index, view in enumerate(views):
        blur, solarize = view[3], view[4]
        assert blur.p == spec.blur_p[index] and solarize.p == spec.solarize_p[index]
        assert view[0].p == spec.flip_p and view[1].p == spec.jitter_p and view[2].p == spec.grayscale_p


def test_augment_section_reports_missing_kornia(monkeypatch):
    """Without kornia (as on machines that lack it) our rate is still measured and the speedup is None."""
    monkeypatch.setitem(sys.modules, "kornia", None)
    monkeypatch.setitem(sys.modules, "kornia.augmentation", None)
    from tools.bench.augment import bench_augment
    args = parse_args(["--data", "unused", "--batch-size", "2", "--image-size", "16", "--reps", "2", "--device", "cpu"])
    aug = bench_augment(args)
    assert aug["kornia_images_per_s"] is None and aug["speedup"] is None
    assert "kornia" in aug["kornia_unavailable"] and is_figure(aug["ours_images_per_s"])


# -- end to end ---------------------------------------------------------------------------------------
E2E_SIZES = ["--train-image-size", "16", "--train-batch-size", "4", "--projector", "16-16", "--workers", "1",
             "--device", "cpu"]


def e2e_args(data, *extra):
    return parse_args(["--end-to-end", "--data", str(data), *E2E_SIZES, *extra])


def test_end_to_end_defaults_follow_the_device():
    args = parse_args(["--end-to-end", "--device", "cpu"])
    assert (args.arch, args.projector, args.train_image_size, args.train_batch_size, args.amp) == \
        ("resnet18", "64-64-64", 32, 16, "none")
    assert args.pipelines == ["reference", "ffcv", "ffcv_device_decode", "dali"] and args.train_pipelines == []
    assert str(args.json) == "runs/bench/end_to_end.json" and args.e2e_images == 256
    assert (args.train_steps, args.train_warmup) == (4, 2) and parse_args(["--device", "cpu"]).train_warmup == 1
    assert parse_args(["--end-to-end", "--device", "cpu", "--train-warmup", "0"]).train_warmup == 0
    with pytest.raises(SystemExit):
        parse_args(["--end-to-end", "--device", "cpu", "--e2e-images", "0"])


def test_end_to_end_timing_counts_the_wait_for_each_batch(tmp_path):
    """A source that sleeps before each batch: the wait recorded covers the sleeps, and every figure is the
    stated ratio of the recorded times."""
    from tools.bench.end_to_end import MODES, synthetic_views, timed_steps
    from tools.bench.train_step import make_trainer
    args = e2e_args(write_image_folder(tmp_path / "train", classes=2, per_class=4, size=(24, 20)))
    trainer = make_trainer(args, "reference", MODES)
    views = synthetic_views(trainer, 0)
    assert views[0].shape == (4, 3, 16, 16) and views[0].is_contiguous(memory_format=torch.channels_last)
    nap = 0.15

    def slow():
        while True:
            time.sleep(nap)
            yield views

    start = time.perf_counter()
    entry = timed_steps(trainer, slow(), steps=3, warmup=1)
    outside = time.perf_counter() - start
    assert trainer.step == 4 and entry["images"] == 3 * 4 and entry["steps"] == 3
    assert 3 * nap <= entry["wait_seconds"] < entry["timed_seconds"] <= outside
    assert entry["images_per_s"] == pytest.approx(entry["images"] / entry["timed_seconds"])
    assert entry["data_wait_fraction"] == pytest.approx(entry["wait_seconds"] / entry["timed_seconds"])
    assert entry["host_cores_busy"] == pytest.approx(entry["host_cpu_seconds"] / entry["wall_seconds"])
    assert entry["timed_seconds"] <= entry["wall_seconds"] <= outside


def test_end_to_end_reports_a_pipeline_that_cannot_be_built(tmp_path, monkeypatch):
    from tools.bench.end_to_end import end_to_end_pipeline
    monkeypatch.setitem(sys.modules, "pipelines.dali", None)
    entry = end_to_end_pipeline(e2e_args(write_image_folder(tmp_path / "train", classes=2, per_class=4)), "dali")
    assert set(entry) == {"unavailable"} and "pipelines.dali" in entry["unavailable"]


def test_end_to_end_run_writes_each_pipelines_rates_and_their_ratio(tmp_path, capsys):
    data = write_image_folder(tmp_path / "train", classes=2, per_class=8, size=(48, 40))
    out = tmp_path / "e2e.json"
    assert main(["--end-to-end", "--data", str(data), *E2E_SIZES, "--pipelines", "reference",
                 "--train-steps", "2", "--train-warmup", "1", "--json", str(out)]) == 0  # measured in a child process
    result = json.loads(out.read_text())
    section = result["end_to_end"]
    assert (section["image_size"], section["batch_size"], section["steps"], section["warmup_steps"],
            section["timeline"]) == (16, 4, 2, 1, "host clock")
    assert not {"batch_size", "image_size"} & set(result["environment"])  # the loaders' sizes: no loader ran
    entry = section["reference"]
    assert entry["images"] == 2 * 4 and entry["synthetic"]["images"] == 2 * 4
    for figures in (entry, entry["synthetic"]):
        assert figures["images_per_s"] == pytest.approx(figures["images"] / figures["timed_seconds"])
        assert figures["host_cores_busy"] == pytest.approx(figures["host_cpu_seconds"] / figures["wall_seconds"])
        assert 0 <= figures["data_wait_fraction"] <= 1
        assert figures["data_wait_fraction"] == pytest.approx(figures["wait_seconds"] / figures["timed_seconds"])
    assert entry["vs_synthetic"] == pytest.approx(entry["images_per_s"] / entry["synthetic"]["images_per_s"])
    assert "peak_gpu_memory_gib" not in entry  # CUDA only
    table = capsys.readouterr().out
    assert table.startswith("End to end (resnet18 + 16-16 projector, 16 px, 4 images per view")
    row = next(line for line in table.splitlines() if line.startswith("reference "))
    assert f"{entry['images_per_s']:.1f}" in row and f"{entry['vs_synthetic']:.2f}" in row


def test_loader_plot_names_do_not_overlap():
    """Every loader entry on the x axis at the plot's size: no two tick labels' boxes intersect."""
    from tools.bench.loaders import LOADERS
    from tools.bench.report import loader_figure
    figure = {"median": 2.0, "min": 1.0, "max": 3.0}
    result = {"environment": {"batch_size": 64, "image_size": 224, "device": "cpu", "cpu_count": 2},
              "loaders": {name: {"images_per_s": figure, "host_cpu_s_per_image": figure} for name in LOADERS},
              "decode_floor": {name: {"cpu_s_per_image": figure} for name in LOADERS}}
    fig = loader_figure(result)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [label.get_window_extent(renderer) for label in ax.get_xticklabels()]
        assert len(boxes) == len(LOADERS)
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 < right.x0, (left, right)


def test_a_folder_too_small_for_one_training_batch_leaves_the_synthetic_rate_unavailable(tmp_path):
    # The synthetic-batch rate builds a trainer, whose reference pipeline needs one batch of --data's images: a
    # smaller folder ended the whole run in its last section with that DataError, every other figure lost.
    from tools.bench.report import _train_step_lines
    from tools.bench.train_step import bench_train_step
    data = write_image_folder(tmp_path / "train", classes=1, per_class=3, size=(40, 30))
    args = parse_args(["--quick", "--device", "cpu", "--data", str(data), "--pipelines", "reference",
                       "--train-batch-size", "4", "--train-image-size", "16", "--projector", "32-32",
                       "--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png")])
    section = bench_train_step(args, [], {})
    reason = f"data directory {data} has 3 images: too few for one batch of 4 per rank on 1 rank(s); lower batch_size"
    assert section["synthetic_images_per_s"] == {"unavailable": reason}
    assert _train_step_lines(section, [])[0].endswith(f"amp none): synthetic unavailable: {reason}")


def test_conversion_converts_every_image_to_each_format_and_states_its_target(tmp_path, capsys):
    """Two formats x two repetitions of `tools.convert`, each in a fresh process: every image written, rates and
    ratios that follow from the wall, CPU and floor figures by the formulas the report states, the converter's own
    peak memory (not this process's, which a child keeps across exec), and no output left behind."""
    data = write_image_folder(tmp_path / "set", classes=2, per_class=6, size=(640, 480))  # capped to 512 x 384
    out = tmp_path / "out"
    assert main(["--conversion", "--data", str(data), "--reps", "2", "--workers", "2", "--decode-images", "6",
                 "--json", str(out / "conversion.json")]) == 0
    result = json.loads((out / "conversion.json").read_text())
    section = result["conversion"]
    assert not {"batch_size", "image_size"} & set(result["environment"])
    assert sorted(p.name for p in out.iterdir()) == ["conversion.json"]
    floor = section["decode_floor"]["cpu_s_per_image"]
    assert section["images"] == 12 and section["workers"] == 2 and is_figure(floor)
    assert section["target_images_per_s"] == pytest.approx(0.7 * 2 / floor["median"])
    own_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table = capsys.readouterr().out
    for fmt in ("ffcv", "dali"):
        entry = section[fmt]
        assert entry["written"] == 12 and entry["skipped"] == 0
        assert is_figure(entry["wall_s"]) and is_figure(entry["cpu_s_per_image"])
        assert entry["images_per_s"]["median"] == pytest.approx(12 / entry["wall_s"]["median"])
        assert entry["vs_floor"] == pytest.approx(entry["cpu_s_per_image"]["median"] / floor["median"])
        assert entry["vs_target"] == pytest.approx(entry["images_per_s"]["median"] / (0.7 * 2 / floor["median"]))
        assert 10 < entry["peak_rss_mib"] < own_peak_mib / 2
        assert f"{fmt} {'met' if entry['vs_target'] >= 1 else 'NOT met'}" in table.splitlines()[-3]

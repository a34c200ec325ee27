import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from bt_fast.checkpoint import CheckpointError
from bt_fast.config import ConfigError, load_config
from bt_fast.distributed import DistContext
from bt_fast.train import main, train
from bt_fast.trainer import Trainer

CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_config(data, out_dir, *extra):
    return load_config("configs/demo_cpu.yaml", [f"data={data}", f"out_dir={out_dir}", "pipeline=reference",
                                                 "knn_every=0", "workers=0", "batch_size=8", "projector=64-64",
                                                 "augment.image_size=32", "epochs=2", "warmup_epochs=0", "device=cpu",
                                                 *extra])


@pytest.fixture(scope="module")
def four_steps(image_folder, module_tmp) -> tuple[Path, dict]:
    """An uninterrupted run stopped by max_steps=4 of its 6 (2 epochs of 3): (out_dir, what train() returned)."""
    out_dir = module_tmp("four_steps")
    return out_dir, train(tiny_config(image_folder, out_dir, "max_steps=4"))


@pytest.fixture(scope="module")
def monitored_run(image_folder, module_tmp) -> tuple[Path, list[int]]:
    """The whole 2-epoch run with the k-NN monitor after each epoch and checkpoint_every=2:
    (out_dir, the step of every checkpoint it saved, in order)."""
    out_dir = module_tmp("monitored")
    saved_at = []
    original = Trainer.save_checkpoint
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "save_checkpoint",
                      lambda self, wait=True: (saved_at.append(self.step), original(self, wait)))
        train(tiny_config(image_folder, out_dir, "knn_every=1", f"knn_val={image_folder}", "checkpoint_every=2"))
    return out_dir, saved_at


def test_train_step_changes_parameters_and_lowers_loss_on_a_fixed_batch(image_folder, tmp_path):
    trainer = Trainer(tiny_config(image_folder, tmp_path, "lr_weights=0.5", "lr_biases=0.01"), CPU)
    y1, y2 = next(iter(trainer.pipeline))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    losses = [trainer.train_step(y1, y2).item()]
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    trainer.step = trainer.steps_per_epoch  # past warm-up: full learning rate
    for _ in range(5):
        losses.append(trainer.train_step(y1, y2).item())
    assert losses[-1] < losses[0]


def test_compiled_model_gives_the_eager_losses(image_folder, tmp_path, monkeypatch):
    """compile_model=true is the same network: three steps' losses agree with eager to float32 rounding
    (1e-4 relative, far below a step's change of the loss). The graph is captured by dynamo and AOT
    autograd as in a real run; inductor's code generation, minutes on two cores, is left to gpu_check."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="aot_eager"))
    batches = [tuple(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for _ in range(2))
               for i in range(3)]
    losses = {}
    for compiled in (False, True):
        trainer = Trainer(tiny_config(image_folder, tmp_path, "batch_size=4", "amp=none", "lr_weights=0.5",
                                      f"compile_model={compiled}"), CPU)
        assert (trainer.network is not trainer.model) == compiled
        losses[compiled] = [trainer.train_step(y1, y2).item() for y1, y2 in batches]
    assert losses[False][0] != losses[False][2]  # the steps move the weights
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_resume_gives_the_next_step_losses_of_an_uninterrupted_run_and_drops_lines_after_the_checkpoint(
        four_steps, image_folder, tmp_path):
    """Stopped at step 2, with the log a run killed inside step 4 leaves behind (a line for step 3, which
    the checkpoint does not hold, and a torn one), then resumed to step 4: the log holds each step once and
    steps 3 and 4 have the losses of the uninterrupted run."""
    straight = [json.loads(line)["loss"] for line in open(four_steps[0] / "metrics.jsonl")]

    train(tiny_config(image_folder, tmp_path, "max_steps=2"))
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["step"] == 2
    with open(tmp_path / "metrics.jsonl", "a") as log:
        log.write(json.dumps({"step": 3, "loss": -1.0}) + "\n" + '{"step": 4, "lo')
    train(tiny_config(image_folder, tmp_path, "max_steps=4"))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    split = [r["loss"] for r in records]

    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert len(straight) == len(split) == 4
    assert split[2] != -1.0
    assert split[2] == pytest.approx(straight[2], rel=1e-5)  # first step after the resume
    assert split[3] == pytest.approx(straight[3], rel=1e-5)


def test_saved_backbone_loads_into_torchvision(four_steps):
    state = torch.load(four_steps[1]["backbone"], weights_only=True)
    result = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []


def test_checkpoint_of_another_model_is_refused_and_kept(four_steps, image_folder, tmp_path):
    run = shutil.copytree(four_steps[0], tmp_path / "run")
    before = (run / "checkpoint.pth").read_bytes()
    with pytest.raises(CheckpointError, match="different model"):
        train(tiny_config(image_folder, run, "max_steps=5", "projector=32-32"))
    assert (run / "checkpoint.pth").read_bytes() == before


def test_batch_not_divisible_by_world_size_is_a_config_error(image_folder, tmp_path):
    three_ranks = DistContext(rank=0, local_rank=0, world_size=3, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="divisible"):
        Trainer(tiny_config(image_folder, tmp_path), three_ranks)


@pytest.mark.parametrize("override, message", [
    ("batchsize=8", "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    ("augment.flip=0.5", "unknown config key 'augment.flip'"),
    ("epochs=many", "config key 'epochs' expects a number"),
    ("data=/does/not/exist", "config key 'data' names /does/not/exist, which does not exist"),
])
def test_bad_input_is_one_clear_line(override, message, image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        given = [f"data={image_folder}", f"out_dir={tmp_path}"]  # less the key the override sets (given once)
        main(["--config", "configs/demo_cpu.yaml", *[g for g in given if g.split("=")[0] != override.split("=")[0]],
              override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


@pytest.mark.timeout(120)
def test_a_dataloader_worker_killed_by_the_oom_killer_is_one_line_naming_the_checkpoint(image_folder, tmp_path,
                                                                                        monkeypatch, capsys):
    """torch raises from wherever the loop is (here: its SIGCHLD handler) with a traceback; the run
    ends in one line naming the last checkpoint, and the same command resumes from it."""
    import os
    import signal
    import pipelines.reference as reference
    load_rgb = reference.load_rgb
    checkpoint = tmp_path / "checkpoint.pth"

    def oom_killed_once_checkpointed(path):
        if checkpoint.exists() and os.getpid() != parent:  # in the DataLoader worker
            os.kill(os.getpid(), signal.SIGKILL)
        return load_rgb(path)

    parent = os.getpid()
    monkeypatch.setattr(reference, "load_rgb", oom_killed_once_checkpointed)  # the worker is forked with it
    args = ["--config", "configs/demo_cpu.yaml", f"data={image_folder}", f"out_dir={tmp_path}", "pipeline=reference",
            "knn_every=0", "workers=1", "batch_size=8", "projector=64-64", "augment.image_size=32", "epochs=2",
            "warmup_epochs=0", "device=cpu", "checkpoint_every=1", "max_steps=6"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # torch says "is killed by signal: Killed" or "exited unexpectedly", depending on where it notices
    assert err.startswith("error: DataLoader worker (pid") and "(the kernel's out-of-memory killer ends a worker" in err
    assert "the last good checkpoint is step " in err and f"in {checkpoint}: lower workers (now 1)" in err
    monkeypatch.setattr(reference, "load_rgb", load_rgb)
    main(args)
    assert "done: 6 steps" in capsys.readouterr().out


def test_paper_configs_load_with_the_paper_recipe():
    for name in ("paper_rn50", "paper_rn50_300ep"):
        config = load_config(f"configs/{name}.yaml")
        assert (config.arch, config.projector, config.batch_size) == ("resnet50", "8192-8192-8192", 2048)
        assert (config.lr_weights, config.lr_biases, config.weight_decay, config.lambd) == (0.2, 0.0048, 1.5e-6, 0.0051)
        assert config.augment.blur_kernel_size == 23
    assert load_config("configs/paper_rn50_300ep.yaml").epochs == 300


def test_resnet50_smoke_step(image_folder, tmp_path):
    config = load_config("configs/paper_rn50.yaml", [f"data={image_folder}", f"out_dir={tmp_path}", "pipeline=reference",
                                                     "workers=0", "batch_size=4", "augment.image_size=32",
                                                     "compile_optimizer=false"])
    trainer = Trainer(config, CPU)
    assert trainer.amp_dtype == torch.bfloat16
    y1, y2 = next(iter(trainer.pipeline))
    assert y1.dtype == torch.bfloat16 and y1.is_contiguous(memory_format=torch.channels_last)
    loss = trainer.train_step(y1, y2)
    assert torch.isfinite(loss) and loss.item() > 0
    assert sum(p.numel() for p in trainer.model.parameters()) > 170e6


def test_knn_monitor_logs_what_tools_evaluate_measures_on_the_checkpoint(monitored_run, image_folder, tmp_path):
    """The monitor (in the training process) and the evaluation tool (from the saved file) agree."""
    from tools.evaluate import main as evaluate
    run = monitored_run[0]
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    knn = [r for r in records if "knn_top1" in r]
    steps_per_epoch = max(r["step"] for r in records) // 2
    assert [(r["epoch"], r["step"]) for r in knn] == [(0, steps_per_epoch), (1, 2 * steps_per_epoch)]
    assert evaluate(["--mode", "knn", "--checkpoint", str(run / "checkpoint.pth"), "--data", str(image_folder),
                     "--val-data", str(image_folder), "--workers", "0", "--device", "cpu",
                     "--json", str(tmp_path / "eval.json")]) == 0
    measured = json.loads((tmp_path / "eval.json").read_text())
    assert (knn[-1]["knn_top1"], knn[-1]["knn_top5"]) == pytest.approx((measured["top1"], measured["top5"]), abs=1e-3)


def test_checkpoint_every_saves_inside_an_epoch_too(monitored_run):
    assert monitored_run[1] == [2, 3, 4, 6]  # every 2 steps, and at each epoch end (once at step 6); 3 steps per epoch


def test_knn_every_without_knn_val_warns_and_trains(image_folder, tmp_path, capsys, monkeypatch):
    import bt_fast.progress
    import bt_fast.trainer
    bars = []

    def recorded(*args, **kwargs):
        bars.append(bt_fast.progress.progress(*args, **kwargs))
        return bars[-1]
    monkeypatch.setattr(bt_fast.trainer, "progress", recorded)
    train(tiny_config(image_folder, tmp_path, "knn_every=1", "max_steps=4"))  # 3 steps per epoch
    assert "k-NN monitor off" in capsys.readouterr().err
    assert bars[0].postfix.startswith("epoch=2/2,")  # counted as the k-NN lines count them, from 1 (it said 1)


def test_a_checkpoint_is_written_while_training_goes_on_and_holds_its_own_step(image_folder, tmp_path,
                                                                              monkeypatch):
    """The end-of-epoch checkpoint goes to disk on a thread of its own: here its write waits until the next
    epoch has trained two steps, which a save in the training thread could never see, and what it writes is
    still the state at its own step."""
    import threading
    import bt_fast.checkpoint
    from bt_fast.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME
    two_steps_later, at_step_3 = threading.Event(), {}
    real_save, real_step = bt_fast.checkpoint.atomic_save, Trainer.train_step

    def slow_save(obj, path, **options):
        if obj["step"] == 3:  # the end of epoch 1: 3 steps an epoch
            assert two_steps_later.wait(timeout=60), "training waited for the checkpoint to be written"
        real_save(obj, path, **options)

    def step(self, y1, y2):
        if self.step == 3:  # the state that step 3 left
            at_step_3.update({key: value.clone() for key, value in self.model.state_dict().items()})
        loss = real_step(self, y1, y2)
        if self.step == 4:  # step 5 issued
            two_steps_later.set()
        return loss
    monkeypatch.setattr(bt_fast.checkpoint, "atomic_save", slow_save)
    monkeypatch.setattr(Trainer, "train_step", step)
    train(tiny_config(image_folder, tmp_path, "epochs=2"))
    previous = torch.load(tmp_path / PREVIOUS_NAME, weights_only=True)
    assert previous["step"] == 3 and previous["model"].keys() == at_step_3.keys()
    assert all(torch.equal(previous["model"][key], value) for key, value in at_step_3.items())
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 6


def test_a_dali_run_stopped_mid_epoch_resumes_from_its_graph_state_without_reading_the_batches_before(
        image_folder, tmp_path, monkeypatch):
    """A stop after step 4 (epoch 1, batch 1 of 3) keeps the DALI graph's state in the checkpoint, and the
    resumed run's graph starts from it: the files of the epoch's batch 0 are damaged before the resume
    (a replay would stop on them), and steps 5 and 6 have the losses of an uninterrupted run."""
    import itertools
    import signal

    from bt_fast.checkpoint import CHECKPOINT_NAME
    from bt_fast.run_control import STOP_SIGNALS, StopAgreement
    from pipelines.base import Placement
    from pipelines.dali import DALIPipeline

    data = shutil.copytree(image_folder, tmp_path / "images")
    extra = ("pipeline=dali", "log_every=1")
    train(tiny_config(data, tmp_path / "straight", *extra))
    straight = [json.loads(line)["loss"] for line in open(tmp_path / "straight" / "metrics.jsonl")]

    polls, real_poll = itertools.count(1), StopAgreement.poll
    with monkeypatch.context() as patch:  # SIGTERM seen after step 4, as the stop agreement reports it
        patch.setattr(StopAgreement, "poll", lambda self, code: STOP_SIGNALS[signal.SIGTERM] if next(polls) == 4
                      else real_poll(self, code))
        assert train(tiny_config(data, tmp_path / "split", *extra))["stopped_by"] == "SIGTERM"
    saved = torch.load(tmp_path / "split" / CHECKPOINT_NAME, weights_only=True)
    (position,) = saved["pipeline_positions"]
    assert saved["step"] == 4 and (position["epoch"], position["batch"]) == (1, 1)

    config = tiny_config(data, tmp_path / "unused", *extra)
    epoch_1 = DALIPipeline(config, Placement(torch.device("cpu")), config.batch_size)
    epoch_1.set_epoch(1)
    for path in epoch_1.plan().files[:config.batch_size]:
        Path(path).write_bytes(b"\xff\xd8 not a JPEG any more")
    train(tiny_config(data, tmp_path / "split", *extra))
    split = [json.loads(line)["loss"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert len(straight) == len(split) == 6
    assert split[4:] == pytest.approx(straight[4:], rel=1e-5)


def test_torchs_no_cuda_runtime_warning_stays_out_of_a_runs_lines(image_folder, tmp_path, monkeypatch):
    """compile_optimizer on the CPU imports torch's C++-extension helper, which warns on a machine with a CUDA
    toolkit and no CUDA runtime ("No CUDA runtime is found, using CUDA_HOME=..."): no finding of the run's."""
    import logging

    import bt_fast.train
    logger, emitted = logging.getLogger("torch.utils.cpp_extension"), []
    handler = logging.Handler()
    handler.emit = emitted.append

    def warned(config):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")  # as torch's import does
        raise KeyboardInterrupt

    monkeypatch.setattr(bt_fast.train, "train", warned)
    level = logger.level
    logger.addHandler(handler)
    try:
        with pytest.raises(SystemExit):
            bt_fast.train.main(["--config", "configs/demo_cpu.yaml", f"data={image_folder}", f"out_dir={tmp_path}"])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert emitted == []

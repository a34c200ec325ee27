"""Multi-process training on the CPU (gloo): exact distributed semantics, the launcher, and faults.

Tiny everything (resnet18, 32 px, projector 64-64, global batch 8, no loader workers) so the
file runs in a few minutes on two cores.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bt_fast.checkpoint import CHECKPOINT_NAME, atomic_save, remove_stale_checkpoint_temporaries
from bt_fast.config import load_config
from bt_fast.distributed import DistContext, init_distributed, shutdown_distributed
from bt_fast.errors import LAUNCHER_ENV, cli_errors, mark_rank_0
from bt_fast.schedule import learning_rate
from bt_fast.step_health import TrainingError
from bt_fast.train import train
from bt_fast.trainer import Trainer
from conftest import free_ports, spawn_pinned
from pipelines import build_pipeline
from pipelines.base import Placement

REPO = Path(__file__).resolve().parents[1]
# The demo config with the paper's learning rates and a tiny model, on the reference pipeline.
TINY = ["pipeline=reference", "knn_every=0", "lr_weights=0.2", "lr_biases=0.0048", "batch_size=8",
        "augment.image_size=32", "projector=64-64", "workers=0", "arch=resnet18", "amp=none",
        "device=cpu"]
CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_config(data, out_dir, *extra):
    return load_config(REPO / "configs/demo_cpu.yaml",
                       [f"data={data}", f"out_dir={out_dir}", *TINY, "epochs=2", "warmup_epochs=0", *extra])


def join_group(rank: int, world: int, port: int) -> DistContext:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return init_distributed("cpu")


def fixed_batch(batch: int = 8):
    g = torch.Generator().manual_seed(7)
    views = [torch.randn(batch, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
             for _ in range(2)]
    return views[0], views[1]


def one_step(trainer: Trainer, y1: torch.Tensor, y2: torch.Tensor) -> dict:
    loss = trainer.train_step(y1, y2).item()
    return {"loss": loss,
            "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()},
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "buffers": {n: b.clone() for n, b in trainer.model.named_buffers() if b.is_floating_point()}}


def step_then_signal(signum: int, at_step: int):
    """`Trainer.train_step` that sends this process `signum` inside the step taken at `self.step == at_step`."""
    real_step = Trainer.train_step

    def step(self, y1, y2):
        loss = real_step(self, y1, y2)
        if self.step == at_step:
            os.kill(os.getpid(), signum)
        return loss
    return step


def _two_rank_worker(rank: int, world: int, ports: list[int], data: str, out_dir: str) -> None:
    """Both two-rank checks in one pair of processes (each pays torch's import once): one step on this
    rank's half of `fixed_batch`, then a 5-step run in which only rank 1 is signalled."""
    ctx = join_group(rank, world, ports[0])
    try:
        trainer = Trainer(tiny_config(data, Path(out_dir) / "step"), ctx)
        y1, y2 = fixed_batch()
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        torch.save(one_step(trainer, y1[rows], y2[rows]), Path(out_dir) / f"step{rank}.pt")
    finally:
        shutdown_distributed()
    os.environ["MASTER_PORT"] = str(ports[1])
    if rank == 1:  # only rank 1 is told to stop, in the middle of its second step
        Trainer.train_step = step_then_signal(signal.SIGTERM, at_step=1)
    summary = train(tiny_config(data, Path(out_dir) / "signal", "max_steps=5", "log_every=1"))
    torch.save({"steps": summary["steps"], "stopped_by": summary["stopped_by"]}, Path(out_dir) / f"signal{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(image_folder, module_tmp) -> Path:
    """The directory where `_two_rank_worker`'s two ranks left their results."""
    out_dir = module_tmp("two_ranks")
    spawn_pinned(_two_rank_worker, args=(2, free_ports(2), str(image_folder), str(out_dir)), nprocs=2)
    return out_dir


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def max_relative_diff(a: dict, b: dict) -> float:
    """Worst tensor's max |a - b| over its own max |b|: float32 sums in another order differ by ~1e-6 of that."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() / b[k].abs().max().clamp_min(1e-12).item()
               for k in a)


@pytest.mark.timeout(600)  # (the first of the two also starts the ranks)
def test_two_ranks_with_half_batches_match_one_process_with_the_whole_batch(two_ranks, image_folder, tmp_path):
    """DDP + synchronised BatchNorm + the global loss == plain BatchNorm on one process, after one real step."""
    single = Trainer(tiny_config(image_folder, tmp_path), CPU)
    assert not any("Sync" in type(m).__name__ or "AllReduce" in type(m).__name__ for m in single.model.modules())
    expected = one_step(single, *fixed_batch())
    assert single.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 8 / 256)  # lr from the global batch

    ranks = [torch.load(two_ranks / f"step{r}.pt", weights_only=True) for r in range(2)]
    scale = max(g.abs().max().item() for g in expected["grads"].values())
    for got in ranks:
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        grad_diff, grad_rel = max_abs_diff(got["grads"], expected["grads"]), max_relative_diff(got["grads"], expected["grads"])
        param_diff = max_abs_diff(got["params"], expected["params"])
        buffer_diff = max_abs_diff(got["buffers"], expected["buffers"])
        print(f"loss {got['loss']:.6f} vs {expected['loss']:.6f} (|diff| {abs(got['loss'] - expected['loss']):.1e}); "
              f"gradients: max |diff| {grad_diff:.2e} (largest |grad| {scale:.2e}), worst tensor's |diff| / max|grad| "
              f"{grad_rel:.2e}; parameters after the LARS step: max |diff| {param_diff:.2e}; "
              f"BN running statistics: max |diff| {buffer_diff:.2e}")
        assert grad_rel <= 1e-5
        assert param_diff <= 1e-5
        assert buffer_diff <= 1e-5
    assert max_abs_diff(ranks[0]["params"], ranks[1]["params"]) == 0  # the replicas stay identical


@pytest.mark.timeout(600)  # (the first of the two also starts the ranks)
def test_a_signal_on_one_rank_stops_all_ranks_at_the_same_step_with_a_checkpoint(two_ranks):
    """The request made in step 2 on rank 1 is agreed without blocking (bt_fast.run_control.StopAgreement):
    every rank learns it one step later and stops after step 3."""
    run = two_ranks / "signal"
    for rank in range(2):
        assert torch.load(two_ranks / f"signal{rank}.pt") == {"steps": 3, "stopped_by": "SIGTERM"}
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["step"] == 3
    assert not (run / "backbone.pth").exists()  # an interrupted run has no final backbone


def test_each_image_goes_to_exactly_one_rank_per_epoch(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path)
    world = 4
    pipelines = [build_pipeline(config, Placement(torch.device("cpu"), torch.float32, rank, world), 8 // world)
                 for rank in range(world)]
    assert len({len(p) for p in pipelines}) == 1  # same number of steps on every rank: no collective waits forever
    for epoch in (0, 1):
        shards = []
        for p in pipelines:
            p.set_epoch(epoch)
            shards.append([index for _, index in p.sampler])
        seen = [i for shard in shards for i in shard]
        assert len(seen) == len(set(seen)) == 24  # disjoint, and 24 images / 4 ranks leave none out
    assert shards != [sorted(s) for s in shards]  # shuffled


# -- the launcher ---------------------------------------------------------------------------------------

def launcher_env(**settings) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_RANK"))}
    env.update(PYTHON=sys.executable, CONFIG="configs/demo_cpu.yaml", **{k: str(v) for k, v in settings.items()})
    return env


def launch(args, **settings) -> subprocess.Popen:
    return subprocess.Popen(["bash", "run_pretrain.sh", *args], cwd=REPO, env=launcher_env(**settings),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and everything it started (torchrun puts workers in sessions of their own)."""
    for pid in [proc.pid, *process_tree(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"launcher did not finish in {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"run ended early ({proc.returncode}):\n{proc.communicate(timeout=30)[1][-3000:]}")
        if time.monotonic() > end:
            kill_tree(proc)
            pytest.fail(f"condition not reached in {timeout} s")
        time.sleep(0.2)


def test_two_simulated_nodes_of_two_ranks_train_and_rank_0_writes_one_checkpoint(image_folder, tmp_path):
    """Two torchruns (nodes) of two workers each: on node 1 local rank 0 is global rank 2, which must
    not write; one `done:` line, one set of run files, every step logged once. Rank 0's k-NN monitor runs
    after the last step while the other ranks wait for it on the host's group."""
    run, temporary = tmp_path / "run", tmp_path / "tmp"
    temporary.mkdir()
    with_knn = [setting for setting in TINY if not setting.startswith("knn_every=")]
    with_knn += ["knn_every=1", f"knn_val={image_folder}"]
    code, out, err = finish(launch(["max_steps=2", *with_knn], LOCAL_NODES=1, NODES=2, GPUS=2, DATA=image_folder,
                                   OUT=run, TMPDIR=temporary))
    assert code == 0, err[-3000:]
    assert list(temporary.iterdir()) == []  # torchrun's own would leave a torchelastic_* directory per node
    done = [line for line in out.splitlines() if line.startswith("done:")]
    assert done == [done[0]] and "done: 2 steps on 4 process(es)" in done[0]
    assert sorted(p.name for p in run.iterdir()) == sorted(["backbone.pth", CHECKPOINT_NAME, "config.yaml", "metrics.jsonl",
                                                             "metrics.png", "summary.json"])
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    assert [(m["step"], "knn_top1" in m) for m in metrics(run)] == [(1, False), (2, False), (2, True)]


def process_tree(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def test_a_killed_worker_is_restarted_from_the_last_checkpoint_and_sigterm_to_the_launcher_checkpoints(
        image_folder, tmp_path):
    """One launcher run for both faults. Rank 1 is SIGKILLed inside step 5 (epoch 2; tests/kill_point);
    torchrun restarts both workers, which resume at the epoch-1 checkpoint (step 3) and redo step 4
    exactly. Once the restarted run has logged step 6, SIGTERM to the launcher ends it with a
    checkpoint of its last logged step and no temporary file."""
    run = tmp_path / "run"  # 24 images / batch 8: 3 steps per epoch
    epochs = 50  # more than the test waits for: only the SIGTERM ends the run
    proc = launch(["log_every=1", *TINY, f"epochs={epochs}", "warmup_epochs=1"], LOCAL_NODES=1, NODES=1, GPUS=2,
                  MAX_RESTARTS=1, DATA=image_folder, OUT=run, BT_KILL_AT_LOSS=5, BT_KILL_RANK=1,
                  PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "kill_point"), str(REPO)]))
    # the first attempt logs steps 1..4 at most; 6 lines exist only once the restarted workers trained
    wait_for(lambda: len(metrics(run)) >= 6, proc, timeout=240)
    os.kill(proc.pid, signal.SIGTERM)
    code, out, err = finish(proc, timeout=120)
    assert "kill_point: SIGKILL inside step 5" in err
    # one node: rank 0's line is the only report, and torchrun's narration of the stop is left out
    stops = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert len(stops) == 1 and stops[0].startswith("stopped by SIGTERM after step"), out + err[-3000:]
    assert "death signal" not in err and "closing signal" not in err
    after = metrics(run)
    last = after[-1]["step"]
    assert last >= 6 and [m["step"] for m in after] == list(range(1, last + 1))  # lost steps redone, not counted twice
    assert after[3]["lr_weights"] == pytest.approx(0.2 * learning_rate(3, 3, epochs, 8, 1))
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["step"] == last
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_ctrl_c_stops_every_rank_of_two_simulated_nodes_by_sigint_and_the_command_waits_for_them(
        image_folder, tmp_path):
    """A terminal's Ctrl-C signals its whole foreground process group. Each node's torchrun must get it
    once: a second signal cuts torchrun's graceful stop short and it sends its workers SIGTERM on top.
    The command returns only once every node has stopped, so nothing prints after it."""
    run = tmp_path / "run"
    proc = launch(["log_every=1", *TINY, "epochs=50", "warmup_epochs=1"], LOCAL_NODES=1, NODES=2, GPUS=1,
                  DATA=image_folder, OUT=run)
    wait_for(lambda: len(metrics(run)) >= 2, proc, timeout=240)
    started = process_tree(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # the launcher's session: what the terminal's group holds
    code, out, err = finish(proc, timeout=120)
    assert code == 130, err[-3000:]
    assert not [pid for pid in started if running(pid)]
    assert "stopped by SIGINT after step" in out and "SIGTERM" not in out + err, out + err[-3000:]
    # rank 0's lines alone: each node's launcher added its own copy, as if rank 0 printed on another machine
    stops = [line for line in out.splitlines() if line.startswith(("stopped by", "checkpoint:"))]
    assert len(stops) == 2 and stops[0].startswith("stopped by SIGINT after step"), out
    assert "death signal" not in err and "closing signal" not in err
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["step"] == metrics(run)[-1]["step"]


def test_the_launcher_under_nohup_outlives_its_terminal_and_sigquit_ends_it_in_one_line(image_folder, tmp_path):
    """A closed terminal's SIGHUP reaches the launcher's process group. Under nohup torchrun would catch it all
    the same and stop the ranks, where a single process goes on. SIGQUIT, which the ranks do not turn into a
    stop with a checkpoint, used to end the launch silently with exit 0 once an epoch's checkpoint existed."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "tools.launch", "--nproc-per-node", "1",
               "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "-m", "bt_fast.train",
               "--config", "configs/demo_cpu.yaml", f"data={image_folder}", f"out_dir={run}", "log_every=1", *TINY,
               "epochs=50", "warmup_epochs=1"]
    proc = subprocess.Popen(command, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup starts it
    wait_for(lambda: len(metrics(run)) >= 4, proc, timeout=240)  # past the first epoch's checkpoint (3 steps)
    os.killpg(proc.pid, signal.SIGHUP)
    hung_up = len(metrics(run))
    wait_for(lambda: len(metrics(run)) >= hung_up + 2, proc)
    os.killpg(proc.pid, signal.SIGQUIT)
    code, out, err = finish(proc, timeout=120)
    assert code == 128 + signal.SIGQUIT, out + err[-3000:]
    assert err.strip().splitlines()[-1] == (f"error: stopped by SIGQUIT: the ranks quit without writing a checkpoint; "
                                            f"the command resumes from {run / CHECKPOINT_NAME}")
    assert "SIGHUP" not in out + err


@pytest.mark.parametrize("gpus", ["", "4"])
def test_several_nodes_without_a_rendezvous_print_the_command_for_each_node(gpus, tmp_path):
    """GPUS only where it was given: this machine's count (1 on a CPU-only one) was printed for every node, which
    then started that many ranks whatever its own GPUs."""
    code, out, err = finish(launch(["max_steps=2"], NODES=2, GPUS=gpus, DATA=tmp_path))
    assert code == 2
    assert "MASTER_ADDR" in err.splitlines()[0]
    for node in range(2):
        [line] = [line for line in err.splitlines() if line.strip().startswith(f"node {node}:")]
        assert f"NODE_RANK={node}" in line and "NODES=2" in line
        assert line.rstrip().endswith("bash run_pretrain.sh max_steps=2")
        assert (f" GPUS={gpus} " in line) if gpus else (" GPUS=" not in line), line


@pytest.mark.parametrize("settings, message", [
    ({"LOCAL_NODES": "yes"}, "LOCAL_NODES=yes must be 0 or 1 (1: simulate NODES nodes on this machine)"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc", "NODE_RANK": "0"},
     "MASTER_PORT=abc must be a port number, 1..65535"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999", "NODE_RANK": "0"},
     "MASTER_PORT=99999 must be a port number, 1..65535"),
    # .invalid never resolves (RFC 2606)
    ({"MASTER_ADDR": "nonexistent.invalid", "MASTER_PORT": "29544", "NODE_RANK": "1"},
     "MASTER_ADDR=nonexistent.invalid does not resolve on this host; give the host name or address of node 0"),
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "BUSY", "NODE_RANK": "0"},
     "MASTER_PORT=BUSY is already in use on this host; choose another port"),
    ({"LOCAL_NODES": "1", "MASTER_PORT": "BUSY"}, "MASTER_PORT=BUSY is already in use on this host; choose another port"),
])
def test_a_rendezvous_that_cannot_work_is_one_line_before_torchrun(settings, message, image_folder, tmp_path):
    """torchrun retried an unresolvable MASTER_ADDR for minutes and ended each of these in a traceback."""
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        settings = {key: port if value == "BUSY" else value for key, value in settings.items()}
        code, out, err = finish(launch(["max_steps=2"], NODES=2, GPUS=1, DATA=image_folder, OUT=tmp_path / "run",
                                       **settings), timeout=60)
    assert code == 2 and err.strip().splitlines() == [f"error: {message.replace('BUSY', port)}"], err[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["no images, every rank at its start", "a corrupt image, one rank mid-epoch"])
def test_a_ranks_input_error_is_one_line_and_no_restart(case, image_folder, tmp_path):
    """Bad input fails every restart the same way: torchrun's restarts printed it once per rank and attempt
    (8 lines for 2 ranks and MAX_RESTARTS=3), and the rank whose peer had failed added a gloo traceback."""
    import shutil
    data = tmp_path / "data"
    if case.startswith("no images"):
        (data / "class0").mkdir(parents=True)
        message = f"data directory {data} holds no images in class sub-directories (expected {data}/<class>/<image>.jpg)"
    else:
        shutil.copytree(image_folder, data)
        corrupt = sorted((data / "class1").iterdir())[2]
        corrupt.write_bytes(b"not a jpeg")
        message = (f"cannot read image {corrupt}: not a recognised image file; remove or replace the file "
                   f"(tools.convert's report lists every unreadable image of a folder)")
    code, out, err = finish(launch(["max_steps=6", *TINY], GPUS=2, DATA=data, OUT=tmp_path / "run"))
    assert code == 2 and err.strip().splitlines() == [f"error: {message}"], err[-3000:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("damaged_node", [1, 0])
def test_an_input_error_on_one_node_stops_the_other_node_started_by_hand(damaged_node, image_folder, tmp_path):
    """Two nodes started as a user starts them without SLURM, each with its own copy of the data, one damaged.
    That node's launcher stops for the input error. The other node's rank, if it meets the lost peer before its
    launcher stops it, says so in one line (no traceback from inside gloo). Node 1 failing: node 0's torchrun
    would restart its ranks and wait in the rendezvous for node 1 until the join timeout (600 s); node 1 closes
    the rendezvous, as torchrun does for a node that fails for good, so node 0 ends at once. Node 0 failing takes
    the rendezvous's store with it: node 1 says it cannot reach it, without torch's C++ warnings and their stack
    dumps about each failed call to it."""
    import shutil
    clean, damaged = shutil.copytree(image_folder, tmp_path / "clean"), shutil.copytree(image_folder, tmp_path / "damaged")
    broken = sorted(damaged.glob("*/*.jpg"))  # every image: the rank fails on its first, whichever its rank
    for path in broken:
        path.write_bytes(b"not a jpeg")
    port, = free_ports(1)
    nodes = [launch(["max_steps=6", *TINY], NODES=2, GPUS=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=node,
                    DATA=damaged if node == damaged_node else clean, OUT=tmp_path / "run") for node in range(2)]
    results = [finish(node, timeout=120) for node in nodes]
    code, _, err = results[damaged_node]
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-3000:]
    assert any(err.strip() == f"error: cannot read image {path}: not a recognised image file; remove or replace the "
                              f"file (tools.convert's report lists every unreadable image of a folder)"
               for path in broken), err[-3000:]
    other = 1 - damaged_node
    code, _, err = results[other]
    assert "Traceback" not in err and "Exception raised from" not in err, err[-3000:]
    lines = err.strip().splitlines()
    if damaged_node == 1:
        assert any(line.startswith("error: rank 0 lost another rank (Connection ") for line in lines), err
        assert code == 2 and lines[-1] == \
            "error: another node stopped the run (its launcher says why), so this node stops too", err
    else:  # node 1's launcher may lose the store and stop its rank before the rank's collective fails
        assert code == 1 and lines[-1].startswith(f"error: cannot reach the rendezvous at 127.0.0.1:{port} ("), err


def test_under_slurm_one_torchrun_per_node_meets_at_the_first_host(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/srun_args\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    slurm = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=4242, SLURM_NNODES=2,
                 SLURM_JOB_NODELIST="gpu[07-08]", SLURM_CPUS_ON_NODE=32, GPUS=8)
    code, out, err = finish(launch(["epochs=1"], **slurm))
    assert code == 0, err
    argv = (tmp_path / "srun_args").read_text().split("\n")
    joined = " ".join(argv)
    assert joined.startswith("--nodes 2 --ntasks 2 --ntasks-per-node 1 --cpus-per-task 32 --kill-on-bad-exit=1 ")
    for expected in ("--nnodes 2", "--rdzv-backend c10d", f"--rdzv-endpoint gpu07:{29500 + 4242}", "--rdzv-id 4242",
                     "--nproc-per-node 8", "--max-restarts 3", "SIGUSR1", "-m bt_fast.train --config"):
        assert expected in joined
    assert argv[-2] == "epochs=1"

    code, out, err = finish(launch(["epochs=1"], **slurm, NODES=3))
    assert code == 2 and "NODES=3 but SLURM job 4242 has 2 nodes" in err


# -- faults inside one process --------------------------------------------------------------------------

def test_sigusr1_checkpoints_and_requeues_the_slurm_job(image_folder, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/requeued\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setattr(Trainer, "train_step", step_then_signal(signal.SIGUSR1, at_step=0))
    summary = train(tiny_config(image_folder, tmp_path / "run", "max_steps=4"))
    assert (summary["steps"], summary["stopped_by"]) == (1, "SIGUSR1")
    assert torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)["step"] == 1
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "777"]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers are put back


def test_non_finite_loss_stops_with_a_diagnostic_and_keeps_the_last_checkpoint(image_folder, tmp_path):
    trainer = Trainer(tiny_config(image_folder, tmp_path, "max_steps=3"), CPU)
    with torch.no_grad():
        trainer.model.projector[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"loss is nan at step 1 \(epoch 0\).*non-finite inputs: none; "
                                            r"non-finite gradients: \d+ tensors.*non-finite parameters after the "
                                            r"update: \d+ tensors"):
        trainer.fit()
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_many_consecutive_float16_skips_stop_the_run(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr("bt_fast.step_health.MAX_SKIPPED_STEPS", 2)
    # log_every=1: the streak is read at every step's settle, so the run stops at the third skip
    trainer = Trainer(tiny_config(image_folder, tmp_path, "max_steps=5", "amp=float16", "log_every=1"), CPU)
    assert trainer.scaler.is_enabled()
    with torch.no_grad():
        trainer.model.projector[0].weight[0, 0] = float("inf")
    with pytest.raises(TrainingError, match="3 steps in a row up to step 3 .* were skipped by the float16 GradScaler"):
        trainer.fit()
    assert torch.isfinite(trainer.model.backbone.conv1.weight).all()  # skipped steps did not touch the weights


_WRITER = """
import sys, torch
from pathlib import Path
from bt_fast.checkpoint import atomic_save
i = 0
while True:
    i += 1
    atomic_save({"version": i, "data": torch.full((4_000_000,), float(i))}, Path(sys.argv[1]))
"""


def test_kill_9_during_checkpoint_writes_never_leaves_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    for delay in (0.05, 0.3):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=REPO)
        end = time.monotonic() + 60
        while not path.exists() and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(delay)
        writer.kill()
        writer.wait()
        state = torch.load(path, weights_only=True)  # complete: it unpickles, and all of it is one version
        assert state["data"].numel() == 4_000_000 and (state["data"] == state["version"]).all()
    remove_stale_checkpoint_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_temporary_names_differ_between_writers(tmp_path, monkeypatch):
    written = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (written.append(Path(src).name), real_replace(src, dst)))
    atomic_save({"a": 1}, tmp_path / CHECKPOINT_NAME)
    atomic_save({"a": 2}, tmp_path / CHECKPOINT_NAME)
    assert len(set(written)) == 2 and all(socket.gethostname() in name for name in written)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
@pytest.mark.parametrize("lost_a_peer", [False, True])
def test_a_stop_before_the_launchs_first_checkpoint_is_the_signals_exit_status_and_one_line(sig, lost_a_peer, tmp_path,
                                                                                            monkeypatch, capsys):
    """A scheduler's stop while the ranks had not yet written a checkpoint (a first-use conversion, say, whose
    rank exits 128 + the signal): the launcher too, a failure to the scheduler, not 0 as after a checkpoint. Where
    its rank had lost another rank and said so, the stop is that failure's consequence (run_pretrain.sh stops the
    simulated nodes left when one fails): its line, "stopped by SIGTERM", named a signal the user never sent."""
    import argparse
    import tools.launch as launch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def stopped(options):
        if lost_a_peer:  # as the rank's process, whose parent is this launcher
            monkeypatch.setenv(LAUNCHER_ENV, f"{os.getpid()}:{tmp_path}")
            monkeypatch.setattr(os, "getppid", os.getpid)
            with pytest.raises(SystemExit), cli_errors(launched_rank=True):
                raise RuntimeError("[../gloo/transport/tcp/pair.cc:538] Connection closed by peer [127.0.0.1]:4321")
        raise SignalException(f"Process {os.getpid()} got signal: {sig}", sigval=sig)
    monkeypatch.setattr(launch.torchrun, "run", stopped)
    options = argparse.Namespace(nnodes="1")
    code = launch._run(options, tmp_path / CHECKPOINT_NAME, time.time(), tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert code == 128 + sig and err[lost_a_peer:] == ([] if lost_a_peer else [
        f"error: stopped by {signal.Signals(sig).name} before this launch wrote a checkpoint; training resumes from "
        f"the start"])
    assert not lost_a_peer or err[0].startswith("error: rank 0 lost another rank (")


@pytest.mark.parametrize("endpoint, rank_0_here, says", [
    ("node0.example:29500", True, False),  # node 0: rank 0 said it here
    ("node0.example:29500", False, True),  # another node: rank 0 printed on node 0's machine
    ("127.0.0.1:29500", False, False),  # every node on this machine (run_pretrain.sh LOCAL_NODES=1): one output
])
def test_a_node_launcher_says_where_the_checkpoint_is_only_where_rank_0_did_not(endpoint, rank_0_here, says, tmp_path,
                                                                             monkeypatch, capsys):
    """Each node's launcher repeated rank 0's "stopped by ... / checkpoint: ..." lines: twice on node 0, and once
    per simulated node besides rank 0's on the one terminal they share. Rank 0, a child of its node's launcher,
    marks the launcher's directory (`mark_rank_0`)."""
    import argparse
    import tools.launch as launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    checkpoint, launcher_dir = tmp_path / CHECKPOINT_NAME, tmp_path / "launcher"
    launcher_dir.mkdir()

    def stopped(options):
        if rank_0_here:  # as the rank's process, whose parent is this launcher
            monkeypatch.setenv(LAUNCHER_ENV, f"{os.getpid()}:{launcher_dir}")
            monkeypatch.setattr(os, "getppid", os.getpid)
            mark_rank_0()
        atomic_save({"step": 3}, checkpoint)
        raise SignalException(f"Process {os.getpid()} got signal: {signal.SIGINT}", sigval=signal.SIGINT)
    monkeypatch.setattr(launch.torchrun, "run", stopped)
    options = argparse.Namespace(nnodes="2", rdzv_endpoint=endpoint)
    assert launch._run(options, checkpoint, time.time() - 1, launcher_dir) == 130
    assert capsys.readouterr().out == (
        f"stopped by SIGINT\ncheckpoint: {checkpoint} (run the same command again to resume)\n" if says else "")
    assert launch.ranks_input_errors(launcher_dir) == []  # the mark is no rank's input error


def test_nodes_that_never_all_gather_and_a_ctrl_c_while_they_gather_are_one_line_each(tmp_path, monkeypatch, capsys):
    """torchrun's rendezvous gives up (its join timeout: node 1 was never started), or Ctrl-C arrives before
    torchrun handles the signals: one line each, not torch's traceback."""
    import argparse
    import tools.launch as launch
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    options = argparse.Namespace(nnodes="2", rdzv_endpoint="127.0.0.1:29500")
    for raised, code, line in [
            (RendezvousTimeoutError(), 1, "error: not all 2 nodes joined the rendezvous at 127.0.0.1:29500 in time; "
                                          "start each of the others with its NODE_RANK and the same MASTER_ADDR and "
                                          "MASTER_PORT (make pretrain NODES= prints their commands)"),
            (KeyboardInterrupt(), 130, "error: interrupted while the nodes gathered; nothing was trained by this "
                                       "launch")]:
        def gather(options, raised=raised):
            raise raised
        monkeypatch.setattr(launch.torchrun, "run", gather)
        assert launch._run(options, tmp_path / CHECKPOINT_NAME, time.time(), tmp_path) == code
        assert capsys.readouterr().err.splitlines() == [line]


def test_the_launcher_gives_torchrun_its_environment_where_the_user_set_none(image_folder, tmp_path, monkeypatch,
                                                                            caplog):
    """`python -m tools.launch` by hand had only torchrun's environment: restarts that read the previous attempt's
    rendezvous addresses, 30 s for the ranks' checkpoint on a stop, and torchrun's four-line OMP_NUM_THREADS banner
    with two ranks per node. run_pretrain.sh had set these itself. A value the user set stays."""
    import tools.launch as launch
    seen = {}

    def run(options):  # where torchrun reads the environment: the banner, and the shutdown timeout
        seen["config"], _, _ = launch.torchrun.config_from_args(options)
        seen["env"] = {name: os.environ.get(name) for name in
                       ("OMP_NUM_THREADS", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
    monkeypatch.setattr(launch.torchrun, "run", run)
    monkeypatch.setenv(LAUNCHER_ENV, "")  # main sets it for its ranks: gone again after the test
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")
    assert launch.main(["--nproc-per-node", "2", "-m", "bt_fast.train", *TINY, f"data={image_folder}",
                        f"out_dir={tmp_path}"]) == 0
    assert seen["env"] == {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "45"}
    assert seen["config"].shutdown_timeout == 45 and "OMP_NUM_THREADS" not in caplog.text

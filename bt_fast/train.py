"""Barlow Twins pretraining.

    python -m bt_fast.train --config configs/demo_cpu.yaml data=data/demo/train key=value ...

One process per device; under torchrun the global batch is split evenly across ranks.
Resumes automatically from `<out_dir>/checkpoint.pth` (written every epoch, at the end, and on
SIGTERM / SIGUSR1 at the next step boundary; SIGUSR1 also requeues the SLURM job). Rank 0 also
writes metrics.jsonl, config.yaml, metrics.png, summary.json and optionally TensorBoard events
there (`bt_fast.run_log`).

A non-finite loss stops the run with a diagnostic. Under float16 the GradScaler skips steps
whose gradients overflow; that is normal, but more than MAX_SKIPPED_STEPS in a row is not
(the scale has fallen by 2**MAX_SKIPPED_STEPS, so the overflow is not a scaling problem) and
stops the run too. Every rank takes these decisions together, from one all-reduce per step.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bt_fast.checkpoint import (BACKBONE_NAME, CHECKPOINT_NAME, CheckpointError, atomic_save, load_checkpoint,
                                remove_stale_checkpoint_temporaries, restore_model, rng_state, set_rng_state)
from bt_fast.config import Config, ConfigError, load_config
from bt_fast.errors import UserError, cli_errors, print_error
from bt_fast.files import ensure_writable_directory
from bt_fast.distributed import DistContext, init_distributed, shutdown_distributed, sync_batchnorm
from bt_fast.knn import KnnMonitor
from bt_fast.loss import barlow_twins_loss
from bt_fast.model import BarlowTwins, build_model
from bt_fast.optim import LARS, param_groups
from bt_fast.progress import progress
from bt_fast.run_log import METRICS_NAME, RunLog, read_metrics, tensorboard_writer_class, truncate_metrics
from bt_fast.schedule import learning_rate, set_learning_rates
from pipelines import Placement, build_pipeline


MAX_SKIPPED_STEPS = 20
# Stop requests, agreed across ranks by MAX: SIGUSR1 (requeue) wins over SIGTERM over SIGINT.
STOP_SIGNALS = {signal.SIGINT: 1, signal.SIGTERM: 2, signal.SIGUSR1: 3}
STOP_NAMES = {code: sig.name for sig, code in STOP_SIGNALS.items()}
# A Ctrl-C reaches a worker twice under torchrun (from the terminal, then forwarded by torchrun):
# a repeat this soon is the same request; a later one aborts at once.
REPEATED_SIGINT_S = 2.0


class TrainingError(UserError):
    """The run cannot continue (e.g. a non-finite loss); the message says where and why."""


class StopSignals:
    """While active, SIGINT / SIGTERM / SIGUSR1 only record a request; the loop acts on it at a step
    boundary. A second Ctrl-C (after REPEATED_SIGINT_S) raises KeyboardInterrupt at once."""

    def __init__(self):
        self.code = 0
        self._first_sigint: float | None = None
        self._previous: dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > REPEATED_SIGINT_S:
                raise KeyboardInterrupt
            self._first_sigint = self._first_sigint or now
        self.code = max(self.code, STOP_SIGNALS[signum])

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def amp_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bfloat16 on CPU, float16 (with GradScaler) on CUDA, unless the config says otherwise."""
    if config.amp == "none":
        return None
    if config.amp == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return getattr(torch, config.amp)


class Trainer:
    def __init__(self, config: Config, ctx: DistContext):
        if config.batch_size % ctx.world_size:
            raise ConfigError(f"config key 'batch_size' ({config.batch_size}) must be divisible by the "
                              f"world size ({ctx.world_size})")
        self.config, self.ctx = config, ctx
        self.out_dir = Path(config.out_dir)
        self.local_batch = config.batch_size // ctx.world_size
        self.amp_dtype = amp_dtype(config, ctx.device)
        torch.manual_seed(config.seed)  # same initial weights on every rank
        if ctx.device.type == "cuda":  # GPU only: input shapes fixed per epoch, so the autotuned kernels are reused
            torch.backends.cudnn.benchmark = True

        self.model: BarlowTwins = build_model(config.arch, config.projector, config.channels_last).to(ctx.device)
        self.ddp = None
        if ctx.world_size > 1:
            self.model = sync_batchnorm(self.model, ctx.device)
            # SyncBatchNorm already keeps running statistics identical on all ranks: no buffer broadcast.
            self.ddp = DistributedDataParallel(self.model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                               forward_sync_buffers=False)
        self.network = self.ddp or self.model
        if config.compile_model:
            self.network = torch.compile(self.network)
        self.optimizer = LARS(param_groups(self.model), lr=0, weight_decay=config.weight_decay,
                              weight_decay_filter=True, lars_adaptation_filter=True,
                              compile=config.compile_optimizer)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype == torch.float16)

        placement = Placement(ctx.device, self.amp_dtype or torch.float32, ctx.rank, ctx.world_size)
        self.pipeline = build_pipeline(config, placement, self.local_batch)
        self.steps_per_epoch = len(self.pipeline)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.step = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.stopped_by: str | None = None  # signal name when a signal ended the run early
        self.skipped_in_row = 0
        self.elapsed_before = 0.0  # wall seconds of the segments before a resume
        self.run_log: RunLog | None = None  # rank 0, while fit() runs
        self.knn_monitor = self._knn_monitor()

    def _knn_monitor(self) -> KnnMonitor | None:
        if not self.config.knn_every or not self.ctx.is_main:
            return None
        if not self.config.knn_val:
            print(f"warning: k-NN monitor off: knn_every={self.config.knn_every} needs knn_val=<a labelled "
                  f"validation ImageFolder with the training classes>", file=sys.stderr)
            return None
        return KnnMonitor(self.config.knn_train or self.config.data, self.config.knn_val,
                          self.config.augment.image_size, self.ctx.device, workers=min(self.config.workers, 2),
                          amp_dtype=self.amp_dtype)

    # -- checkpoints ---------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from `<out_dir>/checkpoint.pth` if there is one; the step counter decides everything."""
        path = self.out_dir / CHECKPOINT_NAME
        if self.ctx.is_main:
            for stale in remove_stale_checkpoint_temporaries(self.out_dir):
                print(f"removed {stale}, left by an interrupted checkpoint write", file=sys.stderr)
        if path.is_file():
            self._load(path)
        self._check_ranks_agree_on_step(path)
        if self.ctx.is_main:
            truncate_metrics(self.out_dir, self.step)

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path, self.ctx.device)
        restore_model(self.model, state["model"], path)
        saved_batch = state.get("config", {}).get("batch_size")
        if saved_batch != self.config.batch_size:
            raise CheckpointError(f"checkpoint {path} was written with batch_size {saved_batch}, this run uses "
                                  f"{self.config.batch_size}; use a new out_dir or the same batch size")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.first_loss = state.get("first_loss")
        self.last_loss = state.get("last_loss")
        self.elapsed_before = state.get("elapsed_s") or 0.0  # absent in checkpoints of older versions
        changed = changed_settings(state.get("config", {}), self.config.to_dict())
        if changed and self.ctx.is_main:
            print(f"warning: resuming {path} (step {self.step}) with settings that differ from the run that wrote "
                  f"it: {', '.join(changed)}; use a new out_dir to start afresh", file=sys.stderr)

    def _check_ranks_agree_on_step(self, path: Path) -> None:
        if self.ctx.world_size == 1:
            return
        steps = torch.tensor([self.step, -self.step], device=self.ctx.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise CheckpointError(f"ranks resumed from different steps ({-steps[1].item()} to {steps[0].item()}) of "
                                  f"{path}; out_dir must be on a file system shared by all nodes")

    def save_checkpoint(self) -> None:
        if not self.ctx.is_main:
            return
        if self.run_log is not None:  # every step the checkpoint covers is in the log before it exists
            self.run_log.flush(durable=True)
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), "epoch": self.step // self.steps_per_epoch,
                     "step": self.step, "config": self.config.to_dict(), "rng": rng_state(),
                     "first_loss": self.first_loss, "last_loss": self.last_loss,
                     "elapsed_s": self.run_log.elapsed() if self.run_log else None}, self.out_dir / CHECKPOINT_NAME)

    def save_backbone(self) -> Path:
        path = self.out_dir / BACKBONE_NAME
        if self.ctx.is_main:
            backbone = {k: v.contiguous() for k, v in self.model.backbone.state_dict().items()}
            atomic_save(backbone, path)
        return path

    # -- the hot path --------------------------------------------------------------------------------
    def train_step(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        lr = learning_rate(self.step, self.steps_per_epoch, self.config.epochs, self.config.batch_size,
                           self.config.warmup_epochs)
        set_learning_rates(self.optimizer, lr, self.config.lr_weights, self.config.lr_biases)
        with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            z1, z2 = self.network(y1, y2)
        loss = barlow_twins_loss(z1, z2, self.config.lambd)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def agree(self, loss: torch.Tensor, stop_code: int) -> tuple[float, bool, int]:
        """After a step, with one host sync: the loss, whether any rank failed, the highest stop code.

        Failure is a non-finite loss, or under float16 too many steps in a row skipped by the scaler.
        """
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.skipped_in_row = self.skipped_in_row + 1 if scale < self.last_scale else 0  # only a skip lowers it
            self.last_scale = scale
            failed = loss.new_full((), float(self.skipped_in_row > MAX_SKIPPED_STEPS))
        else:
            failed = (~torch.isfinite(loss)).float()
        status = torch.stack([failed, loss.new_full((), float(stop_code))])
        if self.ctx.world_size > 1:
            dist.all_reduce(status, op=dist.ReduceOp.MAX)
        value, failed_any, stop = torch.cat([loss.float().view(1), status]).tolist()
        return value, failed_any > 0, int(stop)

    def failure(self, loss: float, y1: torch.Tensor, y2: torch.Tensor) -> TrainingError:
        """What went wrong at step `self.step + 1`, in one line."""
        where = f"step {self.step + 1} (epoch {self.step // self.steps_per_epoch})"
        if self.scaler.is_enabled():
            return TrainingError(f"{self.skipped_in_row} steps in a row up to {where} were skipped by the float16 "
                                 f"GradScaler (loss {loss}, scale now {self.last_scale:g}): the overflow does not go "
                                 f"away with scaling; lower lr_weights/lr_biases or use amp=bfloat16 or amp=none")

        def non_finite(named) -> str:
            bad = [name for name, t in named if t is not None and not torch.isfinite(t).all()]
            return f"{len(bad)} tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else "none"
        inputs = [name for name, y in (("view1", y1), ("view2", y2)) if not torch.isfinite(y).all()]
        grads = non_finite((n, p.grad) for n, p in self.model.named_parameters())
        params = non_finite(self.model.named_parameters())
        return TrainingError(f"loss is {loss} at {where}, lr_weights {self.optimizer.param_groups[0]['lr']:.4g}; "
                             f"non-finite inputs: {', '.join(inputs) or 'none'}; non-finite gradients: {grads}; "
                             f"non-finite parameters after the update: {params}; stopped without saving, so "
                             f"{CHECKPOINT_NAME} is the last good state: lower lr_weights/lr_biases or use amp=none")

    def requeue(self) -> None:
        """SIGUSR1 is SLURM's warning before preemption or the time limit: put the job back in the queue."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job or not self.ctx.is_main:
            return
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            ok, detail = result.returncode == 0, result.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            ok, detail = False, str(err)
        print(f"requeued SLURM job {job}" if ok else f"warning: scontrol requeue {job} failed: {detail}; "
              f"resubmit the job to resume", file=sys.stderr)

    def fit(self) -> None:
        """Train up to `total_steps` (or a stop signal); on rank 0, then write the run's summary."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_log = RunLog(self.config, self.step, self.elapsed_before) if self.ctx.is_main else None
        bar = progress(total=self.total_steps, initial=self.step, enabled=self.ctx.is_main, unit="step")
        self.images_seen, self.train_time = 0, 0.0
        self.last_scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        try:
            with StopSignals() as signals:
                self._epochs(signals, self.run_log, bar)
            if self.run_log:
                self.run_log.finish(self.steps_per_epoch, self.total_steps, self.stopped_by, self.ctx.device,
                                    self.ctx.world_size)
        finally:
            bar.close()
            if self.run_log:
                self.run_log.close()
                self.run_log = None

    def _epochs(self, signals: StopSignals, log: RunLog | None, progress) -> None:
        start_epoch, skip = divmod(self.step, self.steps_per_epoch)
        for epoch in range(start_epoch, self.config.epochs):
            if self.step >= self.total_steps:
                return
            self.pipeline.set_epoch(epoch)
            with contextlib.closing(iter(self.pipeline)) as epoch_batches:  # a stop mid-epoch ends its loader now
                if not self._epoch(epoch, itertools.islice(epoch_batches, skip, None), signals, log, progress):
                    return
            skip = 0
            self.save_checkpoint()
            if self.config.knn_every and ((epoch + 1) % self.config.knn_every == 0 or self.step >= self.total_steps):
                self.monitor_knn(epoch, log, progress)
            if log:
                log.epoch_end()

    def _epoch(self, epoch: int, batches, signals: StopSignals, log: RunLog | None, progress) -> bool:
        """Train on `batches` (the rest of `epoch`); False if a stop request ended the run."""
        tick = time.perf_counter()
        for y1, y2 in batches:
            waited = time.perf_counter() - tick
            if log and self.step == 0:
                log.write_views(y1, y2, step=0)
            loss, failed, stop = self.agree(self.train_step(y1, y2), signals.code)  # syncs: the time is real
            if failed:
                raise self.failure(loss, y1, y2)
            self.step += 1
            elapsed = time.perf_counter() - tick
            self.train_time += elapsed
            self.images_seen += self.config.batch_size
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
            if log:
                log.write({"step": self.step, "epoch": epoch, "loss": loss,
                           "lr_weights": self.optimizer.param_groups[0]["lr"],
                           "lr_biases": self.optimizer.param_groups[1]["lr"],
                           "images_per_s": self.config.batch_size / elapsed,
                           "data_wait_fraction": waited / elapsed})
                if self.step % self.config.log_every == 0 or stop:
                    log.flush()
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss:.2f}", refresh=False)
            if self.step >= self.total_steps:
                break
            if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0 and not stop:
                self.save_checkpoint()
            if stop:
                self.stopped_by = STOP_NAMES[stop]
                self.save_checkpoint()
                if stop == STOP_SIGNALS[signal.SIGUSR1]:
                    self.requeue()
                if self.ctx.world_size > 1:
                    # No rank exits before the checkpoint is on disk: a launcher that sees one node
                    # finish (srun --kill-on-bad-exit) may kill the others, rank 0 among them.
                    dist.barrier()
                return False
            tick = time.perf_counter()
        return True

    def monitor_knn(self, epoch: int, log: RunLog | None, progress) -> None:
        """k-NN accuracy of the current backbone, logged beside the losses (rank 0; the others wait)."""
        if self.knn_monitor is not None:
            tick = time.perf_counter()
            accuracy = self.knn_monitor(self.model.backbone)
            seconds = time.perf_counter() - tick
            log.write({"step": self.step, "epoch": epoch, "knn_top1": accuracy["top1"],
                       "knn_top5": accuracy["top5"], "knn_seconds": seconds})
            log.flush()
            progress.write(f"epoch {epoch}: k-NN top-1 {accuracy['top1']:.2f}%, top-5 {accuracy['top5']:.2f}% "
                           f"({seconds:.0f} s)")
        if self.ctx.world_size > 1 and self.config.knn_val:
            dist.barrier()


# Keys that may change between a run and its resume without changing what it computes.
RESUMABLE_KEYS = {"max_steps", "out_dir", "log_every", "checkpoint_every", "knn_every", "knn_train", "knn_val",
                  "tensorboard", "workers", "device", "compile_optimizer", "ffcv.beton", "ffcv.os_cache", "dali.prefetch"}


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'key old -> new' for the settings of `current` that differ from a checkpoint's `saved` config."""
    old, new = _flatten(saved), _flatten(current)
    return [f"{key} {old[key]!r} -> {new[key]!r}" for key in sorted(old.keys() & new.keys())
            if key not in RESUMABLE_KEYS and old[key] != new[key]]


def check_data_given(config: Config) -> None:
    """A ConfigError unless the config names a dataset for its pipeline."""
    own_dataset = ((config.pipeline == "ffcv" and config.ffcv.beton) or
                   (config.pipeline == "dali" and config.dali.records))
    if not config.data and not own_dataset:
        raise ConfigError("config key 'data' is required: data=/path/to/ImageFolder (with make: DATA=...; "
                          "`make pretrain` without DATA trains on the demo data)")


def check_run_inputs(config: Config) -> None:
    """What a run needs from the file system, checked before anything is built (one ConfigError each)."""
    check_data_given(config)
    for key in ("knn_train", "knn_val"):
        path = getattr(config, key)
        if path and not Path(path).is_dir():
            raise ConfigError(f"config key '{key}' names {path}, which is not a directory; point it at a labelled "
                              f"ImageFolder or leave it empty")
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"config key 'out_dir' names {out_dir}, which is a file; choose a directory")
    try:
        ensure_writable_directory(out_dir)
    except OSError as err:
        raise ConfigError(f"config key 'out_dir' names {out_dir}, which is not writable "
                          f"({err.strerror or err}); choose another out_dir") from None
    if config.tensorboard:
        tensorboard_writer_class()


def _last_logged_loss(out_dir: Path) -> float | None:
    """The loss of the last step in metrics.jsonl (runs checkpointed before losses were)."""
    path = out_dir / METRICS_NAME
    losses = [record["loss"] for record in read_metrics(path) if "loss" in record] if path.is_file() else []
    return losses[-1] if losses else None


def train(config: Config) -> dict:
    """Run (or resume) pretraining; returns the summary printed at the end.

    A run whose checkpoint already holds every step trains nothing and reports itself complete.
    """
    check_run_inputs(config)
    ctx = init_distributed(config.device)
    try:
        trainer = Trainer(config, ctx)
        trainer.resume()
        already_complete = trainer.step >= trainer.total_steps
        trainer.fit()
        backbone = trainer.out_dir / BACKBONE_NAME
        if not trainer.stopped_by and not (already_complete and backbone.is_file()):
            backbone = trainer.save_backbone()
        last_loss = trainer.last_loss if trainer.last_loss is not None else _last_logged_loss(trainer.out_dir)
        return {"steps": trainer.step, "total_steps": trainer.total_steps, "stopped_by": trainer.stopped_by,
                "already_complete": already_complete, "world_size": ctx.world_size,
                "images_per_s": trainer.images_seen / trainer.train_time if trainer.train_time else None,
                "first_loss": trainer.first_loss, "last_loss": last_loss,
                "checkpoint": str(trainer.out_dir / CHECKPOINT_NAME), "backbone": str(backbone),
                "is_main": ctx.is_main}
    finally:
        shutdown_distributed()


def _config_keys(node=None, prefix: str = "") -> list[str]:
    """'key = default' for every config key, for --help."""
    node = node if node is not None else Config()
    lines = []
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        if dataclasses.is_dataclass(value):
            lines += _config_keys(value, f"{prefix}{field.name}.")
        else:
            lines.append(f"  {prefix}{field.name} = {list(value) if isinstance(value, tuple) else value!r}")
    return lines


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bt_fast.train", description="Barlow Twins pretraining (resumes from <out_dir>/checkpoint.pth).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML file or as key=value; defaults shown):\n" + "\n".join(_config_keys()))
    parser.add_argument("--config", default=None, help="YAML config (see configs/)")
    parser.add_argument("--check", action="store_true",
                        help="only check the config and the paths it names, then exit (what the launcher does first)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=10 augment.image_size=96")
    args = parser.parse_args(argv)
    try:
        with cli_errors():
            config = load_config(args.config, args.overrides)
            if args.check:
                check_run_inputs(config)
                return
            summary = train(config)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print_error(f"interrupted; stopped without writing a checkpoint (the last one, if any, is in "
                    f"{Path(config.out_dir) / CHECKPOINT_NAME if 'config' in locals() else 'out_dir'})")
        sys.exit(130)
    if not summary.pop("is_main"):
        sys.exit(130 if summary["stopped_by"] == "SIGINT" else 0)
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']} after step {summary['steps']} of {summary['total_steps']}\n"
              f"checkpoint: {summary['checkpoint']} (run the same command again to resume)")
        # Ctrl-C ends with the shell's "interrupted" status so that `make pretrain && make eval` stops;
        # SIGTERM / SIGUSR1 come from schedulers, for which a checkpointed stop is a success.
        sys.exit(130 if summary["stopped_by"] == "SIGINT" else 0)
    done = "run already complete" if summary["already_complete"] else "done"
    print(f"{done}: {summary['steps']} steps on {summary['world_size']} process(es), "
          f"{_fmt(summary['images_per_s'], '.1f')} images/s, "
          f"loss {_fmt(summary['first_loss'], '.1f')} -> {_fmt(summary['last_loss'], '.1f')}\n"
          f"checkpoint: {summary['checkpoint']}\nbackbone:   {summary['backbone']}")


if __name__ == "__main__":
    main()

"""The Barlow Twins trainer: model, optimizer and pipeline of one rank, its checkpoints, and the loop.

The hot loop issues steps without reading the device: losses, step times (`bt_fast.step_clock`) and
the float16 skip count stay there until `Trainer.settle`, the one deliberate host sync, every
`log_every` steps, before a checkpoint, at a stop and at the end. There a non-finite loss, or too many
float16 steps skipped in a row, stops every rank together (`bt_fast.step_health`). Stop signals are
agreed across ranks on the host (`bt_fast.run_control`).
"""
from __future__ import annotations

import contextlib
import inspect
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bt_fast.checkpoint import (BACKBONE_NAME, CHECKPOINT_NAME, CheckpointError, RunCheckpoint, atomic_save,
                                load_checkpoint, remove_stale_checkpoint_temporaries, restore_model, rng_state,
                                set_rng_state)
from bt_fast.config import Config, ConfigError
from bt_fast.distributed import DistContext, sync_batchnorm
from bt_fast.errors import StorageError, UserError, WorkerLost, lost_dataloader_worker, out_of_memory
from bt_fast.files import shared_memory_full
from bt_fast.knn import KnnMonitor
from bt_fast.memory_budget import lower_one_of
from bt_fast.loss import barlow_twins_loss
from bt_fast.model import BarlowTwins, build_model
from bt_fast.optim import LARS, param_groups
from bt_fast.preflight import (changed_settings, check_batch_split, refuse_changed_finished_run,
                               refuse_other_model_or_batch, schedule_steps)
from bt_fast.progress import progress
from bt_fast.run_control import STOP_NAMES, STOP_SIGNALS, StopAgreement, StopSignals, requeue_slurm_job
from bt_fast.run_log import METRICS_NAME, PLOT_NAME, SUMMARY_NAME, RunLog, truncate_metrics
from bt_fast.schedule import learning_rate, set_learning_rates
from bt_fast.step_clock import StepClock
from bt_fast.step_health import StepHealth
from pipelines import build_pipeline
from pipelines.base import Placement

KNN_WAIT = timedelta(hours=12)  # how long the other ranks wait for rank 0's k-NN monitor


def amp_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bfloat16 on CPU, float16 (with GradScaler) on CUDA, unless the config says otherwise."""
    if config.amp == "none":
        return None
    if config.amp == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return getattr(torch, config.amp)


def check_compiler(config: Config, device: torch.device) -> None:
    """A ConfigError, before the pipeline is built (a first-use conversion can take hours), if a setting has
    torch.compile compile on the CPU, whose generated C++ needs a compiler that is not there (torch's own search:
    $CXX, else g++)."""
    compiled = {"compile_model": (config.compile_model, "false"),
                "compile_optimizer": (config.compile_optimizer, "false"),
                "augment.backend": (config.augment.backend == "compile", "eager")}
    settings = [f"{key}={off}" for key, (on, off) in compiled.items() if on]
    if device.type != "cpu" or not settings:
        return
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        names = " or ".join(name for name in inductor_config.cpp.cxx if name)
        raise ConfigError(f"torch.compile on the CPU needs a C++ compiler and none works here ({names}; $CXX names "
                          f"another): install one (apt-get install g++) or set {' '.join(settings)}") from None


class Trainer:
    def __init__(self, config: Config, ctx: DistContext):
        check_batch_split(config.batch_size, ctx.world_size)
        self.config, self.ctx = config, ctx
        self.out_dir = Path(config.out_dir)
        self.local_batch = config.batch_size // ctx.world_size
        self.amp_dtype = amp_dtype(config, ctx.device)
        self.precision = str(self.amp_dtype or torch.float32).removeprefix("torch.")
        torch.manual_seed(config.seed)  # same initial weights on every rank
        if ctx.device.type == "cuda":  # GPU only: input shapes fixed per epoch, so the autotuned kernels are reused
            torch.backends.cudnn.benchmark = True

        self.model: BarlowTwins = build_model(config.arch, config.projector, config.channels_last).to(ctx.device)
        self.ddp = None
        if ctx.world_size > 1:
            self.model = sync_batchnorm(self.model, ctx.device)
            # SyncBatchNorm already keeps running statistics identical on all ranks: no buffer broadcast
            # (`forward_sync_buffers` since torch 2.13, which deprecates `broadcast_buffers`; 2.11 has only that).
            ddp_options = inspect.signature(DistributedDataParallel).parameters
            no_broadcast = "forward_sync_buffers" if "forward_sync_buffers" in ddp_options else "broadcast_buffers"
            self.ddp = DistributedDataParallel(self.model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                               **{no_broadcast: False})
        self.network = self.ddp or self.model
        if config.compile_model:
            self.network = torch.compile(self.network)
        self.optimizer = LARS(param_groups(self.model), lr=0, weight_decay=config.weight_decay,
                              weight_decay_filter=True, lars_adaptation_filter=True,
                              compile=config.compile_optimizer)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype == torch.float16)
        # fit() restarts it; train_step also runs without fit (tools.bench, tools.gpu_check)
        self.health = StepHealth(self.scaler, ctx.device)

        placement = Placement(ctx.device, self.amp_dtype or torch.float32, ctx.rank, ctx.world_size)
        self.pipeline = build_pipeline(config, placement, self.local_batch)
        self.steps_per_epoch = len(self.pipeline)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.step = 0
        self.checkpoint = RunCheckpoint(self.out_dir, self.total_steps)
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.stopped_by: str | None = None  # signal name when a signal ended the run early
        self.elapsed_before = 0.0  # wall seconds of the segments before a resume
        self.run_log: RunLog | None = None  # rank 0, while fit() runs
        self.summary: dict | None = None  # rank 0, the run's summary.json once fit() has written it
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
        if self.ctx.is_main and 0 < self.step < self.total_steps:
            print(f"resuming {self.out_dir} from step {self.step} of {self.total_steps}", file=sys.stderr)
        if self.ctx.is_main and self.step < self.total_steps:  # a complete run's files are never rewritten
            self._warn_of_a_lost_log()
            truncate_metrics(self.out_dir, self.step)

    def _warn_of_a_lost_log(self) -> None:
        """One warning if the run resumes at a step that metrics.jsonl, gone, recorded: summary.json and
        metrics.png, drawn from it, would describe the run from here on as if it were the whole."""
        if self.step and not (self.out_dir / METRICS_NAME).is_file():
            print(f"warning: {self.out_dir / METRICS_NAME}, which held steps 1 to {self.step}, is missing: "
                  f"{SUMMARY_NAME} and {PLOT_NAME} will describe steps {self.step + 1} on only", file=sys.stderr)

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path, self.ctx.device)
        refuse_other_model_or_batch(path, state.get("config", {}), self.config)
        restore_model(self.model, state["model"], path)
        hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(self.optimizer.param_groups, hyperparameters):
            group.update(own)  # this config's (weight decay): a changed one is listed below and applies
        if state["scaler"]:  # empty where it was written without float16: the scale starts afresh
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.ctx.device)
        self.step = self.checkpoint.saved_step = state["step"]
        self.first_loss = state.get("first_loss")
        self.last_loss = state.get("last_loss")
        self.elapsed_before = state.get("elapsed_s") or 0.0  # absent in checkpoints of older versions
        positions = state.get("pipeline_positions")  # per rank; written mid-epoch by pipelines that need it
        if positions is not None and len(positions) == self.ctx.world_size:
            self.pipeline.restore_position(positions[self.ctx.rank])
        changed = changed_settings(state.get("config", {}), self.config.to_dict())
        refuse_changed_finished_run(self.out_dir, state, changed, schedule_steps(state, self.steps_per_epoch))
        changed += self._changed_epoch_order(state.get("world_size"), state.get("num_samples"))
        saved_precision = state.get("precision")  # absent in checkpoints of older versions
        if saved_precision not in (None, self.precision) and state.get("config", {}).get("amp") == self.config.amp:
            changed.append(f"precision {saved_precision} -> {self.precision}")  # amp=auto on another device
        if changed and self.ctx.is_main:
            print(f"warning: resuming {path} (step {self.step}) with settings that differ from the run that wrote "
                  f"it: {', '.join(changed)}; use a new out_dir to start afresh", file=sys.stderr)

    def _changed_epoch_order(self, world_size: int | None, num_samples: int | None) -> list[str]:
        """'processes old -> new' and 'images old -> new' where the run that wrote a checkpoint had another number
        of ranks or of images in its data (None: not recorded; images were removed or added since). Each rank's
        share of an epoch follows the one, the epoch's order the other: resumed mid-epoch, the rest of the epoch
        reads some images twice and never reads others."""
        changes = [f"{what} {saved} -> {now}" for what, saved, now in (
            ("processes", world_size, self.ctx.world_size), ("images", num_samples, self.pipeline.num_samples))
            if saved not in (None, now)]
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        if changes and batch:
            changes[-1] += f": the rest of epoch {epoch + 1} reads some images twice and skips others"
        return changes

    def _check_ranks_agree_on_step(self, path: Path) -> None:
        if self.ctx.world_size == 1:
            return
        steps = torch.tensor([self.step, -self.step], device=self.ctx.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise CheckpointError(f"ranks resumed from different steps ({-steps[1].item()} to {steps[0].item()}) of "
                                  f"{path}; out_dir must be on a file system shared by all nodes")

    def save_checkpoint(self, wait: bool = True) -> None:
        """Every rank calls it at the same step. Rank 0 writes checkpoint.pth (the one it replaces becomes
        checkpoint.prev.pth), with every rank's pipeline position; with `wait=False` in the background
        (`RunCheckpoint`), while training goes on. A full or read-only out_dir ends the run with a
        StorageError naming the last good checkpoint; for a save in the background, at the next save or
        the end of the run."""
        positions = self._pipeline_positions()
        if not self.ctx.is_main:
            return
        with self.checkpoint.faults():
            self.checkpoint.wait()
            if self.run_log is not None:  # every step the checkpoint covers is in the log before it exists
                self.run_log.flush(durable=True)
            self.checkpoint.start({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.step // self.steps_per_epoch,
                "step": self.step, "schedule_steps": self.config.epochs * self.steps_per_epoch,
                "world_size": self.ctx.world_size, "precision": self.precision, "config": self.config.to_dict(),
                "num_samples": self.pipeline.num_samples, "pipeline_positions": positions,
                "rng": rng_state(self.ctx.device), "first_loss": self.first_loss, "last_loss": self.last_loss,
                "elapsed_s": self.run_log.elapsed() if self.run_log else None})
            if wait:
                self.checkpoint.wait()

    def _pipeline_positions(self) -> list | None:
        """Every rank's `pipeline.position_state()`, gathered on all ranks (None: nothing to keep). It is None
        on every rank or on none (between epochs, or a pipeline whose batches follow from the step), so the
        ranks enter the gather together."""
        local = self.pipeline.position_state()
        if local is None:
            return None
        if self.ctx.world_size == 1:
            return [local]
        positions = [None] * self.ctx.world_size
        dist.all_gather_object(positions, local)
        return positions

    def save_backbone(self) -> Path:
        """Rank 0 writes backbone.pth; a full or read-only out_dir is a StorageError naming the last checkpoint."""
        path = self.out_dir / BACKBONE_NAME
        if self.ctx.is_main:
            backbone = {k: v.contiguous() for k, v in self.model.backbone.state_dict().items()}
            try:
                atomic_save(backbone, path)
            except StorageError as err:  # the rerun of a complete run writes a missing backbone.pth
                raise StorageError(f"{err}; {self.checkpoint.last_good()}") from None
        return path

    # -- the hot path --------------------------------------------------------------------------------
    def train_step(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a batch of view pairs, issued without reading anything on the host."""
        lr = learning_rate(self.step, self.steps_per_epoch, self.config.epochs, self.config.batch_size,
                           self.config.warmup_epochs)
        set_learning_rates(self.optimizer, lr, self.config.lr_weights, self.config.lr_biases)
        with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            z1, z2 = self.network(y1, y2)
        loss = barlow_twins_loss(z1, z2, self.config.lambd)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # LARS takes the scaler's inf check on the device (bt_fast.optim)
        self.scaler.update()
        self.health.after_step()
        return loss.detach()

    def settle(self, log: RunLog | None, progress) -> None:
        """The loop's one deliberate host sync, every `log_every` steps, before a checkpoint, at a stop and at
        the end: read the pending steps' losses and times, stop every rank if one failed, log the steps."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        losses = torch.stack([record["loss"] for record in pending]).float()
        status = self.health.status(losses)
        if self.ctx.world_size > 1:
            dist.all_reduce(status, op=dist.ReduceOp.MAX)
        *values, failed, worst = torch.cat([losses, status]).tolist()
        if failed > 0:
            raise self.health.failure(pending, values, int(worst), self.model, self._views)
        for record, loss, (seconds, waited) in zip(pending, values, self.clock.read()):
            record.update(loss=loss, images_per_s=self.config.batch_size / seconds,
                          data_wait_fraction=waited / seconds)
            self.train_time += seconds
            if log:
                log.write(record)
        self.images_seen += self.config.batch_size * len(pending)
        self.first_loss = values[0] if self.first_loss is None else self.first_loss
        self.last_loss = values[-1]
        if log:
            log.flush()
        progress.update(len(pending))
        epoch = pending[-1]["epoch"]
        epochs = self.config.epochs
        progress.set_postfix(epoch=f"{epoch + 1}/{epochs}", size=self.config.augment.image_size_at(epoch, epochs),
                             loss=f"{self.last_loss:.2f}", refresh=False)

    def fit(self) -> None:
        """Train up to `total_steps` (or a stop signal); on rank 0, then write the run's summary. A stop request
        after the last step (the final k-NN, which it cuts short, or the final checkpoint's write) stops the run
        there, with every step in its checkpoint."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_log = RunLog(self.config, self.step, self.elapsed_before) if self.ctx.is_main else None
        bar = progress(total=self.total_steps, initial=self.step, enabled=self.ctx.is_main, unit="step")
        self.images_seen, self.train_time = 0, 0.0
        self.clock, self.stops, self._pending = StepClock(self.ctx.device), StopAgreement(self.ctx.world_size), []
        self._in_epoch = False  # in an epoch's steps (their batches included): what ran out is a step's
        self.health.restart()
        try:
            with StopSignals() as signals, self._resource_faults():
                self._epochs(signals, self.run_log, bar)
                with self.checkpoint.faults():
                    self.checkpoint.wait()
                # A request after the last step (the final k-NN cut short, or the final checkpoint's write, which
                # completes): the run stops there, with every step in its checkpoint but no backbone.pth.
                late = self.stops.close(signals.code)
                self.stopped_by = self.stopped_by or (STOP_NAMES[late] if late else None)
            if self.run_log:
                self.summary = self.run_log.finish(self.steps_per_epoch, self.total_steps, self.stopped_by,
                                                   self.ctx.device, self.ctx.world_size)
        finally:
            with contextlib.suppress(Exception):  # on the way out of an error: the checkpoint still completes
                self.checkpoint.wait()
            bar.close()
            if self.run_log:
                self.run_log.close()
                self.run_log = None

    @contextlib.contextmanager
    def _resource_faults(self) -> Iterator[None]:
        """What ran out while training (torch raises from wherever the loop is), as one line naming the last
        checkpoint: a DataLoader worker that died is a WorkerLost; full shared memory and memory that ran out
        are ConfigErrors naming the settings that need less (a retry would meet the same limit)."""
        try:
            yield
        except UserError:
            raise
        except (RuntimeError, OSError, MemoryError) as err:
            full, lost, memory = shared_memory_full(err), lost_dataloader_worker(err), out_of_memory(err)
            if full is None and lost is None and memory is None:
                raise
            with contextlib.suppress(Exception):  # a checkpoint being written counts once it is on disk
                self.checkpoint.wait()
            last_good, workers = self.checkpoint.last_good, f"workers (now {self.config.workers})"
            if lost is not None:
                raise WorkerLost(f"{lost}; {last_good(f'lower {workers} or free memory')}") from None
            if full is not None:
                fix = f"{self._lower_one_of([workers])}, or give the machine more shared memory (docker run --shm-size)"
                raise ConfigError(f"the DataLoader cannot pass batches from its workers: {full}; {last_good(fix)}") \
                    from None
            where, asked = memory
            asking = f" (asking for {asked})" if asked else ""
            if not self._in_epoch:  # the k-NN monitor, the end's checkpoint: no setting of the step's helps
                raise ConfigError(f"out of {where} memory after step {self.step}{asking}; {last_good('free memory')}") \
                    from None
            lower = self._lower_one_of([f"augment.image_size (now {self.config.augment.image_size})"]
                                       + ([workers] if where == "host" else []))
            raise ConfigError(f"out of {where} memory at step {self.step + 1}{asking}; "
                              f"{last_good(f'free memory or {lower}')}") from None

    def _lower_one_of(self, settings: list[str]) -> str:
        return lower_one_of(self.config, settings, resuming=self.checkpoint.saved_step is not None)

    def _epochs(self, signals: StopSignals, log: RunLog | None, progress) -> None:
        start_epoch, start_batch = divmod(self.step, self.steps_per_epoch)
        for epoch in range(start_epoch, self.config.epochs):
            if self.step >= self.total_steps:
                return
            # A resumed run's epoch starts at its next batch; the pipeline reads none of the ones before.
            self.pipeline.set_epoch(epoch, start_batch)
            with contextlib.closing(iter(self.pipeline)) as epoch_batches:  # a stop mid-epoch ends its loader now
                if not self._epoch(epoch, epoch_batches, signals, log, progress):
                    return
                # Written while the next epoch trains. Saved before the loader closes: a run that max_steps
                # ends mid-epoch keeps the pipeline's position.
                self.save_checkpoint(wait=False)
            start_batch = 0
            if self.config.knn_every and ((epoch + 1) % self.config.knn_every == 0 or self.step >= self.total_steps):
                self.monitor_knn(epoch, log, progress, stop=lambda: signals.code != 0)
            if log:
                log.epoch_end()

    def _epoch(self, epoch: int, batches, signals: StopSignals, log: RunLog | None, progress) -> bool:
        """Train on `batches` (the rest of `epoch`); False if a stop request ended the run."""
        self._in_epoch = True  # left set by an error, for `_resource_faults` to read
        finished = self._steps(epoch, batches, signals, log, progress)
        self._in_epoch = False
        return finished

    def _steps(self, epoch: int, batches, signals: StopSignals, log: RunLog | None, progress) -> bool:
        self.clock.start()
        for self._views in batches:
            self.clock.data_ready()
            if log and self.step == 0:
                log.write_views(*self._views, step=0)
            loss = self.train_step(*self._views)
            self.step += 1
            self.clock.step_done()
            self._pending.append({"step": self.step, "epoch": epoch, "loss": loss,
                                  "lr_weights": self.optimizer.param_groups[0]["lr"],
                                  "lr_biases": self.optimizer.param_groups[1]["lr"]})
            stop = self.stops.poll(signals.code)
            last = self.step >= self.total_steps
            checkpoint = bool(self.config.checkpoint_every) and self.step % self.config.checkpoint_every == 0
            if last or stop or checkpoint or self.step % self.config.log_every == 0:
                self.settle(log, progress)
                self.clock.wait_from_here()  # the logging after the sync is no data wait
            if last:
                break
            if stop:
                self.stopped_by = STOP_NAMES[stop]
                self.save_checkpoint()
                if stop == STOP_SIGNALS[signal.SIGUSR1] and self.ctx.is_main:
                    requeue_slurm_job()
                if self.ctx.world_size > 1:
                    # No rank exits before the checkpoint is on disk: a launcher that sees one node
                    # finish (srun --kill-on-bad-exit) may kill the others, rank 0 among them.
                    dist.barrier()
                return False
            if checkpoint:
                self.save_checkpoint(wait=False)
                self.clock.start()  # the checkpoint's time is not the next step's data wait
        self.settle(log, progress)  # before the epoch's checkpoint
        return True

    def monitor_knn(self, epoch: int, log: RunLog | None, progress, stop=lambda: False) -> None:
        """k-NN accuracy of the current backbone, logged beside the losses (rank 0; the others wait); nothing
        once `stop()` (a stop request) has cut it short."""
        if self.knn_monitor is not None:
            tick = time.perf_counter()
            accuracy = self.knn_monitor(self.model.backbone, stop)
            seconds = time.perf_counter() - tick
            if accuracy is not None:
                log.write({"step": self.step, "epoch": epoch, "knn_top1": accuracy["top1"],
                           "knn_top5": accuracy["top5"], "knn_seconds": seconds})
                log.flush()
                progress.write(f"epoch {epoch + 1} of {self.config.epochs}: k-NN top-1 {accuracy['top1']:.2f}%, "
                               f"top-5 {accuracy['top5']:.2f}% ({seconds:.0f} s)")
        if self.ctx.world_size > 1 and self.config.knn_val:
            # On the host's gloo group, with a timeout of its own: on the default group NCCL's watchdog would
            # abort the waiting ranks after 10 minutes, less than a k-NN over a large memory bank takes
            dist.monitored_barrier(self.stops.group, timeout=KNN_WAIT)

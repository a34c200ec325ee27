"""Barlow Twins pretraining.

    python -m bt_fast.train --config configs/demo_cpu.yaml data=data/demo/train key=value ...

One process per device; under torchrun the global batch is split evenly across ranks.
Resumes automatically from `<out_dir>/checkpoint.pth`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from bt_fast.checkpoint import (BACKBONE_NAME, CHECKPOINT_NAME, CheckpointError, atomic_save, load_checkpoint,
                                restore_model, rng_state, set_rng_state)
from bt_fast.config import Config, ConfigError, load_config
from bt_fast.distributed import DistContext, init_distributed, shutdown_distributed
from bt_fast.loss import barlow_twins_loss
from bt_fast.model import BarlowTwins, build_model
from bt_fast.optim import LARS, param_groups
from bt_fast.schedule import learning_rate, set_learning_rates
from pipelines import DataError, Placement, build_pipeline


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the message says where and why."""


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

        self.model: BarlowTwins = build_model(config.arch, config.projector, config.channels_last).to(ctx.device)
        self.ddp = None
        if ctx.world_size > 1:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.ddp = DistributedDataParallel(self.model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
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

    # -- checkpoints ---------------------------------------------------------------------------------
    def resume(self) -> None:
        path = self.out_dir / CHECKPOINT_NAME
        if not path.is_file():
            return
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

    def save_checkpoint(self) -> None:
        if not self.ctx.is_main:
            return
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), "epoch": self.step // self.steps_per_epoch,
                     "step": self.step, "config": self.config.to_dict(), "rng": rng_state(),
                     "first_loss": self.first_loss}, self.out_dir / CHECKPOINT_NAME)

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
        network = self.ddp or self.model
        with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            z1, z2 = network(y1, y2)
        loss = barlow_twins_loss(z1, z2, self.config.lambd)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def check_finite(self, loss: float) -> None:
        # Under float16 the scaler skips steps whose gradients overflowed; that is expected, not an error.
        if not torch.isfinite(torch.tensor(loss)) and not self.scaler.is_enabled():
            bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
            raise TrainingError(f"loss is {loss} at step {self.step} (epoch {self.step // self.steps_per_epoch}); "
                                f"non-finite parameters: {bad[:3] or 'none'}; lower the learning rate or use amp=none")

    def fit(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.out_dir / "metrics.jsonl", "a") if self.ctx.is_main else None
        start_epoch, skip = divmod(self.step, self.steps_per_epoch)
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not self.ctx.is_main,
                        unit="step", dynamic_ncols=True)
        self.images_seen, self.train_time = 0, 0.0
        try:
            for epoch in range(start_epoch, self.config.epochs):
                if self.step >= self.total_steps:
                    break
                self.pipeline.set_epoch(epoch)
                batches = itertools.islice(iter(self.pipeline), skip, None)  # resume mid-epoch
                skip = 0
                tick = time.perf_counter()
                for y1, y2 in batches:
                    waited = time.perf_counter() - tick
                    loss = self.train_step(y1, y2).item()  # .item() syncs, so the step time below is real
                    self.check_finite(loss)
                    self.step += 1
                    elapsed = time.perf_counter() - tick
                    self.train_time += elapsed
                    self.images_seen += self.config.batch_size
                    self.first_loss = loss if self.first_loss is None else self.first_loss
                    self.last_loss = loss
                    if log:
                        log.write(json.dumps({
                            "step": self.step, "epoch": epoch, "loss": loss,
                            "lr_weights": self.optimizer.param_groups[0]["lr"],
                            "lr_biases": self.optimizer.param_groups[1]["lr"],
                            "images_per_s": self.config.batch_size / elapsed,
                            "data_wait_fraction": waited / elapsed}) + "\n")
                        if self.step % self.config.log_every == 0:
                            log.flush()
                    progress.update(1)
                    progress.set_postfix(epoch=epoch, loss=f"{loss:.2f}")
                    if self.step >= self.total_steps:
                        break
                    tick = time.perf_counter()
                self.save_checkpoint()
        finally:
            progress.close()
            if log:
                log.close()


def train(config: Config) -> dict:
    """Run (or resume) pretraining; returns the summary printed at the end."""
    ctx = init_distributed(config.device)
    try:
        trainer = Trainer(config, ctx)
        trainer.resume()
        trainer.fit()
        backbone = trainer.save_backbone()
        return {"steps": trainer.step, "images_per_s": trainer.images_seen / max(trainer.train_time, 1e-9),
                "first_loss": trainer.first_loss, "last_loss": trainer.last_loss,
                "checkpoint": str(trainer.out_dir / CHECKPOINT_NAME), "backbone": str(backbone),
                "is_main": ctx.is_main}
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Barlow Twins pretraining")
    parser.add_argument("--config", default=None, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=10 augment.image_size=96")
    args = parser.parse_args(argv)
    try:
        summary = train(load_config(args.config, args.overrides))
    except (ConfigError, DataError, CheckpointError, TrainingError) as err:
        print(f"error: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(2)
    if summary.pop("is_main"):
        print(f"done: {summary['steps']} steps, {summary['images_per_s']:.1f} images/s, "
              f"loss {summary['first_loss']:.1f} -> {summary['last_loss']:.1f}\n"
              f"checkpoint: {summary['checkpoint']}\nbackbone:   {summary['backbone']}")


if __name__ == "__main__":
    main()

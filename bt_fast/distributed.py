"""torch.distributed set-up from torchrun's environment (NCCL on CUDA, gloo on CPU), and
BatchNorm over the global batch on either device."""
from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from bt_fast.config import ConfigError

# Still the only public all-reduce that autograd differentiates (loss.py relies on it too).
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0, setting: str = "config key 'device'") -> torch.device:
    """`auto`, `cpu` or `cuda` -> this process's device (one GPU per local rank).

    The one place that turns a device setting into a device; `setting` names it in errors
    (e.g. "--device" for a command-line option).
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{setting} must be auto, cpu or cuda, got '{preference}'")
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":  # GPU: one device per local rank
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting} is cuda but no CUDA device is visible; use cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                              f"start at most that many processes per node (GPUS=...)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def process_context(device_preference: str = "auto") -> DistContext:
    """This process's place in the run torchrun describes (alone without it) and its device, resolved; no process
    group is joined."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistContext(int(os.environ.get("RANK", "0")), local_rank, int(os.environ.get("WORLD_SIZE", "1")),
                       resolve_device(device_preference, local_rank))


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run alone."""
    ctx = process_context(device_preference)
    if ctx.device.type == "cuda":  # GPU: what "current" means to streams, events and RNG state, alone or not
        torch.cuda.set_device(ctx.device)
    if ctx.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo", rank=ctx.rank,
                                world_size=ctx.world_size)
    return ctx


def shutdown_distributed() -> None:
    """Destroy the process group once nothing else holds it. A DDP reducer that outlives it drops the
    last reference to the group itself, holding the GIL; with torch 2.11, destroying a gloo group then
    waits for its worker thread, which may be waiting for the GIL to free a finished all-reduce's
    tensors, and the rank hangs at exit. Collected first, the reducer leaves the group to
    `destroy_process_group`, which releases the GIL while it destroys it."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


class AllReduceBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch for CPU (gloo) runs: torch's SyncBatchNorm is GPU-only.

    The statistics are summed over ranks with autograd-aware all-reduces, so the gradients
    are those of BatchNorm on the whole batch (scaled by the world size on every rank, as
    everywhere in bt_fast: the loss is the global one on each rank; DDP's average undoes it).
    State-dict keys are BatchNorm's, so checkpoints move freely between world sizes.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        channels = x.shape[1]
        # One all-reduce per layer: sum and sum of squares, in float64 so that E[x^2] - E[x]^2
        # loses nothing a float32 two-pass variance keeps.
        x64 = x.double()
        local = torch.cat([x64.sum(dims), x64.pow(2).sum(dims), x64.new_full((1,), x.numel() / channels)])
        total = dist_fn.all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:-1] / count - mean.pow(2)).clamp_min(0)
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x.float() - mean.float().view(shape)) * torch.rsqrt(var + self.eps).float().view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var.detach() * count / (count - 1)).to(self.running_var.dtype), momentum)
        return out.to(x.dtype)


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm of `model` normalised over the global batch: torch's SyncBatchNorm on GPUs,
    AllReduceBatchNorm elsewhere."""
    if device.type == "cuda":  # GPU
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            replacement = AllReduceBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                             child.track_running_stats).to(device)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            setattr(model, name, replacement)
        else:
            sync_batchnorm(child, device)
    return model

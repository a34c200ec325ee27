"""Learning-rate schedules: the paper's pretraining schedule (linear warm-up, then cosine decay to 1/1000)
and the evaluations' per-epoch cosine."""
from __future__ import annotations

import math


def learning_rate(step: int, steps_per_epoch: int, epochs: int, batch_size: int, warmup_epochs: int = 10) -> float:
    """Base learning rate (before the weights/biases factors) at `step`.

    base = batch_size / 256; linear from 0 over the warm-up, then cosine from base
    to base / 1000 at the last step.
    """
    base = batch_size / 256
    max_steps = epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return base * step / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(progress, 1.0)
    end = base * 0.001
    return end + (base - end) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_cosine(base: float, epoch: int, epochs: int) -> float:
    """`base` annealed to zero by a cosine over `epochs`, constant within an epoch: torch's
    CosineAnnealingLR stepped once per epoch, as the official linear probe and fine-tuning use it."""
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def set_learning_rates(optimizer, lr: float, lr_weights: float, lr_biases: float) -> None:
    """Group 0 holds weights, group 1 biases and norm parameters (see `param_groups`)."""
    optimizer.param_groups[0]["lr"] = lr * lr_weights
    optimizer.param_groups[1]["lr"] = lr * lr_biases

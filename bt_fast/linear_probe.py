"""The paper's linear probe: linear classifiers trained on the features of frozen backbones.

Official initialisation (weights N(0, 0.01), bias zero), cross-entropy, SGD with momentum 0.9,
learning rate annealed by a cosine over the epochs and stepped once per epoch (as torch's
CosineAnnealingLR in the official `evaluate.py`).

    linear = train_linear(train_features, train_labels, num_classes, epochs=100)
    top1, top5 = linear_topk(linear, val_features, val_labels)
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bt_fast.errors import UserError
from bt_fast.knn import topk_accuracy
from bt_fast.schedule import epoch_cosine

# (features per linear layer, labels) batches of one epoch, given the epoch number
EpochBatches = Callable[[int], Iterable[tuple[Sequence[torch.Tensor], torch.Tensor]]]


def new_linear(in_dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """The official initialisation: weights N(0, 0.01), bias zero."""
    linear = nn.Linear(in_dim, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
    return linear


def cross_entropy_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """One SGD step of `model` on the cross-entropy of a batch; the batch's summed loss, a float64 tensor
    on the device (callers add these up and read the total once per epoch)."""
    loss = F.cross_entropy(model(inputs), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach().double() * labels.shape[0]


def fit_linears(linears: Sequence[nn.Linear], epoch_batches: EpochBatches, epochs: int, lr: float = 0.3,
                weight_decay: float = 1e-6, on_epoch: Callable[[int, float], None] | None = None) -> None:
    """Train each linear layer on its own features; `on_epoch(epoch, mean loss)` after every epoch."""
    optimizers = [torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
                  for linear in linears]
    for linear in linears:
        linear.train()
    for epoch in range(epochs):
        epoch_lr = epoch_cosine(lr, epoch, epochs)
        total, count = 0.0, 0  # the sum becomes a tensor on the features' device, read once per epoch
        for features, labels in epoch_batches(epoch):
            for linear, optimizer, x in zip(linears, optimizers, features):
                for group in optimizer.param_groups:
                    group["lr"] = epoch_lr
                total = total + cross_entropy_step(linear, optimizer, x, labels)
            count += labels.shape[0] * len(linears)
        if on_epoch:
            on_epoch(epoch, float(total) / max(count, 1))


def cached_batches(features: Sequence[torch.Tensor], labels: torch.Tensor, batch_size: int,
                   seed: int) -> Callable[[int], Iterator]:
    """Batches of fixed features, reshuffled every epoch from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)

    def batches(epoch: int):
        order = torch.randperm(labels.shape[0], generator=generator).to(labels.device)
        for start in range(0, labels.shape[0], batch_size):
            idx = order[start:start + batch_size]
            yield [x[idx] for x in features], labels[idx]
    return batches


def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 100,
                 lr: float = 0.3, weight_decay: float = 1e-6, batch_size: int = 256, seed: int = 0) -> nn.Linear:
    """A linear classifier trained on fixed (N, D) features."""
    linear = new_linear(features.shape[1], num_classes, seed).to(features.device)
    fit_linears([linear], cached_batches([features], labels, batch_size, seed), epochs, lr, weight_decay)
    return linear


@torch.no_grad()
def linear_topk(linear: nn.Linear, features: torch.Tensor, labels: torch.Tensor,
                remedy: str = "lower the learning rate") -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of `linear` on (N, D) features. Where an output is not finite
    (training diverged to inf or nan) there is no accuracy: a UserError that ends with `remedy`."""
    linear.eval()
    logits = linear(features)
    if not torch.isfinite(logits).all():
        raise UserError(f"training diverged: the classifier's outputs on the validation images are not finite, so "
                        f"it has no accuracy; {remedy}")
    ranked = logits.sort(dim=1, descending=True, stable=True).indices
    top1, top5 = topk_accuracy(ranked, labels, (1, 5))
    return top1, top5

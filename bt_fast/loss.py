"""Barlow Twins loss, exact under data parallelism.

The embeddings are standardised with statistics of the *global* batch and the
cross-correlation is summed over ranks with autograd-aware all-reduces, so a batch
split across W ranks gives the single-process loss, and (after DDP averages the
gradients) the single-process gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    return dist_fn.all_reduce(x) if _world_size() > 1 else x


def standardise(z: torch.Tensor, n_global: int, eps: float = 1e-5) -> torch.Tensor:
    """(z - mean) / sqrt(var + eps) per column, biased variance over the global batch.

    This is `BatchNorm1d(affine=False)` in training mode (SyncBatchNorm across ranks).
    """
    mean = _sum_over_ranks(z.sum(0)) / n_global
    centred = z - mean
    var = _sum_over_ranks(centred.pow(2).sum(0)) / n_global
    return centred * torch.rsqrt(var + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 for the local batch's projector outputs."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two (batch, dim) embeddings of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        n_global = z1.shape[0] * _world_size()
        c = standardise(z1, n_global).T @ standardise(z2, n_global) / n_global
        c = _sum_over_ranks(c)
        on_diag = torch.diagonal(c)
        on_diag_term = (1 - on_diag).pow(2).sum()
        off_diag_term = c.pow(2).sum() - on_diag.pow(2).sum()
        return on_diag_term + lambd * off_diag_term

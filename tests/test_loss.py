import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from bt_fast.loss import barlow_twins_loss
from conftest import free_ports


def loss_by_formula(z1: np.ndarray, z2: np.ndarray, lambd: float) -> float:
    """The paper's loss written out in float64 numpy, element by element for C."""
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + 1e-5)  # numpy var is the biased one
    b = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + 1e-5)
    c = np.array([[sum(a[k, i] * b[k, j] for k in range(n)) / n for j in range(d)] for i in range(d)])
    on = sum((1 - c[i, i]) ** 2 for i in range(d))
    off = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off


def loss_official_form(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """The official main.py: c = bn(z1).T @ bn(z2) / batch with BatchNorm1d(affine=False)."""
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False).train()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on_diag = torch.diagonal(c).add(-1).pow(2).sum()
    n = c.shape[0]
    off_diag = c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten().pow(2).sum()
    return on_diag + lambd * off_diag


def test_loss_matches_written_out_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g) + 0.5
    ours = barlow_twins_loss(z1.double(), z2.double(), lambd=0.0051).item()
    assert ours == pytest.approx(loss_by_formula(z1.double().numpy(), z2.double().numpy(), 0.0051), rel=1e-6)


def test_loss_matches_official_batchnorm_form():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(64, 32, generator=g) * 3, torch.randn(64, 32, generator=g) - 1
    assert barlow_twins_loss(z1, z2, 0.0051).item() == pytest.approx(loss_official_form(z1, z2, 0.0051).item(), rel=1e-5)


def test_identical_whitened_views_give_near_zero_loss():
    # z with orthogonal, standardised columns -> C = I -> loss 0 (up to the BN epsilon).
    q, _ = torch.linalg.qr(torch.randn(256, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    z = q - q.mean(0)
    assert barlow_twins_loss(z, z).item() < 1e-3


def test_loss_is_float32_under_autocast():
    """bfloat16 embeddings under autocast: the loss of their values in float64, not of a bfloat16 computation."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(16, 8, generator=g).bfloat16(), torch.randn(16, 8, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = barlow_twins_loss(z1, z2)
    assert loss.dtype == torch.float32
    exact = loss_by_formula(z1.double().numpy(), z2.double().numpy(), 0.0051)
    assert loss.item() == pytest.approx(exact, rel=1e-5)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 5))


def _split_batch_worker(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * len(z1) // world, (rank + 1) * len(z1) // world)
    a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
    loss = barlow_twins_loss(a, b)
    loss.backward()
    # DDP would average parameter gradients over ranks: divide by the world size the same way.
    out[rank] = (loss.item(), a.grad / world, b.grad / world)
    torch.distributed.destroy_process_group()


def test_split_batch_across_ranks_gives_single_process_loss_and_gradients():
    world = 2
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    expected = barlow_twins_loss(a, b)
    expected.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_split_batch_worker, args=(world, free_ports(1)[0], z1, z2, out), nprocs=world)
        results = dict(out)
    for rank in range(world):
        loss, grad1, grad2 = results[rank]
        rows = slice(rank * 8, (rank + 1) * 8)
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        torch.testing.assert_close(grad1, a.grad[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad2, b.grad[rows], rtol=1e-5, atol=1e-7)

"""The conftest guard: a multi-rank test that leaves the device unpinned fails on every machine
with fewer GPUs than ranks (all machines without GPUs), and passes once it pins device=cpu."""
import pytest
import torch
import torch.multiprocessing as mp

import bt_fast.distributed


def _resolve_in_rank(rank: int, preference: str) -> None:
    bt_fast.distributed.resolve_device(preference, local_rank=torch.cuda.device_count())


def test_an_in_process_rank_without_a_gpu_of_its_own_fails_and_a_pinned_one_runs(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(RuntimeError, match="starts 2 ranks with config key 'device' 'auto'.*pin device=cpu"):
        bt_fast.distributed.init_distributed("auto")
    assert bt_fast.distributed.resolve_device("cpu", local_rank=2) == torch.device("cpu")


def test_a_spawned_rank_without_a_gpu_of_its_own_fails_the_test(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(mp.ProcessRaisedException, match="pin device=cpu"):
        mp.spawn(_resolve_in_rank, args=("auto",), nprocs=1)
    mp.spawn(_resolve_in_rank, args=("cpu",), nprocs=1)

"""The training loop's host syncs and its step clock, on the CPU path the GPU runs too.

A scalar read of a tensor (`.item()`, `float(t)`, `bool(t)`, ...) reaches the dispatcher as
`aten._local_scalar_dense`; `.tolist()` and `.numpy()` read the data directly. On CUDA each is a
device sync. The loop may read tensors only in `Trainer.settle` (every log_every steps, before
checkpoints, at the end) and while checkpointing.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bt_fast.distributed import DistContext
from bt_fast.step_clock import StepClock
from bt_fast.trainer import Trainer
from test_train import tiny_config

CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class ScalarReads(TorchDispatchMode):
    """Records the trainer's step counter and phase at each scalar read of a tensor."""

    def __init__(self, trainer: Trainer, phase: list[str]):
        super().__init__()
        self.trainer, self.phase, self.reads = trainer, phase, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append((self.trainer.step, self.phase[-1]))
        return func(*args, **(kwargs or {}))


def record_direct_reads(monkeypatch, probe: ScalarReads) -> None:
    for name in ("tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def reading(self, *args, _real=real, **kwargs):
            probe.reads.append((probe.trainer.step, probe.phase[-1]))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, reading)


def phased(monkeypatch, phase: list[str], name: str) -> None:
    real = getattr(Trainer, name)

    def wrapped(self, *args, **kwargs):
        phase.append(name)
        try:
            return real(self, *args, **kwargs)
        finally:
            phase.pop()
    monkeypatch.setattr(Trainer, name, wrapped)


class SyntheticBatches:
    """A pipeline of fixed random view pairs (the loop's reads are the subject, not the data's)."""

    def __init__(self, batches: int, batch_size: int, side: int):
        generator = torch.Generator().manual_seed(0)
        self.batches = [tuple(torch.randn(batch_size, 3, side, side, generator=generator) for _ in range(2))
                        for _ in range(batches)]
        self.start = 0
        self.num_samples = batches * batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def position_state(self) -> None:  # its batches follow from the step
        return None

    def restore_position(self, state) -> None:
        pass

    def __iter__(self):
        yield from self.batches[self.start:]


def test_steps_read_no_scalar_outside_settle_and_checkpoints(image_folder, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(image_folder, tmp_path, "max_steps=7", "log_every=2", "epochs=3", "amp=none"), CPU)
    trainer.pipeline = SyntheticBatches(3, 4, 32)
    # The float16 scaler (on CUDA with amp=auto) decided on the host whether to step: enable it here too.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    phase = ["loop"]
    for name in ("settle", "save_checkpoint"):
        phased(monkeypatch, phase, name)
    settled_at = []
    real_settle = Trainer.settle
    monkeypatch.setattr(Trainer, "settle", lambda self, *a: (settled_at.extend([self.step] if self._pending else []),
                                                              real_settle(self, *a))[1])
    with ScalarReads(trainer, phase) as reads:
        record_direct_reads(monkeypatch, reads)
        trainer.fit()
    assert settled_at == [2, 3, 4, 6, 7]  # log_every, epoch ends (before their checkpoints), the end
    assert [read for read in reads.reads if read[1] == "loop"] == []
    assert any(where == "settle" for _, where in reads.reads)  # the probe does see the reads it allows


def test_step_clock_measures_from_the_previous_step_end(monkeypatch):
    """step = done_i - done_(i-1) and wait = ready_i - done_(i-1), from the epoch's start for the first step and
    from `wait_from_here` for a step after the host's own work."""
    ticks = iter([10.0, 10.5, 12.0, 12.25, 13.0, 20.0, 20.0, 21.0, 21.75, 22.0, 23.0, 23.5, 24.0])
    monkeypatch.setattr("bt_fast.step_clock.time.perf_counter", lambda: next(ticks))
    clock = StepClock(torch.device("cpu"))
    clock.start()                                       # 10.0
    clock.data_ready(), clock.step_done()               # 10.5, 12.0
    clock.data_ready(), clock.step_done()               # 12.25, 13.0
    assert clock.read() == [(2.0, 0.5), (1.0, 0.25)]
    clock.start()                                       # 20.0: a new epoch
    clock.data_ready(), clock.step_done()               # 20.0, 21.0
    assert clock.read() == [(1.0, 0.0)]
    assert clock.read() == []
    clock.wait_from_here()                              # 21.75: the host's logging after a settle ended
    clock.data_ready(), clock.step_done()               # 22.0, 23.0
    clock.data_ready(), clock.step_done()               # 23.5, 24.0
    assert clock.read() == [(2.0, 0.25), (1.0, 0.5)]  # the step's time still from 21.0

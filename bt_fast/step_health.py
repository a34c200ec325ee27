"""Whether training may go on after the steps of one settle window, decided on every rank together.

A non-finite loss stops the run, with a diagnostic, before any checkpoint could hold it. Under
float16 the GradScaler skips steps whose gradients overflow; that is normal, but more than
MAX_SKIPPED_STEPS in a row is not (the scale has fallen by 2**MAX_SKIPPED_STEPS, so the overflow is
not a scaling problem) and stops the run too. The streak is counted on the device, step by step;
the trainer reads `status` at its settle, after one all-reduce (MAX) across the ranks.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bt_fast.checkpoint import CHECKPOINT_NAME
from bt_fast.errors import UserError

MAX_SKIPPED_STEPS = 20


class TrainingError(UserError):
    """The run cannot continue (e.g. a non-finite loss); the message says where and why."""


class StepHealth:
    """The float16 skip streak of `scaler`'s steps, kept on `device`, and the verdict on a window of steps."""

    def __init__(self, scaler: torch.amp.GradScaler, device: torch.device):
        self.scaler, self.device = scaler, device
        self.restart()

    def restart(self) -> None:
        """A new streak, from the scaler's current scale (call it again once a resume has loaded the scaler)."""
        if self.scaler.is_enabled():
            self._last_scale = torch.full((), self.scaler.get_scale(), device=self.device)
            self._in_row = torch.zeros((), dtype=torch.int64, device=self.device)
            self._worst = torch.zeros((), dtype=torch.int64, device=self.device)

    def after_step(self) -> None:
        """After `scaler.update()`: a step the scaler skipped lowered its scale; count them in a row."""
        if not self.scaler.is_enabled():
            return
        scale = self.scaler._get_scale_async()  # the scale tensor itself (get_scale() would sync)
        self._in_row = torch.where(scale < self._last_scale, self._in_row + 1, 0)
        torch.maximum(self._worst, self._in_row, out=self._worst)
        self._last_scale.copy_(scale)

    def status(self, losses: torch.Tensor) -> torch.Tensor:
        """[failed, longest skip streak] of the window whose float `losses` are given, on the device (0 or
        1, then a count; reduce across ranks with MAX). The next window's streak continues this one's."""
        if not self.scaler.is_enabled():
            failed = (~torch.isfinite(losses)).any().float()
            return torch.stack([failed, torch.zeros_like(failed)])
        status = torch.stack([(self._worst > MAX_SKIPPED_STEPS).float(), self._worst.float()])
        self._worst.copy_(self._in_row)  # issued after the read above, so it does not change it
        return status

    def failure(self, pending: list[dict], losses: list[float], worst: int, model: nn.Module,
                views: tuple[torch.Tensor, ...]) -> TrainingError:
        """What went wrong in the `pending` steps (their `losses`, the ranks' longest skip streak `worst`),
        in one line; `model` and `views` as they are after the last of them."""
        if self.scaler.is_enabled():
            where = f"step {pending[-1]['step']} (epoch {pending[-1]['epoch']})"
            return TrainingError(f"{worst} steps in a row up to {where} were skipped by the float16 "
                                 f"GradScaler (loss {losses[-1]}, scale now {self.scaler.get_scale():g}): the "
                                 f"overflow does not go away with scaling; lower lr_weights/lr_biases or use "
                                 f"amp=bfloat16 or amp=none")
        first = next(i for i, loss in enumerate(losses) if not math.isfinite(loss))
        where = f"step {pending[first]['step']} (epoch {pending[first]['epoch']})"

        def non_finite(named) -> str:
            bad = [name for name, t in named if t is not None and not torch.isfinite(t).all()]
            return f"{len(bad)} tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else "none"
        inputs = [name for name, y in zip(("view1", "view2"), views) if not torch.isfinite(y).all()]
        grads = non_finite((n, p.grad) for n, p in model.named_parameters())
        params = non_finite(model.named_parameters())
        return TrainingError(f"loss is {losses[first]} at {where}, lr_weights {pending[first]['lr_weights']:.4g}; "
                             f"non-finite inputs: {', '.join(inputs) or 'none'}; non-finite gradients: {grads}; "
                             f"non-finite parameters after the update: {params} (inputs, gradients and parameters "
                             f"as of step {pending[-1]['step']}); stopped without saving, so {CHECKPOINT_NAME} is "
                             f"the last good state: lower lr_weights/lr_biases or use amp=none")

"""LARS with the semantics of the official Barlow Twins optimizer, on multi-tensor ops.

Per parameter p with gradient g (official `main.py`):
    d  = g + wd * p                       unless the weight-decay filter excludes p (1-D tensors)
    d *= eta * ||p|| / ||d||              unless the adaptation filter excludes p; only where both norms > 0
    mu = momentum * mu + d
    p -= lr * mu

The official loop runs ~10 kernels per tensor (~1,700 for ResNet-50 + projector) and
makes ~14 passes over parameter-sized memory. Here tensors are bucketed by their
(filtered, not filtered) flags once, and each bucket is updated with `torch._foreach_*`
ops, so the op count per step is constant in the number of tensors. With
`compile=True` the same function goes through `torch.compile`, which fuses it into
one reduction pass over (p, g) and one update pass over (p, g, mu): ~7 memory passes.

Under a float16 `torch.amp.GradScaler` the step never reads the device on the host: LARS declares
`_step_supports_amp_scaling`, so the scaler hands it the scale and its inf/nan flag as device tensors
(`grad_scale`, `found_inf`) instead of syncing to decide whether to call `step`. LARS unscales the
gradients itself (by the same float32 reciprocal as `GradScaler.unscale_`) and, where the flag is set,
leaves parameters and momenta as they were, exactly as a skipped step.
"""
from __future__ import annotations

import torch
from torch import nn


def exclude_bias_and_norm(p: torch.Tensor) -> bool:
    return p.ndim == 1


def param_groups(model: nn.Module) -> list[dict]:
    """Group 0: weights (ndim > 1); group 1: biases and norm parameters, as the paper's run."""
    weights = [p for p in model.parameters() if not exclude_bias_and_norm(p)]
    biases = [p for p in model.parameters() if exclude_bias_and_norm(p)]
    return [{"params": weights}, {"params": biases}]


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Written per tensor so inductor fuses each reduction with the weight-decay add that
        # produces its input: one read of (p, g) for all norms, no materialised g + wd * p.
        return torch.stack([t.pow(2).sum() for t in tensors]).sqrt()
    return torch.stack(torch._foreach_norm(tensors))


def _lars_bucket_update(params: list[torch.Tensor], grads: list[torch.Tensor], mus: list[torch.Tensor],
                        lr: float | torch.Tensor, weight_decay: float, momentum: float, eta: float,
                        decay: bool, adapt: bool, skip: torch.Tensor | None = None) -> None:
    """Update one bucket of tensors that share their filter flags, in place; not at all where `skip` (a 0-d
    bool tensor) is set."""
    owned = decay and weight_decay != 0  # `grads` is our temporary, not p.grad: safe to scale in place
    if owned:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if adapt:
        param_norm = _norms(params)
        update_norm = _norms(grads)
        one = torch.ones_like(param_norm)
        trust = torch.where(param_norm > 0, torch.where(update_norm > 0, eta * param_norm / update_norm, one), one)
        if owned:
            torch._foreach_mul_(grads, trust.unbind(0))
        else:
            grads = torch._foreach_mul(grads, trust.unbind(0))
    if skip is None:
        torch._foreach_mul_(mus, momentum)
        torch._foreach_add_(mus, grads)
        if isinstance(lr, torch.Tensor):  # compiled path: a tensor lr does not trigger a recompile per value
            torch._foreach_sub_(params, torch._foreach_mul(mus, lr))
        else:
            torch._foreach_add_(params, mus, alpha=-lr)
        return
    # The same arithmetic out of place, then kept or dropped per tensor on the device.
    new_mus = torch._foreach_add(torch._foreach_mul(mus, momentum), grads)
    if isinstance(lr, torch.Tensor):
        new_params = torch._foreach_sub(params, torch._foreach_mul(new_mus, lr))
    else:
        new_params = torch._foreach_add(params, new_mus, alpha=-lr)
    for mu, new_mu, p, new_p in zip(mus, new_mus, params, new_params):
        torch.where(skip, mu, new_mu, out=mu)
        torch.where(skip, p, new_p, out=p)


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, weight_decay: float = 0, momentum: float = 0.9, eta: float = 0.001,
                 weight_decay_filter: bool = False, lars_adaptation_filter: bool = False, compile: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter, lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)
        self._compiled = compile
        self._lr_tensors: dict[int, torch.Tensor] = {}  # compiled path: each group's lr, refilled on the device
        # Inductor's loop reordering after fusion hits an internal assertion on this graph on CUDA
        # (seen with torch 2.11 on an H100; the pass never runs for CPU kernels); fusion itself stays on.
        self._update = (torch.compile(_lars_bucket_update, fullgraph=True, dynamic=False,
                                      options={"loop_ordering_after_fusion": False})
                        if compile else _lars_bucket_update)

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale and found_inf (module docstring)

    def _lr(self, index: int, group: dict, like: torch.Tensor) -> float | torch.Tensor:
        if not self._compiled:
            return group["lr"]
        if index not in self._lr_tensors:
            self._lr_tensors[index] = torch.zeros((), dtype=like.dtype, device=like.device)
        return self._lr_tensors[index].fill_(group["lr"])  # a kernel argument, not a host-to-device copy

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step only for the call
        found_inf = getattr(self, "found_inf", None)
        skip = found_inf > 0 if found_inf is not None else None
        inv_scale = grad_scale.double().reciprocal().float() if grad_scale is not None else None
        for index, group in enumerate(self.param_groups):
            buckets: dict[tuple[bool, bool], tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                excluded = exclude_bias_and_norm(p)
                flags = (not (group["weight_decay_filter"] and excluded),
                         not (group["lars_adaptation_filter"] and excluded))
                bucket = buckets.setdefault(flags, ([], [], []))
                bucket[0].append(p)
                bucket[1].append(p.grad)
                bucket[2].append(state["mu"])
            for (decay, adapt), (params, grads, mus) in buckets.items():
                if inv_scale is not None:
                    torch._foreach_mul_(grads, inv_scale)
                self._update(params, grads, mus, self._lr(index, group, params[0]), group["weight_decay"],
                             group["momentum"], group["eta"], decay, adapt, skip)
        return loss

"""The `optimizer` section: LARS step time and operations per step, three ways.

The official per-parameter loop (`reference_ms`), `bt_fast.optim.LARS` (`foreach_ms`) and
`LARS(compile=True)` (`fused_ms`), on random gradients of the --optimizer-params parameter set.
Operations per step: aten ops dispatched (TorchDispatchMode) for the eager two; for the compiled
one (a dispatch mode disables torch.compile) the profiler's count of inductor kernels plus aten
ops outside them (CPU), or of GPU kernels (CUDA); see `ops_counted`. The compile is reported
(`fused_compile_s`), not timed. `ops_growth_probe`: eager op counts with 8 and 32 tensors.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any, Callable

import torch

from bt_fast.optim import LARS
from tools.bench.measure import count_dispatched_ops, ratio, stats, sync, time_calls

OPTIMIZER_SETS = {  # name -> (arch, projector) of the model whose parameters are stepped; "small": 8 tensors
    "paper": ("resnet50", "8192-8192-8192"),
    "demo": ("resnet18", "512-512-512"),
    "small": None,
}
LARS_OPTIONS = dict(lr=0.0, weight_decay=1.5e-6, weight_decay_filter=True, lars_adaptation_filter=True)


@torch.no_grad()
def official_lars_step(groups: list[dict], state: dict, momentum: float = 0.9, eta: float = 0.001) -> None:
    """The official Barlow Twins LARS step, one tensor at a time, both filters on (1-D tensors excluded)."""
    for group in groups:
        for p in group["params"]:
            dp = p.grad
            if p.ndim != 1:
                dp = dp.add(p, alpha=group["weight_decay"])
                param_norm, update_norm = torch.norm(p), torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, eta * param_norm / update_norm, one),
                                one)
                dp = dp.mul(q)
            if p not in state:
                state[p] = torch.zeros_like(p)
            mu = state[p]
            mu.mul_(momentum).add_(dp)
            p.add_(mu, alpha=-group["lr"])


def optimizer_parameters(name: str, device: torch.device, seed: int) -> list[dict]:
    """Param groups (weights, biases/norms) with random gradients, as the trainer builds them."""
    from bt_fast.model import build_model
    from bt_fast.optim import param_groups
    torch.manual_seed(seed)
    if OPTIMIZER_SETS[name] is None:
        params = [torch.nn.Parameter(torch.randn(256, 256, device=device)) for _ in range(4)]
        params += [torch.nn.Parameter(torch.randn(256, device=device)) for _ in range(4)]
        groups = [{"params": params[:4]}, {"params": params[4:]}]
    else:
        arch, projector = OPTIMIZER_SETS[name]
        groups = param_groups(build_model(arch, projector, channels_last=False).to(device))
    for group, lr in zip(groups, (0.2, 0.0048)):
        group["lr"], group["weight_decay"] = lr, 1.5e-6
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    return groups


def count_compiled_ops(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Operations of one compiled step, from the profiler (a dispatch mode disables torch.compile).

    CUDA: GPU kernels launched (every kernel, fused or aten). CPU: inductor's fused C++ kernels
    (visible because they were compiled with `cpp.enable_kernel_profile`) plus the outermost aten
    ops run outside them.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    # The profiler's own log (read when it first starts) says "gpuGetDeviceCount failed" on a machine
    # without CUDA and narrates every start and stop: none of it is about the measurement.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.events()
    if device.type == "cuda":  # GPU only
        return sum(1 for e in events if e.device_type == DeviceType.CUDA), "GPU kernels launched (profiler)"

    def outermost_aten(e) -> bool:
        if not e.name.startswith("aten::"):
            return False
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::") or "cpp_fused" in parent.name:
                return False
            parent = parent.cpu_parent
        return True
    kernels = sum(1 for e in events if "cpp_fused" in e.name)
    aten = sum(1 for e in events if outermost_aten(e))
    return kernels + aten, f"inductor C++ kernels ({kernels}) + outermost aten ops outside them ({aten}) (profiler)"


def _free(*states: dict) -> None:
    for s in states:
        s.clear()
    gc.collect()
    if torch.cuda.is_available():  # GPU only
        torch.cuda.empty_cache()


def ops_growth_probe(device: torch.device) -> dict:
    """Dispatched ops per step of the official loop and the foreach LARS with n and 4n small tensors."""
    counts: dict[str, list[int]] = {"reference": [], "foreach": []}
    sizes = [8, 32]
    for n in sizes:
        params = [torch.nn.Parameter(torch.randn(16, 16, device=device)) for _ in range(n // 2)]
        params += [torch.nn.Parameter(torch.randn(16, device=device)) for _ in range(n // 2)]
        for p in params:
            p.grad = torch.randn_like(p)
        groups = [{"params": params[: n // 2], "lr": 0.1, "weight_decay": 1e-4},
                  {"params": params[n // 2:], "lr": 0.1, "weight_decay": 1e-4}]
        state: dict = {}
        official_lars_step(groups, state)  # creates the momentum buffers
        counts["reference"].append(count_dispatched_ops(lambda: official_lars_step(groups, state)))
        opt = LARS(groups, lr=0.1, weight_decay=1e-4, weight_decay_filter=True, lars_adaptation_filter=True)
        opt.step()
        counts["foreach"].append(count_dispatched_ops(opt.step))
    return {"tensors": sizes, **counts}


def _time_compiled(groups: list[dict], device: torch.device, reps: int) -> dict[str, Any]:
    """fused_* figures of `LARS(compile=True)`: compile seconds, operations counted, step times."""
    from torch._inductor import config as inductor_config
    compiled = LARS(groups, compile=True, **LARS_OPTIONS)
    # Kernel profiling makes inductor's C++ kernels visible to the profiler (one RECORD_FUNCTION per
    # kernel call, negligible); it is part of the compile, hence of the cache key.
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        t0 = time.perf_counter()
        compiled.step()  # compiles (or loads from the inductor cache)
        sync(device)
        out: dict[str, Any] = {"fused_compile_s": time.perf_counter() - t0}
    out["fused_ops_per_step"], out["fused_ops_counted"] = count_compiled_ops(compiled.step, device)
    out["fused_ms"] = stats([1000 * s for s in time_calls(compiled.step, device, reps, warmup=0)])
    _free(compiled.state)
    return out


def bench_optimizer(args: argparse.Namespace) -> dict:
    device = args.device
    groups = optimizer_parameters(args.optimizer_params, device, args.seed)
    params = [p for g in groups for p in g["params"]]
    out: dict[str, Any] = {
        "parameter_set": args.optimizer_params,
        "model": ("8 synthetic tensors" if OPTIMIZER_SETS[args.optimizer_params] is None
                  else "+".join(OPTIMIZER_SETS[args.optimizer_params])),
        "parameters": sum(p.numel() for p in params), "tensors": len(params), "reps": args.reps,
    }
    # Each variant: momentum buffers first (the optimizers' warm-up step creates them; the compiled
    # one also compiles there), then one step with its operations counted, then the timed steps.
    state: dict = {p: torch.zeros_like(p) for p in params}  # what its first step would create
    out["reference_ops_per_step"] = count_dispatched_ops(lambda: official_lars_step(groups, state))
    seconds = time_calls(lambda: official_lars_step(groups, state), device, args.reps, warmup=0)
    out["reference_ms"] = stats([1000 * s for s in seconds])
    _free(state)

    foreach = LARS(groups, **LARS_OPTIONS)
    foreach.step()
    out["foreach_ops_per_step"] = count_dispatched_ops(foreach.step)
    out["foreach_ms"] = stats([1000 * s for s in time_calls(foreach.step, device, args.reps, warmup=0)])
    _free(foreach.state)
    del foreach

    out.update(_time_compiled(groups, device, args.reps))
    del groups, params
    gc.collect()
    out["ops_counted"] = ("reference/foreach: aten ops dispatched per step (TorchDispatchMode); "
                          "fused: " + out["fused_ops_counted"])
    out["speedup"] = ratio(out["reference_ms"], out["fused_ms"])
    out["foreach_speedup"] = ratio(out["reference_ms"], out["foreach_ms"])
    out["ops_growth_probe"] = ops_growth_probe(device)
    return out

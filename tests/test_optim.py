import copy
import math

import pytest
import torch

from bt_fast.optim import LARS


@torch.no_grad()
def official_lars_step(params, state, lr, weight_decay, momentum=0.9, eta=0.001):
    """The official Barlow Twins LARS loop, with both filters on (1-D tensors excluded)."""
    for p in params:
        dp = p.grad
        if p.ndim != 1:
            dp = dp.add(p, alpha=weight_decay)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, eta * param_norm / update_norm, one), one)
            dp = dp.mul(q)
        mu = state.setdefault(id(p), torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (8,), (8,), (16, 8, 1, 1), (16,), (10, 16), (10,)]
    params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    with torch.no_grad():
        params[2].zero_()  # a zero tensor exercises the ||p|| == 0 branch
    return params


def gradients(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


@pytest.mark.parametrize("compile", [False, True], ids=["foreach", "compiled"])
def test_matches_official_loop_over_50_steps(compile):
    ours, reference = make_params(), make_params()
    opt = LARS([{"params": ours[::2]}, {"params": ours[1::2]}], lr=0.1, weight_decay=1e-2,
               weight_decay_filter=True, lars_adaptation_filter=True, compile=compile)
    state = {}
    for step in range(50):
        lr = 0.5 * (1 + math.cos(math.pi * step / 50))
        for group in opt.param_groups:
            group["lr"] = lr
        for p, q, g in zip(ours, reference, gradients(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
            if step == 7:
                p.grad.zero_(), q.grad.zero_()  # exercises the ||g|| == 0 branch
        opt.step()
        official_lars_step(reference, state, lr, weight_decay=1e-2)
    for p, q in zip(ours, reference):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_without_filters_every_tensor_is_decayed_and_adapted():
    ours, reference = make_params(1), make_params(1)
    opt = LARS(ours, lr=0.05, weight_decay=1e-3)
    state = {}
    for step in range(5):
        for p, q, g in zip(ours, reference, gradients(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        with torch.no_grad():
            for q in reference:
                dp = q.grad.add(q, alpha=1e-3)
                pn, un = torch.norm(q), torch.norm(dp)
                dp = dp * (0.001 * pn / un if pn > 0 and un > 0 else 1.0)
                mu = state.setdefault(id(q), torch.zeros_like(q))
                mu.mul_(0.9).add_(dp)
                q.add_(mu, alpha=-0.05)
    for p, q in zip(ours, reference):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_op_count_does_not_grow_with_tensor_count():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    def ops_per_step(n_tensors):
        params = [torch.randn(4, 4, requires_grad=True) for _ in range(n_tensors)]
        params += [torch.randn(4, requires_grad=True) for _ in range(n_tensors)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = LARS(params, lr=0.1, weight_decay=1e-4, weight_decay_filter=True, lars_adaptation_filter=True)
        opt.step()  # creates the momentum buffers
        counter = CountOps()
        with counter:
            opt.step()
        return counter.count

    assert ops_per_step(3) == ops_per_step(60)


def test_works_under_grad_scaler(monkeypatch):
    """One step through GradScaler equals an unscaled step; an overflowing step is skipped, momenta included,
    and the scaler never decides on the host (its `.item()` path, `_maybe_opt_step`, is not taken)."""
    model = torch.nn.Linear(4, 3)
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def host_decision(*args, **kwargs):
        raise AssertionError("GradScaler read found_inf on the host")
    monkeypatch.setattr(scaler, "_maybe_opt_step", host_decision)
    opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-4)
    opt_twin = LARS(twin.parameters(), lr=0.1, weight_decay=1e-4)
    x = torch.randn(5, 4)
    scaler.scale(model(x).pow(2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    twin(x).pow(2).sum().backward()
    opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)

    before = [p.detach().clone() for p in model.parameters()]
    momenta = [opt.state[p]["mu"].clone() for p in model.parameters()]
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    scaler.step(opt)
    scaler.update()
    for p, b, mu in zip(model.parameters(), before, momenta):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["mu"], mu)
    assert scaler.get_scale() == 512.0

    # The next step continues as if the skipped one had never happened.
    opt.zero_grad()
    scaler.scale(model(x).pow(2).sum()).backward()
    scaler.step(opt)
    opt_twin.zero_grad()
    twin(x).pow(2).sum().backward()
    opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_state_dict_round_trip_continues_identically():
    def run(params, opt, steps):
        for step in steps:
            for p, g in zip(params, gradients(params, step)):
                p.grad = g
            opt.step()

    make_opt = lambda ps: LARS(ps, lr=0.1, weight_decay=1e-3, weight_decay_filter=True, lars_adaptation_filter=True)
    straight = make_params(2)
    opt = make_opt(straight)
    run(straight, opt, range(10))

    first = make_params(2)
    opt_first = make_opt(first)
    run(first, opt_first, range(5))
    saved_params = [p.detach().clone() for p in first]
    saved_state = copy.deepcopy(opt_first.state_dict())
    resumed = [p.requires_grad_() for p in saved_params]
    opt_resumed = make_opt(resumed)
    opt_resumed.load_state_dict(saved_state)
    run(resumed, opt_resumed, range(5, 10))
    for p, q in zip(straight, resumed):
        torch.testing.assert_close(p, q)


def test_the_official_code_on_w_gpus_trains_as_this_lars_with_w_times_the_decay_and_a_wth_of_the_bias_lr():
    """README: the official loss's plain all_reduce leaves DDP's averaged gradient at 1/W of the whole batch's.
    The trust ratio undoes that scale for the weights but not for their weight decay, nor for the biases (not
    adapted); so gradients g/W with (wd, bias lr) step exactly as g with (W * wd, bias lr / W)."""
    world, wd, lr_weights, lr_biases = 32, 1e-2, 0.2, 0.0048

    def run(scale: float, weight_decay: float, bias_lr: float) -> list[torch.Tensor]:
        params = make_params()
        opt = LARS([{"params": [p for p in params if p.ndim > 1], "lr": lr_weights},
                    {"params": [p for p in params if p.ndim == 1], "lr": bias_lr}], lr=0,
                   weight_decay=weight_decay, weight_decay_filter=True, lars_adaptation_filter=True)
        for step in range(5):
            for p, g in zip(params, gradients(params, step)):
                p.grad = g * scale
            opt.step()
        return params

    official = run(1 / world, wd, lr_biases)
    for p, q in zip(official, run(1.0, world * wd, lr_biases / world)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert any(not torch.allclose(p, q) for p, q in zip(official, run(1.0, wd, lr_biases)))  # the settings matter

"""Optimizer groups, LARS against a hand computation, the warmup + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from ssl_sec.config import OptimConfig
from ssl_sec.optim import LARS, build_optimizer, param_groups
from ssl_sec.schedules import lr_at


def test_no_weight_decay_on_bias_and_norm():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4  # two biases, BN weight and bias
    opt = build_optimizer(model, OptimConfig(name="sgd", weight_decay=1e-4))
    assert isinstance(opt, torch.optim.SGD)
    assert isinstance(build_optimizer(model, OptimConfig(name="lars")), LARS)


def test_lars_step_matches_hand_computation():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad = torch.tensor([[0.6, 0.8]])  # ||g|| = 1
    b.grad = torch.tensor([0.5])
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars_exclude": False},
                {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.2, momentum=0.9, eta=0.02)
    opt.step()
    trust = 0.02 * 5 / (1 + 0.1 * 5)
    update = trust * (torch.tensor([[0.6, 0.8]]) + 0.1 * torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.2 * update)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.2 * 0.5]))
    # Second step: momentum buffer = 0.9 * previous + new scaled gradient.
    w.grad = torch.tensor([[0.6, 0.8]])
    w_before = w.detach().clone()
    opt.step()
    w_norm = w_before.norm()
    trust2 = 0.02 * w_norm / (1 + 0.1 * w_norm)
    buf = 0.9 * update + trust2 * (torch.tensor([[0.6, 0.8]]) + 0.1 * w_before)
    torch.testing.assert_close(w.detach(), w_before - 0.2 * buf)


def test_lars_zero_weight_falls_back_to_plain_step():
    w = nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([{"params": [w], "weight_decay": 0.0, "lars_exclude": False}], lr=0.1).step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1))


def test_warmup_cosine_schedule():
    total, warm, lr = 100, 10, 0.8
    assert lr_at(0, total, warm, lr) == pytest.approx(0.08)
    assert lr_at(9, total, warm, lr) == pytest.approx(0.8)
    assert lr_at(10, total, warm, lr) == pytest.approx(0.8)
    assert lr_at(55, total, warm, lr) == pytest.approx(0.4)
    assert lr_at(100, total, warm, lr) == pytest.approx(0.0, abs=1e-12)
    mid = lr_at(55, total, warm, lr, min_lr_ratio=0.1)
    assert mid == pytest.approx(0.08 + 0.72 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(5, total, 0, lr) == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi * 0.05)))


def _loop_lars(params_groups, lr, momentum, eta, state):
    """LARS one tensor at a time (the formula as written in the paper): the reference for the
    multi-tensor implementation."""
    for group in params_groups:
        wd = group["weight_decay"]
        for p in group["params"]:
            g = p.grad + wd * p
            if not group["lars_exclude"]:
                w_norm, g_norm = p.norm(), p.grad.norm()
                if w_norm > 0 and g_norm > 0:
                    g = g * (eta * w_norm / (g_norm + wd * w_norm))
            buf = state.get(p)
            state[p] = g.clone() if buf is None else buf * momentum + g
            p.sub_(lr * state[p])


def test_multi_tensor_lars_equals_a_per_tensor_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 30 * 30, 4))
    twin = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 30 * 30, 4))
    twin.load_state_dict(model.state_dict())
    nn.init.zeros_(model[0].bias), nn.init.zeros_(twin[0].bias)  # a zero-norm tensor: ratio 1
    opt = build_optimizer(model, OptimConfig(name="lars", lr=0.3, weight_decay=1e-4))
    ref_groups, ref_state = param_groups(twin, 1e-4), {}
    x = torch.randn(16, 3, 32, 32)
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            m(x).square().mean().backward()
        opt.step()
        with torch.no_grad():
            _loop_lars(ref_groups, 0.3, 0.9, 0.02, ref_state)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

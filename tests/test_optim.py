"""Optimizer groups, LARS against a hand computation, the warmup + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from ssl_sec.config import OptimConfig
from ssl_sec.optim import LARS, build_optimizer, lr_at, param_groups


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

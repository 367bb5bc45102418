"""Optimizers (SGD, LARS) with no weight decay on biases and norm parameters (the schedule
that sets their learning rate is in ssl_sec/schedules.py)."""

from __future__ import annotations

import torch
from torch import nn

from .config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Biases and BatchNorm/LayerNorm parameters (all 1-D tensors) get no weight decay and
    are excluded from LARS adaptation, as in SimCLR, BYOL and solo-learn."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    For each parameter tensor not excluded: local_lr = eta * ||w|| / (||g|| + wd ||w||),
    the update uses lr * local_lr * (g + wd w). Excluded tensors (biases, norms) take a
    plain SGD step, as in the SimCLR reference implementation.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        # Multi-tensor (_foreach) ops: one launch per op for the whole group, not one per
        # parameter tensor. A per-tensor loop costs ~10 kernel launches x 60 tensors per
        # step, host time a GPU step at CIFAR scale cannot hide.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            wd, mom, eta = group["weight_decay"], group["momentum"], group["eta"]
            grads = [p.grad for p in params]
            # d = g + wd * w, new tensors (p.grad stays as backward left it)
            d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else \
                [g.clone() for g in grads]
            if not group["lars_exclude"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                # Where either norm is 0 (fresh zero-init layers) fall back to ratio 1;
                # torch.where keeps this on the device (no host sync).
                trust = torch.where((w_norm > 0) & (g_norm > 0),
                                    eta * w_norm / (g_norm + wd * w_norm), torch.ones_like(w_norm))
                torch._foreach_mul_(d, list(trust.unbind(0)))
            bufs, fresh = [], []
            for p, step_dir in zip(params, d, strict=True):
                state = self.state[p]
                if "momentum_buffer" in state:
                    bufs.append(state["momentum_buffer"])
                    fresh.append(step_dir)
                else:
                    state["momentum_buffer"] = step_dir  # first step: the buffer is d itself
            if bufs:
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, fresh)
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params],
                                alpha=-group["lr"])


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    for g in groups:
        g.pop("lars_exclude")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

"""Every value that changes over a run, as a pure function of where the run is: the
learning rate (pretraining and linear probe), the SEC weight and MoCo's momentum.
`progress` is the fraction of the run done, in [0, 1]."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float,
          min_lr_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to base_lr, then cosine decay to min_lr_ratio * base_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_decay(base_lr: float, epoch: int, milestones: list[int], gamma: float) -> float:
    """base_lr times gamma for each milestone epoch reached (the ImageNet linear protocol)."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def sec_weight(eta: float, ramp: str, progress: float) -> float:
    """eta(t): constant, or linear from 0 to eta over the run (docs/methods.md section 3)."""
    if ramp == "constant":
        return eta
    if ramp == "linear":
        return eta * min(max(progress, 0.0), 1.0)
    raise ValueError(f"unknown SEC ramp {ramp!r}")


def momentum_at(base: float, schedule: str, progress: float) -> float:
    """Constant m, or m cosine-increased to 1 over the run (BYOL, solo-learn)."""
    if schedule == "constant":
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0

"""The Circle-style re-weighted contrastive term (Sun et al. 2020) with one positive per
anchor: cross-entropy over logits gamma * alpha * (s - Delta), alpha detached."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Need
from ..losses import Similarities, circle_from
from .base import Term


@dataclass
class CircleOptions:
    weight: float = 0.0
    # margin / gamma: the best mean over 3 seeds of the sweep in eval/sweep_circle.py
    # (eval/RESULTS.md), as in the recipes.
    margin: float = 0.4
    gamma: float = 4.0

    def check(self, need: Need) -> None:
        need(self.weight >= 0, "weight", self.weight, ">= 0")
        need(0.0 <= self.margin <= 1.0, "margin", self.margin, "in [0, 1]")
        need(self.gamma > 0, "gamma", self.gamma, "> 0")

    def weight_at(self, progress: float) -> float:
        return self.weight


class Circle(Term):
    """A matrix term, fused with InfoNCE on the objective's fast path."""

    Options = CircleOptions
    reads = "similarities"

    def forward(self, s: Similarities) -> torch.Tensor:
        """s: sim (R, C) -> scalar, the mean over the R anchors."""
        return circle_from(s, self.options.margin, self.options.gamma)

"""InfoNCE (NT-Xent; Oord et al. 2018, Chen et al. 2020): cross-entropy of each anchor's
positive among its candidates, logits = cosine similarity / temperature."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Need
from ..losses import Similarities, info_nce_from
from .base import Term


@dataclass
class InfoNCEOptions:
    weight: float = 1.0
    temperature: float = 0.2

    def check(self, need: Need) -> None:
        need(self.weight >= 0, "weight", self.weight, ">= 0")
        need(self.temperature > 0, "temperature", self.temperature, "> 0")

    def weight_at(self, progress: float) -> float:
        return self.weight


class InfoNCE(Term):
    """A matrix term. The objective's fast path computes it fused with Circle
    (`losses.contrastive_losses`); this forward is the same value on its own."""

    Options = InfoNCEOptions
    reads = "similarities"

    def forward(self, s: Similarities) -> torch.Tensor:
        """s: sim (R, C) -> scalar, the mean over the R anchors."""
        return info_nce_from(s, self.options.temperature)

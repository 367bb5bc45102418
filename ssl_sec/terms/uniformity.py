"""Uniformity (Wang & Isola 2020, "Understanding Contrastive Representation Learning through
Alignment and Uniformity on the Hypersphere"): the log of the mean Gaussian potential over
all pairs of normalised embeddings,

    L_uniform = log mean_{i<j} exp(-t ||u_i - u_j||^2),   u = z / ||z||,

lowest when the embeddings spread evenly over the sphere. An embedding term beside SEC, which
constrains the norms that this term ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Need
from .base import Term


def uniformity_loss(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """z: (M, d) un-normalised embeddings, M >= 2 -> scalar.

    On the sphere ||u_i - u_j||^2 = 2 - 2 u_i.u_j, so the M(M-1)/2 pair distances come from
    one Gram matrix; the mean of exponentials is a log-sum-exp (no overflow or underflow
    for any t) minus the log of the pair count. Float32 math under autocast."""
    m = z.shape[0]
    u = F.normalize(z.float(), dim=1)
    i, j = torch.triu_indices(m, m, offset=1, device=u.device)
    sq = (2.0 - 2.0 * (u @ u.T))[i, j].clamp_min(0.0)
    return torch.logsumexp(-t * sq, dim=0) - torch.log(sq.new_tensor(float(i.numel())))


@dataclass
class UniformityOptions:
    weight: float = 0.0
    # t of the Gaussian potential (Wang & Isola use 2).
    t: float = 2.0
    # "projector" (z) or "backbone" (h).
    features: str = "projector"

    def check(self, need: Need) -> None:
        need(self.weight >= 0, "weight", self.weight, ">= 0")
        need(self.t > 0, "t", self.t, "> 0")
        need.choice("features", self.features, ("projector", "backbone"))

    def weight_at(self, progress: float) -> float:
        return self.weight


class Uniformity(Term):
    """An embedding term; this rank's embeddings only under DDP (a pair potential over the
    local batch, as the paper's code)."""

    Options = UniformityOptions
    reads = "embeddings"

    def forward(self, e: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        return uniformity_loss(e, self.options.t)

"""SEC, the spherical embedding constraint (Zhang et al. 2020): eta(t) * mean_i (||z_i|| - mu)^2.

As in the SEC authors' SSL code (Dyfine/SimCLR_pytorch_distributed): on the un-normalised
projector output, mu the detached batch mean norm, eta ramped linearly from 0 over the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Need
from ..distributed import all_reduce_mean
from ..losses import sec_loss
from ..schedules import sec_weight
from .base import Term


@dataclass
class SECOptions:
    # The weight eta (0 = off).
    eta: float = 0.0
    # "constant" or "linear" (0 -> eta over the run, as the SEC authors' SSL code).
    ramp: str = "constant"
    # "batch": mu = detached mean norm of the batch; "ema": mu kept in a checkpointed buffer.
    mu: str = "batch"
    momentum: float = 0.1
    # "projector" (z, default) or "backbone" (pooled features h). Also the norms the
    # training logs (diag/norm_*, the norm histogram) whether SEC is on or not.
    features: str = "projector"

    def check(self, need: Need) -> None:
        need(self.eta >= 0, "eta", self.eta, ">= 0")
        need.choice("ramp", self.ramp, ("constant", "linear"))
        need.choice("mu", self.mu, ("batch", "ema"))
        need(0.0 < self.momentum <= 1.0, "momentum", self.momentum, "in (0, 1]")
        need.choice("features", self.features, ("projector", "backbone"))

    def weight_at(self, progress: float) -> float:
        return sec_weight(self.eta, self.ramp, progress)


class SEC(Term):
    """An embedding term. Its one piece of state is mu's running mean (`mu: ema`): a
    registered buffer, so it is checkpointed with the model and restored on resume."""

    Options = SECOptions
    reads = "embeddings"

    def __init__(self, options: SECOptions):
        super().__init__(options)
        # 0 = not started (a mean norm is > 0). Not NaN: two identical runs' checkpoints
        # must compare equal tensor by tensor, and NaN != NaN.
        self.register_buffer("mu", torch.tensor(0.0))

    def target(self, norms: torch.Tensor) -> torch.Tensor:
        """mu for this step from the embeddings' norms (M,): the global batch's mean norm
        (the same on every rank: equal local batches), or its running mean."""
        batch_mu = all_reduce_mean(norms.detach().mean())
        if self.options.mu == "batch":
            return batch_mu
        if self.training:
            rho = self.options.momentum
            # First step: start the running mean at the batch mean, not at 0.
            # (NaN: the "not started" of checkpoints written before 0 took its place.)
            unset = (self.mu == 0) | torch.isnan(self.mu)
            self.mu.copy_(torch.where(unset, batch_mu, (1 - rho) * self.mu + rho * batch_mu))
        return self.mu.clone()

    def forward(self, e: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """e: (M, k) un-normalised embeddings; norms: their row norms when already computed
        (detached). Scalar."""
        e = e.float()
        norms = e.detach().norm(dim=1) if norms is None else norms
        return sec_loss(e, self.target(norms), norms)

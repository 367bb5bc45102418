"""Loss terms as pure functions (float32 math even under bf16 autocast), plus the Objective.

Notation (METHODS.md): z1, z2 are the un-normalised projector outputs of the two views,
Shape (N, d); u = z / ||z||; T the temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig


def _similarities(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of all 2N normalised vectors, diagonal excluded later. (2N, 2N)."""
    u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    return u @ u.T


def _positive_index(n: int, device: torch.device) -> torch.Tensor:
    """Row i of the (2N, 2N) matrix has its positive at i+N (first half) or i-N (second)."""
    idx = torch.arange(2 * n, device=device)
    return (idx + n) % (2 * n)


def info_nce_from_sim(sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent from a (2N, 2N) cosine similarity matrix of [u1; u2]. Scalar.

    Cross-entropy over each row with the self-similarity masked to -inf (never
    log(pos / (pos + neg)) on raw exponentials: that overflows and loses precision).
    """
    n2 = sim.shape[0]
    logits = sim / temperature
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=sim.device), float("-inf"))
    return F.cross_entropy(logits, _positive_index(n2 // 2, sim.device))


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR NT-Xent over the 2N anchors (each with one positive, 2N-2 negatives).

    Args:
        z1, z2: un-normalised projections of the two views. Shape (N, d).
        temperature: T > 0.
    Returns:
        Scalar mean loss over the 2N anchors; equals lightly's NTXentLoss(T)(z1, z2).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return info_nce_from_sim(_similarities(z1, z2), temperature)


def sec_loss(z: torch.Tensor, mu: torch.Tensor | float | None = None) -> torch.Tensor:
    """Spherical embedding constraint: mean_i (||z_i|| - mu)^2.

    Args:
        z: un-normalised embeddings. Shape (M, d).
        mu: target radius; None means the detached mean norm of `z` (the batch variant).
    Returns:
        Scalar. Its gradient w.r.t. z_i is purely radial: (2/M)(n_i - mu) z_i / n_i.
    """
    norms = z.float().norm(dim=1)
    if mu is None:
        mu = norms.detach().mean()
    return (norms - mu).pow(2).mean()


def sec_weight(eta: float, ramp: str, progress: float) -> float:
    """eta(t): constant, or linear from 0 to eta over the run (progress in [0, 1])."""
    if ramp == "constant":
        return eta
    if ramp == "linear":
        return eta * min(max(progress, 0.0), 1.0)
    raise ValueError(f"unknown SEC ramp {ramp!r}")


@dataclass
class Terms:
    """What a method's step returns: named loss terms (total included) and diagnostics."""

    losses: dict[str, torch.Tensor]
    diagnostics: dict[str, torch.Tensor]
    # Norms of the embeddings SEC looks at, (M,), for the norm histogram.
    norms: torch.Tensor | None = None


class Objective(nn.Module):
    """L = w_infonce * InfoNCE + eta(t) * SEC, from one similarity matrix per step.

    The only state is SEC's running mu (EMA variant), a registered buffer so that it is
    checkpointed with the model and restored exactly on resume.
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("sec_mu", torch.tensor(float("nan")))

    def _sec_mu(self, norms: torch.Tensor) -> torch.Tensor:
        batch_mu = norms.detach().mean()
        if self.cfg.sec_mu == "batch":
            return batch_mu
        if self.training:
            rho = self.cfg.sec_momentum
            # First step: start the running mean at the batch mean, not at 0.
            new = batch_mu if torch.isnan(self.sec_mu) else (1 - rho) * self.sec_mu + rho * batch_mu
            self.sec_mu.copy_(new)
        return self.sec_mu.clone()

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, sec_input: torch.Tensor,
                progress: float) -> Terms:
        """z1, z2: (N, d) projections; sec_input: (M, k) what SEC constrains; progress in [0,1]."""
        cfg = self.cfg
        sim = _similarities(z1, z2)
        losses: dict[str, torch.Tensor] = {}
        total = sim.new_zeros(())
        if cfg.w_infonce > 0:
            losses["infonce"] = info_nce_from_sim(sim, cfg.temperature)
            total = total + cfg.w_infonce * losses["infonce"]
        eta = sec_weight(cfg.sec_eta, cfg.sec_ramp, progress)
        norms = sec_input.float().norm(dim=1)
        if cfg.sec_eta > 0:
            losses["sec"] = sec_loss(sec_input, self._sec_mu(norms))
            total = total + eta * losses["sec"]
        losses["total"] = total
        diagnostics = _diagnostics(sim.detach(), z1, z2, norms.detach())
        diagnostics["sec_weight"] = sim.new_tensor(eta)
        return Terms(losses, diagnostics, norms.detach())


@torch.no_grad()
def _diagnostics(sim: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                 norms: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse and norm detectors, all on-device tensors (no host sync here)."""
    n2 = sim.shape[0]
    pos_idx = _positive_index(n2 // 2, sim.device)
    pos = sim[torch.arange(n2, device=sim.device), pos_idx]
    eye = torch.eye(n2, dtype=torch.bool, device=sim.device)
    # Mean over the 2N-2 negatives of each row: all off-diagonal entries minus the positive.
    neg_mean = ((sim.sum() - sim.diagonal().sum() - pos.sum()) / (n2 * (n2 - 2)))
    # Contrastive top-1: is the positive the most similar of the other 2N-1 vectors?
    top1 = (sim.masked_fill(eye, float("-inf")).argmax(dim=1) == pos_idx).float().mean() * 100
    u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    mean, std = norms.mean(), norms.std()
    return {
        "norm_mean": mean,
        "norm_std": std,
        "norm_cv": std / mean.clamp_min(1e-12),
        "pos_sim": pos.mean(),
        "neg_sim": neg_mean,
        "contrastive_top1": top1,
        # 1/sqrt(d) for a healthy spread over the sphere, 0 under complete collapse.
        "z_dim_std": u.std(dim=0).mean(),
        "z_dim_std_ideal": u.new_tensor(1.0 / math.sqrt(u.shape[1])),
    }


"""The objective: a weighted sum of terms (ssl_sec/terms/), each from its recipe section
`loss.<term>`, plus the step's monitoring statistics.

    L = sum over matrix terms  w_t * term(similarities)          (InfoNCE, Circle)
      + sum over embedding terms w_t(progress) * term(embeddings)   (SEC)

A term whose weight is 0 is not computed. When the matrix terms are InfoNCE and/or Circle
(every shipped recipe), they are computed in one fused pass over the matrix
(`losses.contrastive_losses`, the fast path); any other matrix term makes each term compute
its own value (the plain path; tests check both agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .losses import Similarities, contrastive_losses
from .terms import TERMS

# The matrix terms the fused kernel computes.
FUSED = ("infonce", "circle")


@dataclass
class Terms:
    """What a method's step returns: named loss terms (total included) and diagnostics."""

    losses: dict[str, torch.Tensor]
    diagnostics: dict[str, torch.Tensor]
    # Norms of the embeddings SEC looks at, (M,), for the norm histogram.
    norms: torch.Tensor | None = None


class Objective(nn.Module):
    """Every registered term, built from `loss` (the recipe's loss section: one sub-section
    per term). Terms with state (SEC's running mu) are submodules: their buffers are
    checkpointed with the model."""

    def __init__(self, loss: Any, fused: bool = True):
        super().__init__()
        self.terms = nn.ModuleDict({name: term(getattr(loss, name))
                                    for name, term in TERMS.items()})
        matrix = [n for n, t in self.terms.items() if t.reads == "similarities" and _active(t)]
        # The fast path covers the matrix terms when they are all fusable.
        self.fused = fused and all(n in FUSED for n in matrix)
        # The norms the logs show (and SEC constrains): the projector's or the backbone's.
        self.norms_on = loss.sec.features

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints before the terms were modules held SEC's mu as `objective.sec_mu`.
        old = state_dict.pop(prefix + "sec_mu", None)
        if old is not None:
            state_dict.setdefault(prefix + "terms.sec.mu", old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, s: Similarities, z: torch.Tensor, h: torch.Tensor, progress: float,
                diagnostics: bool = True) -> Terms:
        """s: the step's similarities; z: (M, d) un-normalised projections; h: (M, D) the
        backbone's features of the same images; progress in [0, 1]. `diagnostics=False`
        skips the monitoring statistics (the loop asks for them only on the steps it logs,
        keeping them out of the hot path)."""
        total, losses = self._matrix_terms(s, progress)
        inputs = {"projector": z, "backbone": h}
        norms = inputs[self.norms_on].float().detach().norm(dim=1)
        for name, term in self.terms.items():
            weight = term.options.weight_at(progress)
            if term.reads != "embeddings" or not _active(term):
                continue
            e = inputs[term.options.features].float()
            losses[name] = term(e, norms if term.options.features == self.norms_on else None)
            total = total + weight * losses[name]
        losses["total"] = total
        diag: dict[str, torch.Tensor] = {}
        if diagnostics:
            diag = _diagnostics(s, z, norms)
            diag["sec_weight"] = s.sim.new_tensor(self.terms["sec"].options.weight_at(progress))
        return Terms(losses, diag, norms)

    def _matrix_terms(self, s: Similarities, progress: float
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the matrix terms (it carries the gradient) and each term's
        value, detached, for logging."""
        if self.fused:
            nce, circle = self.terms["infonce"].options, self.terms["circle"].options
            return contrastive_losses(s, nce.temperature, nce.weight,
                                      (circle.margin, circle.gamma), circle.weight)
        total, values = s.sim.new_zeros(()), {}
        for name, term in self.terms.items():
            if term.reads == "similarities" and _active(term):
                value = term(s)
                total = total + term.options.weight_at(progress) * value
                values[name] = value.detach()
        return total, values


def need_matrix_term(loss: Any, need: Any) -> None:
    """A method that contrasts pairs needs at least one matrix term with a weight."""
    weights = {name: getattr(loss, name).weight_at(1.0) for name, t in TERMS.items()
               if t.reads == "similarities"}
    if not any(w > 0 for w in weights.values()):
        others = " or ".join(f"loss.{n}.weight > 0" for n in list(weights)[1:])
        need(False, "loss.infonce.weight", loss.infonce.weight,
             f"> 0 unless {others} (a contrastive term is needed)")


def _active(term: nn.Module) -> bool:
    """A term with weight 0 over the whole run (a ramp starts at 0) is not computed."""
    return term.options.weight_at(1.0) > 0


@torch.no_grad()
def _diagnostics(s: Similarities, embeddings: torch.Tensor, norms: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """Collapse and norm detectors, all on-device tensors (no host sync here)."""
    sim = s.sim.detach()
    candidates = s.masked(sim.clone())
    pos = sim.gather(1, s.pos[:, None])
    neg_mask = torch.isfinite(candidates) & ~s.pos_mask()
    neg_mean = (sim * neg_mask).sum() / neg_mask.sum().clamp_min(1)
    # Contrastive top-1: is the positive the most similar valid candidate?
    top1 = (candidates.argmax(dim=1) == s.pos).float().mean() * 100
    u = F.normalize(embeddings.detach().float(), dim=1)
    mean, std = norms.mean(), norms.std()
    return {
        "norm_mean": mean,
        "norm_std": std,
        "norm_cv": std / mean.clamp_min(1e-12),
        "pos_sim": pos.mean(),
        "neg_sim": neg_mean,
        "contrastive_top1": top1,
        # About 1/sqrt(d) for embeddings spread over the sphere, 0 under complete collapse.
        "z_dim_std": u.std(dim=0).mean(),
        "z_dim_std_ideal": u.new_tensor(1.0 / math.sqrt(u.shape[1])),
    }

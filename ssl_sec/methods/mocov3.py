"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"), ResNet form: a query encoder with a predictor, a momentum key encoder, and
a symmetric contrastive loss whose negatives are the other keys of the batch (no queue).

    q1 = predictor(projector(backbone(x1)))        k2 = momentum_encoder(x2)   (no grad)
    loss = ctr(q1, k2) + ctr(q2, k1),  ctr(q, k) = CE(q.k^T / T, diagonal)  (x 2T in the paper)

The objective here is the mean InfoNCE over both directions' 2N anchors, i.e. the paper's
loss / (4 T): a constant factor the learning rate absorbs (tests/test_mocov3.py checks
the value and gradient against a loop over the paper's pseudocode). SEC, Circle and
uniformity apply to the queries q as to any method's embeddings.

The momentum encoder is moved by the loop after the optimizer step (the paper moves it at
the start of the next step: the same sequence of weights), with the cosine schedule
m(t) = 1 - (1 - m0)(cos(pi t) + 1) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config import Need
from ..distributed import gather, rank
from ..losses import Similarities
from ..models import Encoder, ema_update, mlp, momentum_copy
from ..objective import Objective, Terms
from ..schedules import momentum_at
from .base import ContrastiveMethod

if TYPE_CHECKING:
    from ..recipe import Config


@dataclass
class MocoV3Options:
    """The recipe's `mocov3:` section (the heads' sizes are model.proj_hidden_dim and
    model.proj_output_dim: 4096 and 256 in the paper)."""

    momentum: float = 0.99
    # "cosine": increased to 1 over the run (the paper); "constant".
    momentum_schedule: str = "cosine"
    pred_hidden_dim: int = 4096

    def check(self, need: Need) -> None:
        need(0.0 <= self.momentum <= 1.0, "momentum", self.momentum, "in [0, 1]")
        need.choice("momentum_schedule", self.momentum_schedule, ("constant", "cosine"))
        need(self.pred_hidden_dim >= 1, "pred_hidden_dim", self.pred_hidden_dim, ">= 1")


def key_similarities(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor
                     ) -> Similarities:
    """Both directions as rows: anchors q1 against the keys k2 of every rank's batch, then q2
    against k1. Shapes: q, k (N, d) local -> sim (2N, N * world), positive at rank * N + i.
    The keys carry no gradient (the momentum encoder's): they are gathered without."""
    n = q1.shape[0]
    u = F.normalize(torch.cat([q1, q2]).float(), dim=1)
    keys = [gather(F.normalize(k.float(), dim=1)) for k in (k2, k1)]
    sim = torch.cat([u[:n] @ keys[0].T, u[n:] @ keys[1].T])
    local = torch.arange(n, device=u.device) + rank() * n
    return Similarities(sim, pos=torch.cat([local, local]))


class MoCoV3(ContrastiveMethod):
    """A `Method` (ssl_sec/methods/base.py)."""

    sync_bn = True  # BN of the heads over the global batch, as the paper's SyncBN
    Options = MocoV3Options

    def __init__(self, cfg: Config):
        super().__init__()
        m, o = cfg.model, cfg.mocov3
        self.cfg = o
        # The paper's ResNet heads: 2-layer projector and predictor, BN after every Linear,
        # the projector's last BN without affine parameters, the predictor's last layer bare.
        self.encoder = Encoder(m, lambda d: mlp([d, m.proj_hidden_dim, m.proj_output_dim],
                                                last_bn=True, last_affine=False),
                               image_size=cfg.augment.size)
        self.predictor = mlp([m.proj_output_dim, o.pred_hidden_dim, m.proj_output_dim],
                             bias=False)
        self.momentum_encoder = momentum_copy(self.encoder)
        self.objective = Objective(cfg.loss)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, progress: float,
                diagnostics: bool = True) -> Terms:
        """v1, v2: augmented views (N,3,h,w). Each view through the query encoder and the
        predictor, and through the momentum encoder; each its own BN batch, as the paper."""
        h1, z1 = self.encoder(v1)
        h2, z2 = self.encoder(v2)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.momentum_encoder(v1)[1]
            k2 = self.momentum_encoder(v2)[1]
        s = key_similarities(q1, q2, k1, k2)
        return self.objective(s, torch.cat([q1, q2]), torch.cat([h1, h2]), progress,
                              diagnostics)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """After the optimizer step: the momentum encoder follows the query encoder
        (backbone and projector; the predictor has no momentum twin)."""
        ema_update(self.momentum_encoder, self.encoder,
                   momentum_at(self.cfg.momentum, self.cfg.momentum_schedule, progress))

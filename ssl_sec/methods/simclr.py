"""SimCLR (Chen et al. 2020): in-batch negatives, one encoder for both views."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..losses import pairwise_similarities
from ..models import Encoder, mlp
from ..objective import Objective, Terms, need_matrix_term

if TYPE_CHECKING:
    from ..config import Need
    from ..recipe import Config


class SimCLR(nn.Module):
    """A `Method` (ssl_sec/methods/base.py)."""

    sync_bn = True  # BN over the global batch, as SimCLR's global BN
    Options = None  # no section of its own

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        # lightly's SimCLRProjectionHead (2 layers): Linear-BN-ReLU-Linear-BN.
        self.encoder = Encoder(m, lambda d: mlp([d, m.proj_hidden_dim, m.proj_output_dim],
                                                last_bn=True), image_size=cfg.augment.size)
        self.objective = Objective(cfg.loss)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, progress: float,
                diagnostics: bool = True) -> Terms:
        """v1, v2: augmented views (N,3,h,w); progress: fraction of the run done, in [0, 1]."""
        # One pass over both views: BatchNorm normalises over all 2N images (as SimCLR's
        # global BN does across devices) and the convolutions run on one larger batch.
        h, z = self.encoder(torch.cat([v1, v2]))
        z1, z2 = z.chunk(2)
        return self.objective(pairwise_similarities(z1, z2), z, h, progress, diagnostics)

    @staticmethod
    def check_config(cfg: Config, need: Need) -> None:
        need_matrix_term(cfg.loss, need)

    def after_step(self, progress: float) -> None:
        """SimCLR has no momentum encoder or queue: nothing to update after the optimizer."""

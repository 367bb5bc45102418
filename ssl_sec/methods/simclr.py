"""SimCLR (Chen et al. 2020): in-batch negatives, one encoder for both views."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..losses import Objective, Terms, pairwise_similarities
from ..models import Encoder


class SimCLR(nn.Module):
    """A `Method` (ssl_sec/methods/base.py)."""

    sync_bn = True  # BN over the global batch, as SimCLR's global BN

    def __init__(self, cfg: Config):
        super().__init__()
        self.sec_on = cfg.loss.sec_on
        self.encoder = Encoder(cfg.model, image_size=cfg.augment.size)
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
        sims = pairwise_similarities(z1, z2)
        return self.objective(sims, z, z if self.sec_on == "projector" else h, progress,
                              diagnostics)

    @staticmethod
    def check_config(cfg: Config, need) -> None:
        """Nothing beyond the shared checks."""

    def after_step(self, progress: float) -> None:
        """SimCLR has no momentum encoder or queue: nothing to update after the optimizer."""

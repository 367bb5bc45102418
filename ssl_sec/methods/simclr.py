"""SimCLR (Chen et al. 2020): in-batch negatives, one encoder for both views."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..losses import pairwise_similarities
from ..models import Encoder, mlp
from ..objective import Objective, Terms
from .base import ContrastiveMethod

if TYPE_CHECKING:
    from ..recipe import Config


class SimCLR(ContrastiveMethod):
    """A `Method` (ssl_sec/methods/base.py). BN over the global batch (sync_bn), as SimCLR's
    global BN; no options of its own; nothing to update after the step."""

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        # lightly's SimCLRProjectionHead (2 layers): Linear-BN-ReLU-Linear-BN.
        self.encoder = Encoder(m, lambda d: mlp([d, m.proj_hidden_dim, m.proj_output_dim],
                                                last_bn=True), image_size=cfg.augment.size)
        self.objective = Objective(cfg.loss)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, progress: float,
                diagnostics: bool = True) -> Terms:
        """v1, v2: augmented views (N,3,h,w); progress: fraction of the run done, in [0, 1]."""
        # One pass over both views: BatchNorm normalises over all 2N images (as SimCLR's
        # global BN does across devices) and the convolutions run on one larger batch.
        h, z = self.encoder(torch.cat([v1, v2]))
        z1, z2 = z.chunk(2)
        return self.objective(pairwise_similarities(z1, z2), z, h, progress, diagnostics)

"""What the training loop, the checkpoints and the evaluations rely on a method for.

A method is an `nn.Module` registered by name in `ssl_sec.methods.METHODS` (the one list
of method names: ssl_sec/recipe.py validates `method` against it). Adding one means one file
that satisfies `Method` (its options, heads, objective and post-step update) and one line in
that registry: its options become the recipe section named after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import nn

from ..objective import need_matrix_term

if TYPE_CHECKING:
    from ..config import Need
    from ..models import Encoder
    from ..objective import Terms
    from ..recipe import Config


class Method(Protocol):
    # Whether BatchNorm should see the global batch across GPUs (SyncBN under DDP).
    # SimCLR: yes; MoCo: no (its split-BN is per process).
    sync_bn: ClassVar[bool]
    # The dataclass of its own options, the recipe section named after the method (a
    # `check(need)` method checks its fields), or None.
    Options: ClassVar[type | None]
    # The online encoder: `encoder.backbone` is what evaluation and export read (the
    # checkpoint keys `encoder.backbone.*`), `encoder.projector` the head.
    encoder: Encoder

    def __init__(self, cfg: Config) -> None: ...

    @property
    def backbone(self) -> nn.Module: ...

    @staticmethod
    def check_config(cfg: Config, need: Need) -> None:
        """Checks that span its options and other sections (called once, when the recipe
        loads, after every section checked its own fields)."""

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, progress: float,
                diagnostics: bool = True) -> Terms:
        """Two augmented views (N, 3, h, w) -> the step's loss terms (`Terms.losses["total"]`
        is what the loop back-propagates); progress in [0, 1]; `diagnostics` asks for the
        monitoring statistics (only on logged steps)."""

    def after_step(self, progress: float) -> None:
        """Called by the loop after each optimizer step that was taken (momentum encoder,
        queue); never inside the autograd graph."""


class ContrastiveMethod(nn.Module):
    """What the contrastive methods share: the evaluated backbone is the online encoder's,
    the objective needs a matrix term, and by default nothing happens after the step."""

    sync_bn: ClassVar[bool] = True
    Options: ClassVar[type | None] = None
    encoder: Encoder

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    @staticmethod
    def check_config(cfg: Config, need: Need) -> None:
        need_matrix_term(cfg.loss, need)

    def after_step(self, progress: float) -> None:
        """No momentum encoder or queue: nothing to update after the optimizer step."""

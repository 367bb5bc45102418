"""What the training loop, the checkpoints and the evaluations rely on a method for.

A method is an `nn.Module` registered by name in `ssl_sec.methods.METHODS` (the one list
of method names: config validates `method` against it). Adding one means writing a module
that satisfies `Method` and adding one line to that registry (plus a config section, if it
has hyper-parameters of its own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import Config
    from ..losses import Terms
    from ..models import Encoder

# need(ok, key, value, rule): raises the recipe error "key=value is out of range: it must
# be rule" when `ok` is false.
Need = Callable[[bool, str, Any, str], None]


class Method(Protocol):
    # Whether BatchNorm should see the global batch across GPUs (SyncBN under DDP).
    # SimCLR: yes; MoCo: no (its split-BN is per process).
    sync_bn: ClassVar[bool]
    # The online encoder: `encoder.backbone` is what evaluation and export read (the
    # checkpoint keys `encoder.backbone.*`), `encoder.projector` the head.
    encoder: Encoder

    def __init__(self, cfg: Config) -> None: ...

    @property
    def backbone(self) -> nn.Module: ...

    @staticmethod
    def check_config(cfg: Config, need: Need) -> None:
        """Recipe checks that only this method needs (called once, when the recipe loads)."""

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, progress: float,
                diagnostics: bool = True) -> Terms:
        """Two augmented views (N, 3, h, w) -> the step's loss terms (`Terms.losses["total"]`
        is what the loop back-propagates); progress in [0, 1]; `diagnostics` asks for the
        monitoring statistics (only on logged steps)."""

    def after_step(self, progress: float) -> None:
        """Called by the loop after each optimizer step that was taken (momentum encoder,
        queue); never inside the autograd graph."""

"""The encoder (a backbone from ssl_sec/archs.py and a head the method builds with `mlp`),
momentum copies and split BatchNorm."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from lightly.models.modules.heads import ProjectionHead
from torch import nn
from torch.nn import functional as F

from .archs import build_backbone

if TYPE_CHECKING:
    from .config import ModelConfig


def mlp(dims: Sequence[int], batch_norm: bool = True, last_bn: bool = False,
        last_affine: bool = True, bias: bool | None = None) -> nn.Module:
    """The heads every method builds: lightly's `ProjectionHead` of Linear(-BN)-ReLU blocks
    through `dims` (in, hidden..., out), the last block Linear(-BN) without activation.

    A Linear followed by BN has no bias (BN's shift replaces it) unless `bias` says for
    every Linear. SimCLR's projector:
    mlp([D, 2048, 128], last_bn=True) (lightly's SimCLRProjectionHead); MoCo v2's:
    mlp([D, 2048, 128], batch_norm=False) (BN in its head would leak the positive pair
    through batch statistics); MoCo v3's last BN has no affine parameters."""
    blocks = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
        last = i == len(dims) - 2
        bn = (nn.BatchNorm1d(b, affine=last_affine) if last_bn else None) if last else \
            (nn.BatchNorm1d(b) if batch_norm else None)
        block = (a, b, bn, None if last else nn.ReLU())
        blocks.append(block if bias is None else (*block, bias))
    return ProjectionHead(blocks)


class Encoder(nn.Module):
    """Backbone + projector; forward returns (h, z): pooled features (B,D), projection (B,d).
    `head` builds the projector from the backbone's feature dimension D."""

    def __init__(self, cfg: ModelConfig, head: Callable[[int], nn.Module], image_size: int = 224):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(cfg.arch, cfg.cifar_stem, image_size)
        self.projector = head(self.feat_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, self.projector(h)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy for a momentum (EMA) encoder: no gradients, updated by the loop."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_o for every parameter, as one fused lerp over the
    whole list (theta_t + (1 - m)(theta_o - theta_t): one pass over the weights, not a
    multiply and an add).

    BatchNorm running statistics are not averaged: the momentum encoder keeps its own, from
    its own forward passes, as in MoCo's reference code.
    """
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - momentum)


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises `num_splits` groups of the batch separately.

    MoCo's single-GPU remedy (its CIFAR demo): with one BN over the whole batch the key
    encoder's batch statistics leak which key belongs to which query. Sample n falls in
    group n % num_splits. Evaluation uses the shared running statistics as usual.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        if n % s:
            raise ValueError(f"SplitBatchNorm: batch {n} is not a multiple of {s} splits")
        mean = self.running_mean.repeat(s)
        var = self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, c * s, h, w), mean, var, self.weight.repeat(s),
                           self.bias.repeat(s), True, self.momentum or 0.1, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out.reshape(n, c, h, w).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a SplitBatchNorm with its state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps,
                                   momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_split_bn(child, num_splits)
    return module

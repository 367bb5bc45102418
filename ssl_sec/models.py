"""Backbones (torchvision ResNets, optional CIFAR stem) and projection heads."""

from __future__ import annotations

import copy

import torch
import torchvision
from lightly.models.modules.heads import SimCLRProjectionHead
from torch import nn

from .config import ModelConfig
from .errors import ConfigError

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def build_backbone(arch: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier: images (B,3,H,W) -> pooled features (B,D).

    The CIFAR stem (3x3 stride-1 conv1, no max-pool) keeps 32x32 inputs at full resolution
    through the first stage, as in SimCLR's and MoCo's CIFAR experiments.
    """
    if arch not in FEATURE_DIMS:
        raise ConfigError(f"model.arch={arch!r} is unknown; use one of {', '.join(FEATURE_DIMS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, FEATURE_DIMS[arch]


def build_projector(in_dim: int, cfg: ModelConfig) -> nn.Module:
    """SimCLR's 2-layer MLP head (Linear-BN-ReLU-Linear), taken from lightly."""
    return SimCLRProjectionHead(in_dim, cfg.proj_hidden_dim, cfg.proj_output_dim, num_layers=2)


class Encoder(nn.Module):
    """Backbone + projector; forward returns (h, z): pooled features (B,D), projection (B,d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(cfg.arch, cfg.cifar_stem)
        self.projector = build_projector(self.feat_dim, cfg)

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
    """theta_t <- m theta_t + (1 - m) theta_o for parameters; buffers (BN stats) are copied."""
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
        tb.copy_(ob)

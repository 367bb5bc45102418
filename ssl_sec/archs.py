"""Backbone architectures by name: every torchvision classification model (resnet*,
wide_resnet*, resnext*, convnext_*, vit_*, efficientnet_*, regnet_*, ...) and, when timm is
installed (`pip install 'ssl_sec[timm]'`), `timm:<name>` for any timm model.

A backbone is the classifier without its last Linear layer: images (B, 3, H, W) -> features
(B, D), D discovered from that layer (or timm's `num_features`), never from a table. The CIFAR
stem (3x3 stride-1 conv1, no max-pool: 32x32 images keep their resolution through the first
stage) is defined for the ResNet family only.
"""

from __future__ import annotations

import difflib
import functools

import torch
import torchvision
from torch import nn

from .errors import ConfigError

TIMM = "timm:"
RESNET_FAMILY = ("resnet", "wide_resnet", "resnext")


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """torchvision's classification models (not detection, segmentation or video)."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def has_cifar_stem(arch: str) -> bool:
    """Whether model.cifar_stem applies: ResNet-family conv1 + max-pool stems."""
    name = arch[len(TIMM):] if arch.startswith(TIMM) else arch
    return name.startswith(RESNET_FAMILY)


def check_arch(arch: str, cifar_stem: bool, key: str = "model.arch") -> None:
    """A ConfigError naming the closest valid names unless `arch` can be built."""
    if arch.startswith(TIMM):
        timm = _timm(arch, key)
        name = arch[len(TIMM):]
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(TIMM + c for c in close)}?)" if close else ""
            raise ConfigError(f"{key}={arch!r}: timm has no model {name!r}{hint}")
    elif arch not in torchvision_names():
        close = difflib.get_close_matches(arch, torchvision_names(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"{key}={arch!r} is not a torchvision classification model; {hint}"
                          "any name of torchvision.models.list_models(module=torchvision.models)"
                          " works, or timm:NAME with timm installed")
    if cifar_stem and not has_cifar_stem(arch):
        raise ConfigError(f"model.cifar_stem=true is defined for ResNet-family backbones "
                          f"(resnet*, wide_resnet*, resnext*), not {arch}; set "
                          "model.cifar_stem=false")


def build_backbone(arch: str, cifar_stem: bool, image_size: int = 224
                   ) -> tuple[nn.Module, int]:
    """The backbone of `arch` (random init) and its feature dimension D.

    image_size: the input side, for models built for one size (torchvision's ViTs).
    `arch` and `cifar_stem` come from a validated recipe (config calls `check_arch`).
    """
    assert not cifar_stem or has_cifar_stem(arch), arch
    if arch.startswith(TIMM):
        net = _timm(arch).create_model(arch[len(TIMM):], pretrained=False, num_classes=0)
        dim = int(net.num_features)
    else:
        kwargs = {"image_size": image_size} if arch.startswith("vit_") else {}
        net = torchvision.models.get_model(arch, weights=None, **kwargs)
        dim = _drop_last_linear(net)
        if has_cifar_stem(arch):
            # torchvision's AdaptiveAvgPool2d(1) has no deterministic CUDA backward.
            net.avgpool = GlobalAvgPool()
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1,
                              bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net, dim


def _drop_last_linear(net: nn.Module) -> int:
    """Replace the classifier's last Linear (fc, classifier[-1], heads.head) by Identity;
    returns its input size, the feature dimension."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, child = name.rpartition(".")
    owner = net.get_submodule(parent)
    dim = getattr(owner, child).in_features  # (a Sequential's items are named "0", "1", ...)
    setattr(owner, child, nn.Identity())
    return int(dim)


class GlobalAvgPool(nn.Module):
    """Mean over H and W, (B, C, H, W) -> (B, C, 1, 1): torchvision's AdaptiveAvgPool2d(1)
    without its CUDA backward, which has no deterministic implementation (so
    `deterministic: true` would refuse to train). The same values, no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


def _timm(arch: str, key: str = "model.arch"):
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{key}={arch!r} needs timm: pip install 'ssl_sec[timm]' (or pip "
                          "install timm)") from None
    return timm

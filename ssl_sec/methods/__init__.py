"""The methods: each turns two views into loss terms and owns its options, heads and state
(ssl_sec/methods/simclr.py, moco.py, mocov3.py). `METHODS` is the one registry of method
names."""

import torch

from .moco import MoCo
from .mocov3 import MoCoV3
from .simclr import SimCLR

METHODS = {"simclr": SimCLR, "moco": MoCo, "mocov3": MoCoV3}


def build_model(cfg, device: torch.device) -> torch.nn.Module:
    """The recipe's method (encoder, heads, objective, state) on `device`."""
    model = METHODS[cfg.method](cfg).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


__all__ = ["METHODS", "MoCo", "MoCoV3", "SimCLR", "build_model"]

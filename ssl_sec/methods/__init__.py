"""The methods: each turns two views into loss terms and owns its state (ssl_sec/methods/
simclr.py, moco.py). `METHODS` is the one registry of method names."""

import torch

from .moco import MoCo
from .simclr import SimCLR

METHODS = {"simclr": SimCLR, "moco": MoCo}


def build_model(cfg, device: torch.device) -> torch.nn.Module:
    """The recipe's method (encoder, heads, objective, state) on `device`."""
    model = METHODS[cfg.method](cfg).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


__all__ = ["METHODS", "MoCo", "SimCLR", "build_model"]

"""The methods dictionary: each method turns two views into loss terms and owns its state."""

from .simclr import SimCLR

METHODS = {"simclr": SimCLR}

__all__ = ["METHODS", "SimCLR"]

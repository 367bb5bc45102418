"""The methods dictionary: each method turns two views into loss terms and owns its state."""

from .moco import MoCo
from .simclr import SimCLR

METHODS = {"simclr": SimCLR, "moco": MoCo}

__all__ = ["METHODS", "MoCo", "SimCLR"]

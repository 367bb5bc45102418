"""What every term shares: its options (its recipe section), kept as `self.options`."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn


class Term(nn.Module):
    """An objective term (ssl_sec/terms/__init__.py says what a term provides)."""

    Options: ClassVar[type]
    reads: ClassVar[str]  # "similarities" or "embeddings"

    def __init__(self, options: Any):
        super().__init__()
        self.options = options

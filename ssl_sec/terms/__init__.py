"""The objective's terms, one file each, and `TERMS`, the one registry of their names.

A term is an `nn.Module` with a class-level `Options` dataclass (its recipe section,
`loss.<name>`, which checks its own fields) and `reads`:

- "similarities": a matrix term. `forward(s)` takes the step's `Similarities` (one row of
  candidates per anchor) and returns a scalar (InfoNCE, Circle).
- "embeddings": an embedding term. `forward(e)` takes the un-normalised embeddings it
  constrains, (M, k), the projector's or the backbone's as its options say (`features`), and
  returns a scalar (SEC).

`options.weight_at(progress)` is the term's weight at that point of the run (0 = off, not
computed). `ssl_sec/objective.py` sums the weighted terms. Adding a term is one file here
and one line below; its section appears in every recipe with its defaults.
"""

from .circle import Circle
from .infonce import InfoNCE
from .sec import SEC
from .uniformity import Uniformity

# Matrix terms before embedding terms: the order of the logged losses.
TERMS = {"infonce": InfoNCE, "circle": Circle, "sec": SEC, "uniformity": Uniformity}

__all__ = ["TERMS", "SEC", "Circle", "InfoNCE"]

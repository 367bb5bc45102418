"""Evaluation of pretrained backbones: features, weighted kNN, linear probe, few-shot
transfer, norm statistics; and the `ssl-sec knn | linear | kshot | norms` commands.

The names below are imported when first used: the library parts (features, knn) sit below
the recipe schema, the commands above it (they open checkpoints with their configs), and an
eager import here would tie the two layers into a circle.
"""

import importlib

_EXPORTS = {"extract_features": "features", "knn_accuracy": "knn", "knn_classify": "knn",
            "knn_evaluate": "knn", "kshot_evaluate": "kshot", "norm_statistics": "norms",
            "probe_on_features": "linear"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ssl_sec.evaluation' has no attribute {name!r}")

"""Evaluation of pretrained backbones: features, weighted kNN, linear probe, few-shot
transfer, norm statistics; and the `ssl-sec knn | linear | kshot | norms` commands.

The names below are imported when first used: the library parts (features, knn) sit below
the recipe schema, the commands above it (they open checkpoints with their configs), and an
eager import here would tie the two layers into a circle.
"""

from ..lazy import lazy_exports

_EXPORTS = {"extract_features": "features", "knn_accuracy": "knn", "knn_classify": "knn",
            "topk_accuracy": "knn",
            "knn_evaluate": "knn", "kshot_evaluate": "kshot", "norm_statistics": "norms",
            "probe_on_features": "linear"}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

"""Evaluation of pretrained backbones: features, weighted kNN, linear probe, few-shot
transfer, norm statistics; and the `ssl-sec knn | linear | kshot | norms` commands."""

from .features import extract_features
from .knn import knn_accuracy, knn_classify, knn_evaluate
from .kshot import kshot_evaluate
from .linear import probe_on_features
from .norms import norm_statistics

__all__ = ["extract_features", "knn_accuracy", "knn_classify", "knn_evaluate",
           "kshot_evaluate", "norm_statistics", "probe_on_features"]

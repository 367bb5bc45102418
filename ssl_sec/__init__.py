"""ssl_sec: self-supervised contrastive pretraining (SimCLR, MoCo v2) with InfoNCE, the SEC
norm regulariser and a Circle-style term; evaluation by weighted kNN, linear probe and
few-shot transfer.

The entry points a Python user needs (each loads its modules on first use, so
`import ssl_sec` stays light):

    cfg = ssl_sec.load_recipe("recipes/quickstart.yaml", ["optim.epochs=1"])
    result = ssl_sec.train(cfg)                           # as `ssl-sec pretrain`
    backbone = ssl_sec.load_backbone(result["checkpoint"])  # eval mode: (B,3,H,W) -> (B,D)

Evaluation: `ssl_sec.evaluation` (knn_classify, extract_features, probe_on_features, ...).
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.2.0"

# name -> module that defines it
_EXPORTS = {
    "load_recipe": "recipe",
    "Config": "recipe",
    "train": "engine",
    "load_backbone": "pretrained",
    "export_backbone": "pretrained",
    "knn_classify": "evaluation.knn",
    "knn_accuracy": "evaluation.knn",
    "topk_accuracy": "evaluation.knn",
    "extract_features": "evaluation.features",
    "probe_on_features": "evaluation.linear",
    "EvalTransform": "augment",
    "UserError": "errors",
    "Preempted": "preemption",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(__all__)

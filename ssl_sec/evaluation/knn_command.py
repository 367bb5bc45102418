"""`ssl-sec knn`: weighted kNN (docs/methods.md section 5) of a checkpoint's backbone, the
train split as the bank; features cached in `<checkpoint dir>/features/`."""

from __future__ import annotations

import time
from pathlib import Path

from .knn import knn_evaluate
from .session import EvalSession

OVERRIDES = "overrides of the checkpoint's config, e.g. eval.knn_k=20 data.root=..."


def add_arguments(parser) -> None:
    """No options of its own: k, T and the backend are the config's eval.knn_*."""


def run(args) -> dict:
    return knn_command(Path(args.checkpoint), args.overrides, cache=not args.no_cache)


def knn_command(path: Path, overrides: list[str] | None = None, cache: bool = True) -> dict:
    session = EvalSession(path, overrides, cache=cache)
    t0 = time.perf_counter()
    (bank, bank_y), (test, test_y) = session.features("train"), session.features("test")
    e, d = session.cfg.eval, session.cfg.data
    acc = knn_evaluate(bank, bank_y, test, test_y, e)
    result = {"top1": acc["top1"], "top5": acc["top5"], "k": acc["k"],
              "T": e.knn_temperature, "feature_layer": "backbone (pooled, L2-normalised)",
              "dataset": d.dataset, "data_mode": session.splits.mode,
              "n_train": len(bank_y), "n_test": len(test_y), "checkpoint": str(path),
              "feature_cache": None if session.cache_dir is None else str(session.cache_dir),
              "seconds": round(time.perf_counter() - t0, 2)}
    session.write("knn", result)
    return result

"""Evaluation commands on a saved checkpoint (`ssl-sec knn`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..config import from_dict
from ..engine import build_augment, knn_monitor, load_splits, resolve_device
from ..errors import CheckpointError
from ..models import build_backbone


def load_backbone(path: Path, overrides: list[str]) -> tuple[torch.nn.Module, object]:
    """The checkpoint's backbone (eval mode) and its config with `overrides` applied."""
    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt["config"], overrides)
    backbone, _ = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    prefix = "encoder.backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint '{path}' does not match model.arch={cfg.model.arch} "
                              f"cifar_stem={cfg.model.cifar_stem} "
                              f"({str(err).splitlines()[0][:120]})") from None
    return backbone.eval(), cfg


def knn_command(path: Path, overrides: list[str]) -> dict:
    backbone, cfg = load_backbone(path, overrides)
    device = resolve_device(cfg.device)
    backbone = backbone.to(device)
    if cfg.model.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    train_set, test_set = load_splits(cfg)
    _, eval_transform = build_augment(cfg, device)
    t0 = time.perf_counter()
    acc = knn_monitor(backbone, (train_set.images.to(device), train_set.labels.to(device)),
                      (test_set.images.to(device), test_set.labels.to(device)), eval_transform, cfg)
    result = {"top1": acc["top1"], "top5": acc["top5"], "k": cfg.eval.knn_k,
              "T": cfg.eval.knn_temperature, "feature_layer": "backbone (pooled, L2-normalised)",
              "dataset": cfg.data.dataset, "n_train": len(train_set.labels),
              "n_test": len(test_set.labels), "checkpoint": str(path),
              "seconds": round(time.perf_counter() - t0, 2)}
    out = path.with_name(f"{path.stem}.knn.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result

"""Evaluation commands on a saved checkpoint (`ssl-sec knn|linear|kshot|norms`) and the
helpers they share: open a checkpoint, resolve its config, rebuild the backbone, the eval view
and the on-disk feature cache (`<checkpoint dir>/features/`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoint import load_checkpoint
from ..data import NORMALIZATION, load_splits
from ..pretrained import backbone_from_checkpoint, checkpoint_config
from ..runtime import resolve_device
from .features import cached_features, file_sha256
from .knn import knn_evaluate

if TYPE_CHECKING:
    from ..recipe import Config


# ----------------------------------------------------------------------------- checkpoint
def backbone_and_config(path: Path, overrides: list[str],
                        extra: dict | None = None) -> tuple[torch.nn.Module, Config]:
    """The checkpoint's backbone (eval mode) and its config with `overrides` applied."""
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(path, ckpt, overrides, extra)
    return backbone_from_checkpoint(path, ckpt, cfg), cfg


def to_device(module: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    module = module.to(device)
    if cfg.model.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def eval_transform_for(cfg: Config, pretrain_dataset: str, device: torch.device):
    """The plain eval view (centre crop to augment.size, normalise).

    Normalised with the *pretraining* dataset's statistics, the input distribution the backbone
    learned, also when it is evaluated on another dataset (transfer).
    """
    from ..augment import EvalTransform

    mean, std = NORMALIZATION[pretrain_dataset]
    return EvalTransform(size=cfg.augment.size, mean=mean, std=std).to(device)


def pretrain_dataset(ckpt: dict) -> str:
    return ckpt["config"].get("data", {}).get("dataset", "cifar10")


# ----------------------------------------------------------------------------- feature cache
def cache_dir_for(path: Path, enabled: bool = True) -> Path | None:
    """`<checkpoint dir>/features/`, or None when caching is off."""
    return Path(path).parent / "features" if enabled else None


def feature_key(path: Path, cfg: Config, split: str, transform: torch.nn.Module) -> dict:
    """What identifies a feature file besides the images themselves (see cached_features)."""
    d = cfg.data
    norm = transform.normalize
    return {
        "checkpoint_sha256": file_sha256(path),
        "arch": cfg.model.arch, "cifar_stem": cfg.model.cifar_stem,
        "dataset": d.dataset, "split": split,
        "subset": d.train_subset if split == "train" else d.test_subset,
        "classes": d.classes, "classes_file": d.classes_file, "image_size": d.image_size,
        "transform": {"size": transform.size, "resize": transform.resize,
                      "mean": [round(v, 6) for v in norm.mean.flatten().tolist()],
                      "inv_std": [round(v, 6) for v in norm.inv_std.flatten().tolist()]},
    }


def split_features(backbone: torch.nn.Module, source, transform: torch.nn.Module,
                   cache_dir: Path | None, path: Path, cfg: Config, split: str,
                   device: torch.device, normalize: bool = True, precision: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of one split (in memory or streamed), through the feature cache."""
    return cached_features(backbone, source, transform, cache_dir,
                           feature_key(path, cfg, split, transform), device, cfg.augment.size,
                           cfg.data.eval_resize, precision=precision or cfg.precision,
                           normalize=normalize)


# ----------------------------------------------------------------------------- kNN
def knn_command(path: Path, overrides: list[str], cache: bool = True) -> dict:
    """Weighted kNN (docs/methods.md section 5) of the checkpoint's backbone; the train-set bank
    and the test features are cached in `<checkpoint dir>/features/` unless `cache=False`."""
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(path, ckpt, overrides)
    device = resolve_device(cfg.device)
    backbone = to_device(backbone_from_checkpoint(path, ckpt, cfg), cfg, device)
    splits = load_splits(cfg.data, cache_dir=path.parent)
    transform = eval_transform_for(cfg, pretrain_dataset(ckpt), device)
    cache_dir = cache_dir_for(path, cache)
    t0 = time.perf_counter()
    feats, labels = {}, {}
    for split, ds in (("train", splits.bank), ("test", splits.test)):
        feats[split], labels[split] = split_features(backbone, ds, transform, cache_dir, path,
                                                     cfg, split, device)
    e = cfg.eval
    acc = knn_evaluate(feats["train"], labels["train"], feats["test"], labels["test"], e)
    result = {"top1": acc["top1"], "top5": acc["top5"], "k": acc["k"],
              "T": e.knn_temperature, "feature_layer": "backbone (pooled, L2-normalised)",
              "dataset": cfg.data.dataset, "data_mode": splits.mode,
              "n_train": len(labels["train"]),
              "n_test": len(labels["test"]), "checkpoint": str(path),
              "feature_cache": None if cache_dir is None else str(cache_dir),
              "seconds": round(time.perf_counter() - t0, 2)}
    out = path.with_name(f"{path.stem}.knn.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result

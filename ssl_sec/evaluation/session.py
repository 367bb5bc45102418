"""One checkpoint opened for evaluation: what every evaluation command shares.

    session = EvalSession(path, overrides)            # ssl-sec knn|linear|kshot|norms|shift
    feats, labels = session.features("train")         # cached in <checkpoint dir>/features/
    session.write("knn", result)                      # <stem>.knn.json beside the checkpoint

The session owns the checkpoint's config (with the command's data changes and overrides),
the device, the backbone (or the whole encoder, `projector=True`), the eval view, the splits
and the feature cache with its whole key. An evaluation is then a metric function on
features plus a few lines (ssl_sec/evaluation/knn_command.py is the smallest).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..augment import EvalTransform
from ..checkpoint import load_checkpoint
from ..data import NORMALIZATION, Splits, load_splits
from ..errors import CheckpointError
from ..methods import METHODS
from ..pretrained import backbone_from_checkpoint, checkpoint_config
from ..runtime import resolve_device
from .features import cached_features, file_sha256

if TYPE_CHECKING:
    from ..recipe import Config

SPLITS = ("train", "test")


class EvalSession:
    """A checkpoint, its config and backbone on the evaluation device.

    path: a .pt written by `ssl-sec pretrain`. overrides: `key=value` of its config.
    data: changes of the config's `data` (and other sections) made by the command before the
        overrides, a dict or a function of the checkpoint's config (after the overrides)
        that returns one, e.g. every image of some classes.
    device, precision: None = the config's. cache: read and write the feature cache.
    projector: hold the method's encoder (backbone and projection head), whose forward
        gives (h, z), instead of the backbone alone.
    """

    def __init__(self, path: str | Path, overrides: list[str] | None = None,
                 data: dict | Callable[[Config], dict] | None = None,
                 device: str | None = None, precision: str | None = None,
                 cache: bool = True, projector: bool = False):
        self.path = Path(path)
        ckpt = load_checkpoint(self.path)
        cfg = checkpoint_config(self.path, ckpt, overrides)
        if callable(data):
            data = data(cfg)
        if data:
            cfg = checkpoint_config(self.path, ckpt, overrides, data)
        self.cfg: Config = cfg
        self.pretrain_dataset: str = ckpt["config"].get("data", {}).get("dataset", "cifar10")
        self.device = resolve_device(device or cfg.device)
        self.precision = precision or cfg.precision
        model = self._encoder(ckpt) if projector else backbone_from_checkpoint(self.path, ckpt,
                                                                              cfg)
        model = model.to(self.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        # Normalised with the *pretraining* dataset's statistics, the input distribution the
        # backbone learned, also when it is evaluated on another dataset (transfer).
        mean, std = NORMALIZATION[self.pretrain_dataset]
        self.transform = EvalTransform(size=cfg.augment.size, mean=mean,
                                       std=std).to(self.device)
        self.cache_dir = self.path.parent / "features" if cache else None

    def _encoder(self, ckpt: dict) -> torch.nn.Module:
        method = METHODS[self.cfg.method](self.cfg)
        try:
            method.load_state_dict(ckpt["model"])
        except (RuntimeError, KeyError) as err:
            raise CheckpointError(f"checkpoint '{self.path}' does not fit the model its config "
                                  f"describes ({str(err).splitlines()[0][:160]})") from None
        return method.encoder

    @functools.cached_property
    def splits(self) -> Splits:
        """The labelled splits of the (changed) config: `bank` (train) and `test`."""
        return load_splits(self.cfg.data, cache_dir=self.path.parent)

    def source(self, split: str):
        """The labelled set of `split` ("train" = the kNN bank, "test")."""
        return {"train": self.splits.bank, "test": self.splits.test}[split]

    def features(self, split: str, normalize: bool = True, precision: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-view backbone features (N, D), L2-normalised unless `normalize=False`, and
        labels (N,) of a split, through the feature cache."""
        source = self.source(split)
        d = self.cfg.data
        norm = self.transform.normalize
        key = {
            "checkpoint_sha256": file_sha256(self.path),
            "arch": self.cfg.model.arch, "cifar_stem": self.cfg.model.cifar_stem,
            "dataset": d.dataset, "split": split,
            "subset": d.train_subset if split == "train" else d.test_subset,
            "classes": d.classes, "classes_file": d.classes_file, "image_size": d.image_size,
            "transform": {"size": self.transform.size, "resize": self.transform.resize,
                          "mean": [round(v, 6) for v in norm.mean.flatten().tolist()],
                          "inv_std": [round(v, 6) for v in norm.inv_std.flatten().tolist()]},
        }
        return cached_features(self.model, source, self.transform, self.cache_dir, key,
                               self.device, self.cfg.augment.size, d.eval_resize,
                               precision=precision or self.precision, normalize=normalize)

    def write(self, kind: str, result: dict[str, Any]) -> Path:
        """`<stem>.<kind>.json` beside the checkpoint."""
        out = self.path.with_name(f"{self.path.stem}.{kind}.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
        return out

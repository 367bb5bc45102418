"""One feature-extraction routine for every evaluation (kNN monitor, kNN, linear, few-shot)."""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_save
from ..data.imageset import ImageSet
from ..data.stream import StreamSet
from ..runtime import autocast_for, effective_precision


@torch.no_grad()
def embed(backbone: nn.Module, batches: Iterable[torch.Tensor], transform: nn.Module,
          device: torch.device, precision: str = "auto") -> torch.Tensor:
    """Eval-mode backbone features (float32, not normalised) of uint8 batches, in order.

    Train-mode BN would use batch statistics and update its running statistics (a classic
    mistake in kNN monitors): the whole pass runs in eval mode, restored afterwards."""
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        with autocast_for(device, precision):
            for images in batches:
                out.append(backbone(transform(images)).float())
    finally:
        backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 0), device=device)


def extract_features(backbone: nn.Module, images: torch.Tensor, transform: nn.Module,
                     batch_size: int = 1024, precision: str = "auto",
                     normalize: bool = True) -> torch.Tensor:
    """Eval-mode backbone features of uint8 images, no augmentation.

    Args:
        backbone: maps normalised images (B,3,h,w) to features (B,D).
        images: uint8 (N,3,H,W) on the device the features are computed on.
        transform: deterministic uint8 -> normalised float transform (EvalTransform).
    Returns:
        float32 (N, D), L2-normalised when `normalize`.
    """
    chunks = (images[i:i + batch_size] for i in range(0, images.shape[0], batch_size))
    feats = embed(backbone, chunks, transform, images.device, precision)
    return F.normalize(feats, dim=1) if normalize else feats


# An ImageSet or a StreamSet: both answer `eval_batches` and `digest` (data/imageset.py).
Labelled = ImageSet | StreamSet


def labelled_batches(source: Labelled, device: torch.device, size: int,
                     resize: int | None = None, batch_size: int = 1024
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A labelled set's images in order, as (uint8 images, labels) batches on `device` (a
    streamed set's evaluation views: shorter side `resize`, centre crop `size`; a bad file
    left out by `skip_bad_images` is absent)."""
    return source.eval_batches(device, size, resize, batch_size)


def labelled_features(backbone: nn.Module, source: Labelled, transform: nn.Module,
                      device: torch.device, size: int, resize: int | None = None,
                      precision: str = "auto", normalize: bool = True,
                      batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode features (N, D) and labels (N,) of a labelled set, in memory or streamed."""
    labels: list[torch.Tensor] = []

    def images():
        for x, y in labelled_batches(source, device, size, resize, batch_size):
            labels.append(y)
            yield x

    feats = embed(backbone, images(), transform, device, precision)
    feats = F.normalize(feats, dim=1) if normalize else feats
    return feats, (torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64,
                                                                 device=device))


# ----------------------------------------------------------------------------- feature cache
CACHE_FORMAT = "ssl_sec.features/2"  # /2: labels stored with the features


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime within the process).

    Content, not size + mtime, identifies a checkpoint: `last.pt` is rewritten in place every
    epoch, and a copied checkpoint keeps its features.
    """
    path = Path(path).resolve()
    st = path.stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


def _canonical(parts: dict) -> dict:
    """JSON round trip: the key parts become plain str/int/float/bool/list/dict values that
    `torch.load(weights_only=True)` accepts and that compare equal after loading."""
    try:
        return json.loads(json.dumps(parts, sort_keys=True))
    except TypeError as err:
        raise TypeError(f"cached_features: key_parts must be JSON-serialisable ({err})") from None


def cached_features(backbone: nn.Module, source: Labelled, transform: nn.Module,
                    cache_dir: str | Path | None, key_parts: dict, device: torch.device,
                    size: int, resize: int | None = None, batch_size: int = 1024,
                    precision: str = "auto", normalize: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`labelled_features`, memoised on disk as `<cache_dir>/<sha256 of the key>.pt`.

    The key is the sha256 of `key_parts` (callers pass the checkpoint file's sha256, dataset,
    split, subset, classes, image size and the transform's settings) plus what this function
    knows itself: a digest of the images (their uint8 pixels, or a streamed folder's file
    index), whether the features are L2-normalised and the arithmetic actually used. Files
    are written atomically and read with `weights_only=True`; a stale, corrupt or mismatching
    file is recomputed and replaced. `cache_dir=None` disables the cache.

    Returns features float32 (N, D) and labels (N,) on `device`.
    """
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        return labelled_features(backbone, source, transform, device, size, resize, precision,
                                 normalize, batch_size)

    if cache_dir is None:
        return compute()
    parts = _canonical({**key_parts, "n_images": len(source.labels),
                        "images": source.digest(), "normalized": bool(normalize),
                        "precision": effective_precision(device, precision),
                        "resize": resize if source.streamed else None})
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"{key[:32]}.pt"
    if path.is_file():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            feats, labels = entry["features"], entry["labels"]
            if (entry.get("format") == CACHE_FORMAT and entry.get("key") == key
                    and entry.get("key_parts") == parts and feats.ndim == 2
                    and feats.shape[0] == labels.shape[0]):
                return feats.to(device=device, dtype=torch.float32), labels.to(device)
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed, not fatal
            pass
    feats, labels = compute()
    try:
        atomic_save({"format": CACHE_FORMAT, "key": key, "key_parts": parts,
                     "features": feats.detach().cpu(), "labels": labels.cpu()}, path)
    except OSError as err:
        warnings.warn(f"feature cache not written to '{path}' ({err}); continuing without it",
                      stacklevel=2)
    return feats, labels

"""One feature-extraction routine for every evaluation (kNN monitor, kNN, linear, few-shot)."""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_save
from ..runtime import autocast_for, effective_precision


@torch.no_grad()
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
    was_training = backbone.training
    # Train-mode BN would use batch statistics and update running stats: a classic
    # mistake in kNN monitors. Eval mode for the whole pass, restored afterwards.
    backbone.eval()
    device = images.device
    out = []
    try:
        with autocast_for(device, precision):
            for start in range(0, images.shape[0], batch_size):
                x = transform(images[start:start + batch_size])
                out.append(backbone(x).float())
    finally:
        backbone.train(was_training)
    feats = torch.cat(out) if out else images.new_zeros((0, 0), dtype=torch.float32)
    return F.normalize(feats, dim=1) if normalize else feats


# ----------------------------------------------------------------------------- feature cache
CACHE_FORMAT = "ssl_sec.features/1"


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


def tensor_digest(x: torch.Tensor) -> str:
    """blake2b of a tensor's bytes: the cache key covers the exact images, not just their
    dataset name (a different data.root or a re-packed copy gets its own entry)."""
    data = x.detach().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((tuple(data.shape), str(data.dtype))).encode())
    digest.update(data.view(torch.uint8).reshape(-1).numpy().tobytes()
                  if data.numel() else b"")
    return digest.hexdigest()


def _canonical(parts: dict) -> dict:
    """JSON round trip: the key parts become plain str/int/float/bool/list/dict values that
    `torch.load(weights_only=True)` accepts and that compare equal after loading."""
    try:
        return json.loads(json.dumps(parts, sort_keys=True))
    except TypeError as err:
        raise TypeError(f"cached_features: key_parts must be JSON-serialisable ({err})") from None


def cached_features(backbone: nn.Module, images: torch.Tensor, transform: nn.Module,
                    cache_dir: str | Path | None, key_parts: dict, batch_size: int = 1024,
                    precision: str = "auto", normalize: bool = True) -> torch.Tensor:
    """`extract_features`, memoised on disk as `<cache_dir>/<sha256 of the key>.pt`.

    The key is the sha256 of `key_parts` (callers pass the checkpoint file's sha256, dataset,
    split, subset, classes, image size and the transform's settings) plus what this function
    knows itself: a digest of the uint8 images, whether the features are L2-normalised and the
    arithmetic actually used (bf16 on CUDA, fp32 elsewhere). Files are written atomically and
    read with `weights_only=True`; a stale, corrupt or mismatching file is recomputed and
    replaced. `cache_dir=None` disables the cache.

    Shape: images uint8 (N,3,H,W) -> float32 (N, D) on the images' device.
    """
    if cache_dir is None:
        return extract_features(backbone, images, transform, batch_size=batch_size,
                                precision=precision, normalize=normalize)
    parts = _canonical({**key_parts, "n_images": int(images.shape[0]),
                        "images": tensor_digest(images), "normalized": bool(normalize),
                        "precision": effective_precision(images.device, precision)})
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"{key[:32]}.pt"
    if path.is_file():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            feats = entry["features"]
            if (entry.get("format") == CACHE_FORMAT and entry.get("key") == key
                    and entry.get("key_parts") == parts and feats.ndim == 2
                    and feats.shape[0] == images.shape[0]):
                return feats.to(device=images.device, dtype=torch.float32)
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed, not fatal
            pass
    feats = extract_features(backbone, images, transform, batch_size=batch_size,
                             precision=precision, normalize=normalize)
    try:
        atomic_save({"format": CACHE_FORMAT, "key": key, "key_parts": parts,
                     "features": feats.detach().cpu()}, path)
    except OSError as err:
        warnings.warn(f"feature cache not written to '{path}' ({err}); continuing without it",
                      stacklevel=2)
    return feats

"""Datasets as uint8 images + int64 labels (:class:`ImageSet`), and device-resident batching."""

from __future__ import annotations

import os
from pathlib import Path

from ssl_sec.data.cifar import ImageSet, load_cifar, resolve_root
from ssl_sec.data.imagefolder import load_imagefolder
from ssl_sec.data.loader import DeviceLoader, iterate_chunks
from ssl_sec.errors import ConfigError

__all__ = [
    "DATASETS",
    "NORMALIZATION",
    "DeviceLoader",
    "ImageSet",
    "iterate_chunks",
    "load_cifar",
    "load_dataset",
    "load_imagefolder",
]

DATASETS = ("cifar10", "cifar100", "imagefolder")

# Per-channel (mean, std) of the training pixels in [0, 1] scale, for normalisation.
# CIFAR-10: recomputed from all 50,000 training images (std over all pixels; the often-copied
# (0.2023, 0.1994, 0.2010) is a mean of per-image stds, a different quantity).
# CIFAR-100: the published statistics of the full 50,000-image training set.
# imagefolder: the ImageNet statistics used by torchvision models.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None,
    train: bool,
    download: bool = False,
    image_size: int | None = None,
    classes_file: str | os.PathLike[str] | None = None,
) -> ImageSet:
    """Load a dataset by name: ``"cifar10"``, ``"cifar100"`` or ``"imagefolder"``.

    ``root`` follows :func:`ssl_sec.data.cifar.resolve_root` (argument, ``$SSL_SEC_DATA``,
    ``./data``). For ``imagefolder``, ``image_size`` is required (images are stored at that size),
    ``download`` is not supported, and if ``root/train`` (``train=True``) or ``root/val``
    (``train=False``) exists that split folder is used, otherwise ``root`` itself holds the class
    folders.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root=root, train=train, download=download)
    if image_size is None:
        raise ConfigError("dataset 'imagefolder' needs data.image_size (the stored image side)")
    if download:
        raise ConfigError("dataset 'imagefolder' cannot be downloaded; set data.download=false")
    base = resolve_root(root)
    split = Path(base) / ("train" if train else "val")
    folder = split if split.is_dir() else base
    return load_imagefolder(folder, image_size, classes_file=classes_file)

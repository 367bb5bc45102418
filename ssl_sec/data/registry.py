"""The datasets ssl_sec knows, in one registry: config, recipes, loading and tests read it.

Adding a dataset is one `DatasetSpec` here (and its loader): the config accepts its name,
`scripts/make_recipes.py` can write its recipes, and `load_splits` serves it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ssl_sec.data.cifar import ImageSet, load_cifar, resolve_root
from ssl_sec.data.imagefolder import load_imagefolder
from ssl_sec.errors import ConfigError

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset.

    name: the `data.dataset` value. title: how people write it. normalization: per-channel
    (mean, std) in [0, 1] scale. folder: an image-folder tree on disk, which can be streamed
    (`data.mode: stream`) instead of decoded into memory.
    load: (root, train, download, image_size, classes_file, skip_bad) -> the decoded ImageSet.
    """

    name: str
    title: str
    normalization: Stats
    folder: bool
    load: Callable[..., ImageSet]


def _load_cifar(name: str) -> Callable[..., ImageSet]:
    def load(root, train: bool, download: bool, image_size=None, classes_file=None,
             skip_bad: bool = False) -> ImageSet:
        return load_cifar(name, root=root, train=train, download=download)

    return load


def split_folder(root: str | os.PathLike[str] | None, train: bool) -> Path:
    """`root/train` or `root/val` when that exists, else `root` itself (the class folders)."""
    base = resolve_root(root)
    split = Path(base) / ("train" if train else "val")
    return split if split.is_dir() else Path(base)


def _load_folder(root, train: bool, download: bool, image_size=None,
                 classes_file=None, skip_bad: bool = False) -> ImageSet:
    # `download` does not apply: there is no official archive of a folder (a missing folder
    # is an error that names it).
    if image_size is None:
        raise ConfigError("dataset 'imagefolder' needs data.image_size (the stored image side)")
    return load_imagefolder(split_folder(root, train), image_size, classes_file=classes_file,
                            skip_bad=skip_bad)


# CIFAR-10: (mean, std) recomputed from all 50,000 training images (std over all pixels; the
# often-copied (0.2023, 0.1994, 0.2010) is a mean of per-image stds, a different quantity).
# CIFAR-100: the published statistics of its 50,000 training images. Image folders: the
# ImageNet statistics torchvision's models use.
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", "CIFAR-10",
                           ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                           folder=False, load=_load_cifar("cifar10")),
    "cifar100": DatasetSpec("cifar100", "CIFAR-100",
                            ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                            folder=False, load=_load_cifar("cifar100")),
    "imagefolder": DatasetSpec("imagefolder", "an ImageFolder tree (e.g. ImageNet-100)",
                               ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                               folder=True, load=_load_folder),
}

NORMALIZATION: dict[str, Stats] = {name: spec.normalization for name, spec in DATASETS.items()}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, root: str | os.PathLike[str] | None, train: bool,
                 download: bool = False, image_size: int | None = None,
                 classes_file: str | os.PathLike[str] | None = None) -> ImageSet:
    """Decode a dataset's train or test split into memory (an ImageSet).

    `root` follows :func:`ssl_sec.data.cifar.resolve_root` (argument, `$SSL_SEC_DATA`,
    `./data`). For `imagefolder`, `image_size` is required (images are stored at that size),
    `download` is not supported, and `root/train` or `root/val` is used when it exists,
    otherwise `root` itself holds the class folders.
    """
    return dataset_spec(name).load(root, train=train, download=download, image_size=image_size,
                                   classes_file=classes_file)

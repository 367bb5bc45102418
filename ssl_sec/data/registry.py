"""The datasets ssl_sec knows, in one registry: config, recipes, loading and tests read it.

Adding a dataset is one `DatasetSpec` here (and its loader): the config accepts its name,
`scripts/make_recipes.py` can write its recipes, and `load_splits` serves it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ssl_sec.data.cifar import load_cifar, resolve_root
from ssl_sec.data.imagefolder import load_imagefolder
from ssl_sec.data.imageset import ImageSet
from ssl_sec.data.stl10 import load_stl10
from ssl_sec.errors import ConfigError

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset.

    name: the `data.dataset` value. title: how people write it. normalization: per-channel
    (mean, std) in [0, 1] scale. folder: an image-folder tree on disk, which can be streamed
    (`data.mode: stream`) instead of decoded into memory.
    load: (root, split, download, image_size, classes_file, skip_bad) -> the decoded ImageSet
    of one split, by name. splits: the names it knows; `train` (labelled: the kNN bank and
    the probe's training set) and `test` always. pretrain: the split self-supervised
    training reads (STL-10: `unlabeled`); labels of that split are never used.
    """

    name: str
    title: str
    normalization: Stats
    folder: bool
    load: Callable[..., ImageSet]
    splits: tuple[str, ...] = ("train", "test")
    pretrain: str = "train"

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ConfigError(f"{self.name} has no split {split!r}; its splits: "
                              f"{', '.join(self.splits)}")


def _load_cifar(name: str) -> Callable[..., ImageSet]:
    def load(root, split: str, download: bool, image_size=None, classes_file=None,
             skip_bad: bool = False) -> ImageSet:
        return load_cifar(name, root=root, train=split == "train", download=download)

    return load


def split_folder(root: str | os.PathLike[str] | None, split: str) -> Path:
    """`root/train` (split `train`) or `root/val` (split `test`) when that exists, else
    `root` itself (the class folders)."""
    base = resolve_root(root)
    folder = Path(base) / ("val" if split == "test" else split)
    return folder if folder.is_dir() else Path(base)


def _load_folder(root, split: str, download: bool, image_size=None,
                 classes_file=None, skip_bad: bool = False) -> ImageSet:
    # `download` does not apply: there is no official archive of a folder (a missing folder
    # is an error that names it).
    if image_size is None:
        raise ConfigError("dataset 'imagefolder' needs data.image_size (the stored image side)")
    return load_imagefolder(split_folder(root, split), image_size, classes_file=classes_file,
                            skip_bad=skip_bad)


# CIFAR-10: (mean, std) recomputed from all 50,000 training images (std over all pixels; the
# often-copied (0.2023, 0.1994, 0.2010) is a mean of per-image stds, a different quantity).
# CIFAR-100: the published statistics of its 50,000 training images. Image folders: the
# ImageNet statistics torchvision's models use. STL-10: the statistics most public STL-10
# code uses (e.g. in many torchvision-based training scripts); they could not be recomputed
# here (no STL-10 copy), and which split they were computed on is not documented.
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
    "stl10": DatasetSpec("stl10", "STL-10", ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
                         folder=False, splits=("train", "test", "unlabeled"), pretrain="unlabeled",
                         load=lambda root, split, download, **_: load_stl10(root, split, download)),
}

NORMALIZATION: dict[str, Stats] = {name: spec.normalization for name, spec in DATASETS.items()}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, root: str | os.PathLike[str] | None, split: str = "train",
                 download: bool = False, image_size: int | None = None,
                 classes_file: str | os.PathLike[str] | None = None) -> ImageSet:
    """Decode one split of a dataset (`train`, `test`, or another the dataset names, e.g.
    STL-10's `unlabeled`) into memory (an ImageSet).

    `root` follows :func:`ssl_sec.data.cifar.resolve_root` (argument, `$SSL_SEC_DATA`,
    `./data`). For `imagefolder`, `image_size` is required (images are stored at that size),
    `download` is not supported, and `root/train` or `root/val` is used when it exists,
    otherwise `root` itself holds the class folders.
    """
    spec = dataset_spec(name)
    spec.check_split(split)
    return spec.load(root, split=split, download=download, image_size=image_size,
                     classes_file=classes_file)

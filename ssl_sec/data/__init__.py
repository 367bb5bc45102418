"""Datasets as uint8 images + int64 labels (:class:`ImageSet`) or streamed from disk, the
registry of dataset names, the splits a run reads, and batching."""

from ssl_sec.data.cifar import load_cifar, resolve_root
from ssl_sec.data.imagefolder import load_imagefolder
from ssl_sec.data.imageset import ImageSet
from ssl_sec.data.loader import DeviceLoader
from ssl_sec.data.registry import DATASETS, NORMALIZATION, DatasetSpec, dataset_spec, load_dataset
from ssl_sec.data.splits import Splits, class_names, load_splits

__all__ = [
    "DATASETS",
    "NORMALIZATION",
    "DatasetSpec",
    "DeviceLoader",
    "ImageSet",
    "Splits",
    "class_names",
    "dataset_spec",
    "load_cifar",
    "load_dataset",
    "load_imagefolder",
    "load_splits",
    "resolve_root",
]

"""The sets a run reads, as three separate concepts: the images it pretrains on (labels
unused), the labelled bank the kNN monitor and the linear probe train on, and the labelled
test set. For CIFAR the pretraining set and the bank are the same training images; a dataset
with an unlabelled split (STL-10) would pretrain on more than its bank without the engine
knowing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ssl_sec.data.cifar import ImageSet
from ssl_sec.data.registry import dataset_spec
from ssl_sec.errors import ConfigError

if TYPE_CHECKING:  # config imports the registry: no import cycle at run time
    from ssl_sec.config import DataConfig


@dataclass
class Splits:
    """pretrain: what self-supervised training reads; bank: labelled training images (kNN
    bank, linear-probe training); test: labelled evaluation images. mode: how they are held
    (`memory`: decoded uint8 tensors)."""

    pretrain: ImageSet
    bank: ImageSet
    test: ImageSet
    mode: str = "memory"

    @property
    def num_classes(self) -> int:
        return len(self.bank.classes)


def _restrict(ds: ImageSet, d: DataConfig, limit: int) -> ImageSet:
    """The recipe's class subset (`data.classes`), then its first-N subset."""
    if d.classes is not None:
        bad = [c for c in d.classes if not 0 <= c < len(ds.classes)]
        if bad:
            raise ConfigError(f"data.classes has ids {bad} outside 0..{len(ds.classes) - 1} "
                              f"of {d.dataset}")
        ds = ds.select_classes(d.classes)
    if limit:
        ds = ds.subset(torch.arange(min(limit, len(ds.labels))))
    return ds


def load_splits(d: DataConfig) -> Splits:
    """The splits `data` describes (dataset, class subset, first-N subsets)."""
    spec = dataset_spec(d.dataset)
    sets = [_restrict(spec.load(d.root, train=train, download=d.download,
                                image_size=d.image_size, classes_file=d.classes_file), d, limit)
            for train, limit in ((True, d.train_subset), (False, d.test_subset))]
    return Splits(pretrain=sets[0], bank=sets[0], test=sets[1])

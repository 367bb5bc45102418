"""The sets a run reads, as three separate concepts: the images it pretrains on (labels
unused), the labelled bank the kNN monitor and the linear probe train on, and the labelled
test set. Each is a split of the dataset loaded by name (`DatasetSpec.pretrain`, `train`,
`test`). For CIFAR the pretraining set and the bank are the same training images (loaded
once); STL-10 pretrains on its `unlabeled` split, more than its bank, without the engine
knowing. Each set is decoded into memory (`ImageSet`) or streamed from disk (`StreamSet`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ssl_sec.data.imagefolder import list_images
from ssl_sec.data.imageset import ImageSet
from ssl_sec.data.index import build_index
from ssl_sec.data.registry import dataset_spec, split_folder
from ssl_sec.data.stream import StreamSet, default_workers
from ssl_sec.errors import ConfigError

if TYPE_CHECKING:  # config imports the registry: no import cycle at run time
    from ssl_sec.config import DataConfig

Source = ImageSet | StreamSet


@dataclass
class Splits:
    """pretrain: what self-supervised training reads; bank: labelled training images (kNN
    bank, linear-probe training); test: labelled evaluation images. mode: `memory` (decoded
    uint8 tensors) or `stream` (files read by DataLoader workers); note: why that mode."""

    pretrain: Source
    bank: Source
    test: Source
    mode: str = "memory"
    note: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.bank.classes)


def resolve_mode(d: DataConfig) -> tuple[str, str]:
    """`data.mode`, with `auto` decided by the decoded size against `data.memory_budget_gb`."""
    if not dataset_spec(d.dataset).folder:
        return "memory", ""
    if d.mode != "auto":
        return d.mode, f"data.mode={d.mode}"
    counts = []
    for split, limit in (("train", d.train_subset), ("test", d.test_subset)):
        files, _, _ = list_images(split_folder(d.root, split), d.classes_file)
        counts.append(min(len(files), limit) if limit else len(files))
    gb = sum(counts) * 3 * d.image_size ** 2 / 2**30
    mode = "memory" if gb <= d.memory_budget_gb else "stream"
    return mode, (f"data.mode=auto -> {mode}: {sum(counts):,} images decoded at "
                  f"{d.image_size} px = {gb:.1f} GiB {'<=' if mode == 'memory' else '>'} "
                  f"data.memory_budget_gb={d.memory_budget_gb:g}")


def _restrict(ds: Source, d: DataConfig, limit: int, labelled: bool = True) -> Source:
    """The recipe's class subset (`data.classes`; not of an unlabelled split), then its
    first-N subset."""
    if d.classes is not None and labelled:
        bad = [c for c in d.classes if not 0 <= c < len(ds.classes)]
        if bad:
            raise ConfigError(f"data.classes has ids {bad} outside 0..{len(ds.classes) - 1} "
                              f"of {d.dataset}")
        ds = ds.select_classes(d.classes)
    if limit:
        ds = ds.subset(list(range(min(limit, len(ds.labels)))))
    return ds


def load_splits(d: DataConfig, cache_dir: Path | None = None, log=None) -> Splits:
    """The splits `data` describes (dataset, mode, class subset, first-N subsets).

    cache_dir: where a streamed folder's file index is cached when the data folder is
    read-only (the run directory). log: where skipped bad files are reported.
    """
    mode, note = resolve_mode(d)
    spec = dataset_spec(d.dataset)
    names = dict.fromkeys([spec.pretrain, "train", "test"])  # the pretrain split once
    limits = {"test": d.test_subset}
    if mode == "memory":
        sets = {name: _restrict(spec.load(d.root, split=name, download=d.download,
                                          image_size=d.image_size, classes_file=d.classes_file,
                                          skip_bad=d.skip_bad_images),
                                d, limits.get(name, d.train_subset), name in ("train", "test"))
                for name in names}
        return Splits(sets[spec.pretrain], sets["train"], sets["test"], note=note)
    workers = default_workers() if d.workers is None else d.workers
    sets = {}
    for name in names:
        folder = split_folder(d.root, name)
        index = build_index(folder, d.classes_file, d.skip_bad_images, cache_dir, log=log)
        sets[name] = StreamSet(_restrict(index, d, limits.get(name, d.train_subset)),
                               folder.name, d.skip_bad_images, workers)
    return Splits(sets[spec.pretrain], sets["train"], sets["test"], mode="stream", note=note)


def class_names(d: DataConfig) -> list[str]:
    """All class names of the dataset (before `data.classes` restricts them), cheaply: an
    image folder is listed, not decoded."""
    spec = dataset_spec(d.dataset)
    if spec.folder:
        return list_images(split_folder(d.root, "test"), d.classes_file)[2]
    return spec.load(d.root, split="test", download=d.download).classes

"""Streaming an image folder from disk (`data.mode: stream`).

DataLoader worker processes read each image once per step and cut every view's random-resized
crop from the full-resolution photo (`ssl_sec.data.crops`); uint8 batches arrive in pinned
memory and are copied to the device without blocking. Flip, colour jitter, greyscale, blur
and solarize stay batched on the device (`ssl_sec.augment`), as in memory mode.

Reproducibility: the crops of image i in epoch e come from a generator seeded by
(seed, e, i), whichever worker reads it, and the order of the epoch from the loader's
generator (checkpointed): a resumed run reads the same batches as an uninterrupted one.
Under torchrun every rank reads its own share of each global batch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl_sec.data.crops import read_centre, read_crops
from ssl_sec.data.index import FileIndex
from ssl_sec.errors import DataError

BAD_HINT = "; remove or replace it, or set data.skip_bad_images=true to skip bad files"


def default_workers() -> int:
    """All the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class StreamSet:
    """A labelled image folder read from disk: the streamed counterpart of an ImageSet.

    index: its files and labels. skip_bad: leave out files that fail to decode (logged once)
    instead of stopping. workers: DataLoader worker processes.
    """

    index: FileIndex
    name: str
    skip_bad: bool = False
    workers: int = 0

    @property
    def labels(self) -> torch.Tensor:
        return self.index.labels

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    def __len__(self) -> int:
        return len(self.index)


def _one_thread(_: int) -> None:
    # Each worker decodes one image at a time; torch threads inside workers only contend.
    torch.set_num_threads(1)


class _Log:
    """Reports each bad file once per process."""

    def __init__(self, log: Callable[[str], None] | None):
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.seen: set[str] = set()

    def bad(self, reasons: Sequence[str]) -> None:
        for reason in reasons:
            if reason not in self.seen:
                self.seen.add(reason)
                self.log(f"skipping bad image: {reason}")


# ----------------------------------------------------------------------------- training crops
class CropStream(Dataset):
    """Item (epoch, i): the crops of image i for that epoch, one per view.

    views: each view's (crop_scale, crop_ratio). Returns (crops, label, skipped, error):
    crops a list of uint8 (3, size, size); with `skip_bad` a file that fails to decode is
    replaced by the next good one (deterministically) and named in `skipped`; without it,
    `error` names the file and the main process stops with it (an exception raised in a
    worker would arrive wrapped in a traceback).
    """

    def __init__(self, index: FileIndex, size: int,
                 views: Sequence[tuple[Sequence[float], Sequence[float]]], seed: int,
                 skip_bad: bool = False):
        self.index, self.size, self.views = index, size, [tuple(map(tuple, v)) for v in views]
        self.seed, self.skip_bad = seed, skip_bad

    def __len__(self) -> int:
        return len(self.index)

    def crops(self, epoch: int, i: int) -> list[np.ndarray]:
        rng = np.random.default_rng((self.seed, epoch, i))
        return read_crops(self.index.path(i), self.size, rng, self.views)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        skipped: list[str] = []
        for attempt in range(min(len(self.index), 64)):
            j = (i + attempt) % len(self.index)
            try:
                crops = [torch.from_numpy(c).permute(2, 0, 1) for c in self.crops(epoch, j)]
                return crops, int(self.index.labels[j]), skipped, None
            except DataError as err:
                if not self.skip_bad:
                    return None, -1, skipped, str(err)
                skipped.append(str(err))
        return None, -1, skipped, f"{skipped[-1]} (and the 63 files after it are bad too)"


def _collate_crops(items):
    skipped = [s for _, _, ss, _ in items for s in ss]
    errors = [e for *_, e in items if e]
    if errors:
        return None, None, skipped, errors[0]
    views = [torch.stack([crops[v] for crops, *_ in items]) for v in range(len(items[0][0]))]
    return views, torch.tensor([label for _, label, _, _ in items]), skipped, None


class _EpochBatches(Sampler):
    """This rank's share of each global batch of the epoch's permutation, as (epoch, i) keys."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator,
                 shard: tuple[int, int], shuffle: bool):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world = shard
        self.shuffle, self.epoch = shuffle, 0

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle \
            else torch.arange(self.n)
        share = self.batch_size // self.world
        for b in range(len(self)):
            idx = order[b * self.batch_size + self.rank * share:
                        b * self.batch_size + (self.rank + 1) * share]
            yield [(self.epoch, int(i)) for i in idx]


class StreamLoader:
    """Batches of a CropStream on `device`: `(view 1 crops, view 2 crops, labels)`, uint8
    (B, 3, size, size) each, B = batch_size / world size.

    Like `DeviceLoader`: `generator` draws each epoch's permutation (its state is what a
    checkpoint stores), the last partial batch is dropped, `shard=(rank, world)` gives each
    rank its slice of every global batch. Call `set_epoch(e)` before iterating epoch e.
    """

    def __init__(self, dataset: CropStream, batch_size: int, generator: torch.Generator,
                 device: torch.device, shard: tuple[int, int] = (0, 1), workers: int = 0,
                 shuffle: bool = True, log: Callable[[str], None] | None = None):
        if batch_size % shard[1]:
            raise DataError(f"batch_size={batch_size} is not divisible by the {shard[1]} "
                            "processes")
        self.batches = _EpochBatches(len(dataset), batch_size, generator, shard, shuffle)
        self.device = device
        self.log = _Log(log)
        self.loader = DataLoader(
            dataset, batch_sampler=self.batches, num_workers=workers,
            collate_fn=_collate_crops, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
            worker_init_fn=_one_thread if workers else None)

    @property
    def generator(self) -> torch.Generator:
        return self.batches.generator

    def set_epoch(self, epoch: int) -> None:
        self.batches.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for views, labels, skipped, error in self.loader:
            self.log.bad(skipped)
            if error:
                raise DataError(error + BAD_HINT)
            yield (*(v.to(self.device, non_blocking=True) for v in views),
                   labels.to(self.device, non_blocking=True))


# ----------------------------------------------------------------------------- evaluation
def eval_resize_for(size: int, resize: int | None) -> int:
    """The shorter side before the centre crop: `resize`, or size / 0.875 (256 for 224)."""
    return resize if resize else round(size / 0.875)


class CentreStream(Dataset):
    """Item i: the evaluation view of image i (uint8 (3, size, size)), its label, and the
    error that stopped it (None when it decoded)."""

    def __init__(self, index: FileIndex, size: int, resize: int):
        self.index, self.size, self.resize = index, size, resize

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        try:
            image = read_centre(self.index.path(i), self.size, self.resize)
            return torch.from_numpy(image).permute(2, 0, 1), int(self.index.labels[i]), None
        except DataError as err:
            return None, int(self.index.labels[i]), str(err)


def _collate_centre(items):
    good = [(x, y) for x, y, e in items if e is None]
    errors = [e for _, _, e in items if e is not None]
    if not good:
        return None, None, errors
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), errors


def stream_batches(stream: StreamSet, size: int, resize: int | None, batch_size: int,
                   device: torch.device, log: Callable[[str], None] | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation views of a streamed set in order, as (uint8 images, labels) batches on
    `device`. A file that fails to decode stops with its name, or with `skip_bad` is left
    out (reported once): labels come with the batches, so features and labels stay aligned.
    """
    dataset = CentreStream(stream.index, size, eval_resize_for(size, resize))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        num_workers=stream.workers, collate_fn=_collate_centre,
                        pin_memory=device.type == "cuda",
                        worker_init_fn=_one_thread if stream.workers else None)
    report = _Log(log)
    for images, labels, errors in loader:
        if errors and not stream.skip_bad:
            raise DataError(errors[0] + BAD_HINT)
        report.bad(errors)
        if images is not None:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

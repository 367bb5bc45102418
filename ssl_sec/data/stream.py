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
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl_sec.data.crops import BAD_HINT, BadFileLog, crop_box, read_centre, read_crops
from ssl_sec.data.index import FileIndex
from ssl_sec.data.loader import epoch_order, rank_batches
from ssl_sec.errors import DataError
from ssl_sec.preemption import ignore_stop_signals


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

    streamed = True

    def subset(self, indices: list[int]) -> StreamSet:
        return replace(self, index=self.index.subset(indices))

    def select_classes(self, class_ids: list[int]) -> StreamSet:
        return replace(self, index=self.index.select_classes(class_ids))

    def eval_batches(self, device: torch.device, size: int, resize: int | None = None,
                     batch_size: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The evaluation views (shorter side `resize`, centre crop `size`) in order, decoded
        by DataLoader workers: the set is never held in memory."""
        return stream_batches(self, size, resize, min(batch_size, 256), device)

    def digest(self) -> str:
        """What identifies its images: the file index (paths, sizes, times, labels)."""
        return "files:" + self.index.digest()


def _one_thread(_: int) -> None:
    # Each worker decodes one image at a time; torch threads inside workers only contend.
    torch.set_num_threads(1)
    ignore_stop_signals()


def _private_generator() -> torch.Generator:
    # A DataLoader draws its workers' base seed from this generator at every epoch; the
    # default (the global RNG) would shift the augmentation's random stream by one draw per
    # loader, so a resumed run (no kNN loaders before its first epoch) would diverge. Our
    # workers never use that seed: every crop is seeded by (seed, epoch, index).
    return torch.Generator().manual_seed(0)


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


# ----------------------------------------------------------------------------- GPU decoding
# What torchvision.io.decode_jpeg decodes on a GPU: baseline and progressive JPEGs in colour or
# greyscale. Anything else (PNG, CMYK JPEG, ...) is decoded by the worker and arrives as crops.
_DEVICE_DECODABLE = {("JPEG", "RGB"), ("JPEG", "L")}


class BytesStream(CropStream):
    """`data.decode: gpu`. Item (epoch, i): the file's bytes and each view's crop box, for the
    device to decode and crop; the boxes come from the index's image size with the same
    (seed, epoch, i) draws as `CropStream`, so both decoders cut the same boxes. A file the
    device cannot decode is decoded here and arrives as finished crops."""

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        path = str(self.index.path(i))
        fmt = (self.index.formats[i], self.index.modes[i])
        if fmt not in _DEVICE_DECODABLE:
            crops, label, skipped, error = super().__getitem__(key)
            return ("crops", None if crops is None else torch.stack(crops), None, label,
                    skipped, error, path)
        rng = np.random.default_rng((self.seed, epoch, i))
        width, height = self.index.sizes[i]
        boxes = torch.tensor([crop_box(rng, height, width, scale, ratio)
                              for scale, ratio in self.views])
        try:
            data = torch.frombuffer(bytearray(self.index.path(i).read_bytes()), dtype=torch.uint8)
        except OSError as err:
            return "crops", None, None, -1, [], f"image {path} cannot be read ({err})", path
        return "bytes", data, boxes, int(self.index.labels[i]), [], None, path


def _collate_bytes(items):
    """Variable-length items stay a list; the device decodes them."""
    errors = [it[5] for it in items if it[5]]
    skipped = [s for it in items for s in it[4]]
    return items, skipped, errors[0] if errors else None


def _resized(image: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """One box of a decoded (3, H, W) uint8 image resized to (3, size, size) uint8 with an
    antialiased bilinear filter (PIL's, as the CPU path), on the image's device."""
    top, left, h, w = box.tolist()
    patch = image[:, top:top + h, left:left + w].unsqueeze(0).float()
    out = torch.nn.functional.interpolate(patch, size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=True)
    return out.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)


def decode_on_device(items: list, size: int, device: torch.device, skip_bad: bool
                     ) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    """The crops of a `BytesStream` batch on `device`: JPEGs decoded there in one batched
    call, cut and resized there; worker-decoded crops copied. A JPEG the device cannot decode
    stops with its name, or with `skip_bad` takes the crops and label of the batch's first
    good image (the batch keeps its size; the file is reported). Returns (one
    (B, 3, size, size) uint8 tensor per view, labels, reasons of files replaced)."""
    with warnings.catch_warnings():
        # torchvision >= 0.29 deprecates its decoders in favour of TorchCodec; decode_jpeg on
        # CUDA is still there and is what this path uses.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return _decode_on_device(items, size, device, skip_bad)


def _decode_on_device(items: list, size: int, device: torch.device, skip_bad: bool
                      ) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [k for k, it in enumerate(items) if it[0] == "bytes"]
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        data = [items[k][1] for k in jpegs]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            decoded = dict(zip(jpegs, images, strict=True))
        except RuntimeError:  # one bad file fails the batch: find it by decoding one by one
            for k, payload in zip(jpegs, data, strict=True):
                try:
                    decoded[k] = decode_jpeg(payload, mode=ImageReadMode.RGB, device=device)
                except RuntimeError as err:
                    reason = (f"image {items[k][6]} cannot be decoded "
                              f"({str(err).splitlines()[0]})")
                    if not skip_bad:
                        raise DataError(reason + BAD_HINT) from None
                    decoded[k] = reason
    views: list[torch.Tensor | None] = []
    labels, replaced = [], []
    for k, (kind, payload, boxes, label, *_) in enumerate(items):
        if kind == "crops":
            views.append(payload.to(device, non_blocking=True))
        elif isinstance(decoded[k], str):
            replaced.append(decoded[k])
            views.append(None)
        else:
            views.append(torch.stack([_resized(decoded[k], box, size) for box in boxes]))
        labels.append(label)
    good = [k for k, v in enumerate(views) if v is not None]
    if not good:
        raise DataError(f"a whole batch failed to decode: {replaced[0]}{BAD_HINT}")
    for k, v in enumerate(views):
        if v is None:
            views[k], labels[k] = views[good[0]], labels[good[0]]
    crops = torch.stack(views)  # (B, V, 3, size, size)
    # (Built on the host and copied without waiting: a tensor made on the GPU from a list
    # would hold the host until the queued work is done, every step.)
    return list(crops.unbind(1)), torch.tensor(labels).to(device, non_blocking=True), replaced


class _EpochBatches(Sampler):
    """This rank's share of each global batch of the epoch's permutation, as (epoch, i) keys."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator,
                 shard: tuple[int, int], shuffle: bool):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world = shard
        self.shuffle, self.epoch, self.start = shuffle, 0, 0
        self.epoch_state: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        self.epoch_state = self.generator.get_state()
        order = epoch_order(self.n, self.generator, self.shuffle)
        start, self.start = self.start, 0  # a resumed epoch's first batch, this epoch only
        for idx in rank_batches(order, self.batch_size, len(self), (self.rank, self.world),
                                start):
            yield [(self.epoch, int(i)) for i in idx.tolist()]


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
        self.log = BadFileLog(log)
        self.dataset = dataset
        self.on_device = isinstance(dataset, BytesStream)
        self.loader = DataLoader(
            dataset, batch_sampler=self.batches, num_workers=workers,
            collate_fn=_collate_bytes if self.on_device else _collate_crops,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
            worker_init_fn=_one_thread if workers else None, generator=_private_generator())

    @property
    def generator(self) -> torch.Generator:
        return self.batches.generator

    @property
    def epoch_state(self) -> torch.Tensor | None:
        return self.batches.epoch_state

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Before iterating epoch `epoch`; `start` > 0 skips the batches a mid-epoch
        checkpoint had done (the generator then holds that epoch's `epoch_state`)."""
        self.batches.epoch, self.batches.start = epoch, start

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.on_device:
            yield from self._decoded_on_device()
            return
        for views, labels, skipped, error in self.loader:
            self.log.bad(skipped)
            if error:
                raise DataError(error + BAD_HINT)
            yield (*(v.to(self.device, non_blocking=True) for v in views),
                   labels.to(self.device, non_blocking=True))

    def _decoded_on_device(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for items, skipped, error in self.loader:
            self.log.bad(skipped)
            if error:
                raise DataError(error + BAD_HINT)
            views, labels, replaced = decode_on_device(items, self.dataset.size, self.device,
                                                       self.dataset.skip_bad)
            self.log.bad(replaced)
            yield *views, labels


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
                        worker_init_fn=_one_thread if stream.workers else None,
                        generator=_private_generator())
    report = BadFileLog(log)
    for images, labels, errors in loader:
        if errors and not stream.skip_bad:
            raise DataError(errors[0] + BAD_HINT)
        report.bad(errors)
        if images is not None:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

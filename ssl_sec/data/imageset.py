"""A labelled image set held in memory: uint8 images (N, 3, H, W) and int64 labels (N,).

It and the streamed set (`ssl_sec.data.stream.StreamSet`, files read from disk) answer the
same protocol, so evaluation and the trainer never ask which one they hold:

    len(s), s.labels, s.classes, s.subset(indices), s.select_classes(ids)
    s.eval_batches(device, size, resize, batch_size) -> (uint8 images, labels) in order
    s.digest() -> what identifies its images (the feature cache's key)
    s.streamed -> False here, True for a StreamSet (how its training batches are made)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ssl_sec.errors import DataError


@dataclass(frozen=True, eq=False)
class ImageSet:
    """An in-memory labelled image set.

    Attributes:
        images: uint8 ``(N, 3, H, W)``, contiguous.
        labels: int64 ``(N,)``; ``labels[i]`` indexes ``classes``, or is -1 in a split without
            labels (STL-10's ``unlabeled``).
        classes: class names (CIFAR names, or WNIDs for ImageFolder sets).
        name: dataset name, e.g. ``"cifar10"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise DataError(
                f"{self.name}: images must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        if not x.is_contiguous():
            raise DataError(f"{self.name}: images must be contiguous")
        if y.dtype != torch.int64 or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(
                f"{self.name}: labels must be int64 of shape ({x.shape[0]},), "
                f"got {y.dtype} {tuple(y.shape)}"
            )
        if y.device != x.device:
            raise DataError(f"{self.name}: images on {x.device} but labels on {y.device}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageSet:
        """The samples at ``indices`` (ints, or a boolean mask of length N), in that order."""
        idx = torch.as_tensor(indices, device=self.images.device)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise DataError(
                    f"{self.name}: boolean mask of shape {tuple(idx.shape)} for {len(self)} samples"
                )
            idx = idx.nonzero().flatten()
        idx = idx.long().flatten()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise DataError(f"{self.name}: subset index out of range for {len(self)} samples")
        return ImageSet(
            self.images.index_select(0, idx).contiguous(),
            self.labels.index_select(0, idx),
            list(self.classes),
            self.name,
        )

    def select_classes(self, class_ids: Sequence[int], remap: bool = False) -> ImageSet:
        """Keep only the samples whose label is in ``class_ids`` (original order of samples).

        With ``remap=False`` the labels keep their original ids and ``classes`` is unchanged, so
        labels still index the full class list (a 10-way classifier trained on the subset still
        works, and results stay comparable with the full set). With ``remap=True`` the label
        ``class_ids[k]`` becomes ``k`` and ``classes`` becomes ``[classes[i] for i in class_ids]``.
        """
        ids = [int(c) for c in class_ids]
        bad = [c for c in ids if not 0 <= c < self.num_classes]
        if bad:
            raise DataError(f"{self.name}: class ids {bad} out of range [0, {self.num_classes})")
        if len(set(ids)) != len(ids):
            raise DataError(f"{self.name}: repeated class ids in {ids}")
        id_t = torch.tensor(ids, dtype=torch.int64, device=self.labels.device)
        keep = torch.isin(self.labels, id_t).nonzero().flatten()
        images = self.images.index_select(0, keep).contiguous()
        labels = self.labels.index_select(0, keep)
        classes = list(self.classes)
        if remap:
            lut = torch.full((self.num_classes,), -1, dtype=torch.int64, device=labels.device)
            lut[id_t] = torch.arange(len(ids), device=labels.device)
            labels = lut[labels]
            classes = [self.classes[i] for i in ids]
        return ImageSet(images, labels, classes, self.name)

    streamed = False

    def to(self, device: torch.device) -> ImageSet:
        """The same set with its tensors on `device` (itself when they are there)."""
        if self.images.device == device:
            return self
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes, self.name)

    def eval_batches(self, device: torch.device, size: int | None = None,
                     resize: int | None = None, batch_size: int = 1024
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The images in order as (uint8 images, labels) batches on `device` (the eval view's
        crop is the transform's: `size` and `resize` are for streamed sets)."""
        for start in range(0, len(self), batch_size):
            yield (self.images[start:start + batch_size].to(device),
                   self.labels[start:start + batch_size].to(device))

    def digest(self) -> str:
        """blake2b of the pixels: the cache key covers the exact images, not just the dataset
        name (another data.root or a re-packed copy gets its own entry)."""
        return tensor_digest(self.images)


def tensor_digest(x: torch.Tensor) -> str:
    """blake2b of a tensor's bytes, shape and dtype."""
    data = x.detach().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((tuple(data.shape), str(data.dtype))).encode())
    digest.update(data.view(torch.uint8).reshape(-1).numpy().tobytes()
                  if data.numel() else b"")
    return digest.hexdigest()

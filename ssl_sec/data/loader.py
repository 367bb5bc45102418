"""Batches of a device-resident dataset, without DataLoader workers.

For small sets (CIFAR: 150 MB of uint8) the whole dataset lives on the training device and a batch
is one ``index_select``. The permutation is drawn on the CPU from an explicit ``torch.Generator``:
the same seed gives the same batches on any device, and ``loader.generator.get_state()`` is what a
checkpoint stores to resume the data order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ssl_sec.errors import ConfigError

__all__ = ["DeviceLoader", "epoch_order", "rank_batches"]


class DeviceLoader:
    """Iterate ``(images, labels)`` batches of tensors that already sit on the target device.

    Args:
        images: uint8 ``(N, 3, H, W)`` on the target device.
        labels: int64 ``(N,)`` on the same device.
        batch_size: samples per batch.
        shuffle: draw a fresh permutation from ``generator`` at the start of every epoch.
        drop_last: drop the last partial batch (the default for contrastive training, where the
            batch size sets the number of negatives).
        generator: CPU generator for the permutation; default: a new one seeded from the global
            torch RNG, so ``torch.manual_seed`` makes runs reproducible.
        shard: ``(rank, world)``; each rank yields its slice of every global batch.

    Iterating yields ``(images[idx], labels[idx])`` with ``idx`` a slice of the epoch's
    permutation: uint8 ``(B, 3, H, W)`` and int64 ``(B,)`` on the data's device.
    The generator state that produced the current epoch's permutation is kept in
    ``epoch_state``: a mid-epoch checkpoint saves it and the batch index, and a resume
    restores the generator to it and calls ``set_epoch(epoch, start=batch)``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ConfigError(
                f"DeviceLoader: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ConfigError(
                f"DeviceLoader: labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        if labels.device != images.device:
            raise ConfigError(
                f"DeviceLoader: images on {images.device} but labels on {labels.device}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(
                f"DeviceLoader: batch_size must be a positive int, got {batch_size!r}"
            )
        n = int(images.shape[0])
        if drop_last and batch_size > n:
            raise ConfigError(
                f"DeviceLoader: batch_size={batch_size} is larger than the dataset ({n} samples) "
                "with drop_last=True, so an epoch would have no batch; lower the batch size"
            )
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        elif generator.device.type != "cpu":
            raise ConfigError("DeviceLoader: generator must be a CPU torch.Generator")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator
        self.epoch_state: torch.Tensor | None = None
        self.start = 0
        # (rank, world): every rank draws the same permutation (same generator seed) and
        # takes its contiguous share of each global batch, so ranks never overlap.
        self.rank, self.world = shard
        if batch_size % self.world:
            raise ConfigError(f"DeviceLoader: batch_size={batch_size} is not divisible by the "
                              f"{self.world} processes")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Before iterating an epoch. The permutation comes from the generator's state alone;
        `start` > 0 skips the batches a mid-epoch checkpoint had done (the generator then
        holds that epoch's `epoch_state`)."""
        self.start = start

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch_state = self.generator.get_state()
        order = epoch_order(self.num_samples, self.generator, self.shuffle)
        order = order.to(self.images.device, non_blocking=True)
        start, self.start = self.start, 0  # a resumed epoch's first batch, this epoch only
        for idx in rank_batches(order, self.batch_size, len(self), (self.rank, self.world),
                                start):
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)


def epoch_order(n: int, generator: torch.Generator, shuffle: bool) -> torch.Tensor:
    """An epoch's sample order: a permutation from `generator` (whose state a checkpoint
    keeps), or 0..n-1."""
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


def rank_batches(order: torch.Tensor, batch_size: int, n_batches: int,
                 shard: tuple[int, int], start: int = 0) -> Iterator[torch.Tensor]:
    """This rank's contiguous share of global batches `start .. n_batches - 1` of `order`
    (shard = (rank, world); ranks never overlap)."""
    rank, world = shard
    for i in range(start, n_batches):
        idx = order[i * batch_size : (i + 1) * batch_size]
        if world > 1:
            share = len(idx) // world
            idx = idx[rank * share : (rank + 1) * share]
        yield idx

"""The input pipeline of a run: the loader of the pretraining set (the whole uint8 set on the
device, or files streamed by DataLoader workers), the two random views, the eval view, and
the kNN monitor's bank and test sets; plus the augmentation previews of a new run."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .augment import EvalTransform, TwoViews, ViewAugment, preview_grid
from .data import NORMALIZATION, DeviceLoader
from .data.crops import read_centre
from .data.stream import BytesStream, CropStream, StreamLoader, eval_resize_for
from .errors import ConfigError
from .progress import Logger, say

if TYPE_CHECKING:
    from .recipe import Config


def build_augment(cfg: Config, device: torch.device, crop: bool = True
                  ) -> tuple[TwoViews, EvalTransform]:
    """The two views (`augment`, and `augment2` when the views differ) and the eval view.
    crop=False: the loader delivers each view's crop (streaming), the views start at the flip."""
    mean, std = NORMALIZATION[cfg.data.dataset]
    first = ViewAugment.from_config(cfg.augment, mean, std, crop)
    second = (None if cfg.augment2 is None
              else ViewAugment.from_config(cfg.augment2, mean, std, crop))
    eval_view = EvalTransform(size=cfg.augment.size, mean=mean, std=std)
    return TwoViews(first, second).to(device), eval_view.to(device)


def data_pipeline(cfg: Config, splits, device: torch.device, rank: int, world: int):
    """The loader of the pretraining set, the two views, the eval view, and the kNN monitor's
    bank and test sets, for memory or streaming mode."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if splits.mode == "memory":
        # The whole uint8 set lives on the device; batches are index_select'ed there. The
        # kNN bank is usually the pretraining set itself: one device copy serves both.
        on_device = {}

        def moved(s):
            if id(s) not in on_device:
                on_device[id(s)] = s.to(device)
            return on_device[id(s)]

        pretrain = moved(splits.pretrain)
        loader = DeviceLoader(pretrain.images, pretrain.labels, cfg.optim.batch_size,
                              shuffle=True, drop_last=True, generator=generator,
                              shard=(rank, world))
        views, eval_transform = build_augment(cfg, device)
        return loader, views, eval_transform, [moved(splits.bank), moved(splits.test)]
    if cfg.data.decode == "gpu" and device.type != "cuda":
        raise ConfigError(f"data.decode=gpu needs a CUDA device, this run is on {device}; "
                          "use data.decode=cpu")
    second = cfg.augment2 or cfg.augment
    crops = [(cfg.augment.crop_scale, cfg.augment.crop_ratio),
             (second.crop_scale, second.crop_ratio)]
    kind = BytesStream if cfg.data.decode == "gpu" else CropStream
    dataset = kind(splits.pretrain.index, cfg.augment.size, crops, cfg.seed,
                   cfg.data.skip_bad_images)
    loader = StreamLoader(dataset, cfg.optim.batch_size, generator, device, (rank, world),
                          splits.pretrain.workers, log=say)
    views, eval_transform = build_augment(cfg, device, crop=False)
    return loader, views, eval_transform, [splits.bank, splits.test]


def _preview_images(cfg: Config, splits, device: torch.device) -> torch.Tensor:
    """16 pretraining images at the views' input size, for the augmentation previews."""
    if splits.mode == "memory":
        return splits.pretrain.images[:16].to(device)
    index, size = splits.pretrain.index, cfg.augment.size
    resize = eval_resize_for(size, cfg.data.eval_resize)
    pixels = [torch.from_numpy(read_centre(index.path(i), size, resize)).permute(2, 0, 1)
              for i in range(min(16, len(index)))]
    return torch.stack(pixels).to(device)


@torch.no_grad()
def log_previews(log: Logger, cfg: Config, splits, views: torch.nn.Module,
                  eval_transform: torch.nn.Module, device: torch.device) -> None:
    """The augmentation previews of a new run. They use their own generator state: they must
    not shift the training RNG stream (a resumed run has to replay the same draws)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        sample, stats = _preview_images(cfg, splits, device), NORMALIZATION[cfg.data.dataset]
        view1, view2 = views(sample)
        log.tb.add_image("augment/original", preview_grid(eval_transform(sample), *stats), 0)
        log.tb.add_image("augment/view1", preview_grid(view1, *stats), 0)
        log.tb.add_image("augment/view2", preview_grid(view2, *stats), 0)

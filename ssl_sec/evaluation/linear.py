"""Linear probe of a frozen backbone (docs/methods.md section 6).

The backbone stays in eval mode with `requires_grad_(False)` for the whole run (train-mode
BatchNorm would move its running statistics even without gradients); only `nn.Linear(D, C)`
trains, which is asserted (exactly two trainable tensors), and afterwards every backbone
parameter and buffer is checked to be bit-identical to before.

Two modes (recipe key `mode`):

- `full` (the standard protocol, google-research/simclr CIFAR): every step draws a random crop
  of the zero-padded image + horizontal flip on the device (`LinearTrainAugment`) and runs it
  through the frozen backbone; test images get the plain eval view.
- `features` (fast mode, labelled so in the result): the head trains on the cached
  un-augmented features of the training images; no augmentation, so it is typically a little
  below the full protocol, and it is not comparable with published linear numbers.

Both report the **final** epoch's test accuracy.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LinearConfig, LinearOptimConfig, load_linear_recipe, to_dict
from ..data import NORMALIZATION
from ..data.stream import CropStream, StreamLoader
from ..errors import ConfigError
from ..optim import set_lr
from ..runtime import autocast_for
from ..schedules import lr_at, step_decay
from .knn import topk_accuracy
from .session import EvalSession

if TYPE_CHECKING:
    from ..recipe import Config

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


# ----------------------------------------------------------------------------- frozen backbone
@contextlib.contextmanager
def frozen_backbone(backbone: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no gradients, and a bit-exact check of every parameter and buffer on exit.

    Raises RuntimeError when anything in the backbone's state dict changed (e.g. BatchNorm
    running statistics updated by a forward pass in train mode).
    """
    backbone.eval()
    backbone.requires_grad_(False)
    before = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    yield backbone
    after = backbone.state_dict()
    changed = [k for k, v in before.items()
               if k not in after or not torch.equal(after[k].detach(), v)]
    if changed or set(after) != set(before):
        raise RuntimeError(f"linear probe changed the frozen backbone ({len(changed)} tensors, "
                           f"e.g. {', '.join(changed[:3])}); it must stay in eval mode")


def check_trainable(backbone: nn.Module, head: nn.Module) -> None:
    """Exactly two trainable tensors (the head's weight and bias), as MoCo's lincls asserts."""
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    trainable += [f"head.{n}" for n, p in head.named_parameters() if p.requires_grad]
    if len(trainable) != 2 or not all(n.startswith("head.") for n in trainable):
        raise RuntimeError(f"linear probe must train exactly the head's weight and bias, "
                           f"found {len(trainable)} trainable tensors: {trainable[:5]}")


def make_head(dim: int, num_classes: int) -> nn.Linear:
    """nn.Linear(D, C) initialised N(0, 0.01), bias 0 (MoCo's main_lincls, SimCLR's head)."""
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


# ----------------------------------------------------------------------------- training loop
def lr_for(cfg: LinearOptimConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Cosine per step to 0, or step decay by `gamma` at each milestone epoch."""
    if cfg.schedule == "cosine":
        return lr_at(step, total_steps, 0, cfg.lr)
    return step_decay(cfg.lr, step // steps_per_epoch, cfg.milestones, cfg.gamma)


@torch.no_grad()
def evaluate_head(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 8192) -> dict[str, float]:
    head.eval()
    logits = torch.cat([head(feats[i:i + batch_size]) for i in range(0, feats.shape[0], batch_size)])
    return topk_accuracy(logits.float(), labels)


def train_head(head: nn.Linear, batches: Batches, steps_per_epoch: int,
               test_feats: torch.Tensor, test_labels: torch.Tensor, cfg: LinearOptimConfig,
               writer=None, log: Callable[[str], None] | None = None) -> dict:
    """SGD on the head alone; returns the final epoch's test top-1/top-5 and the history.

    `batches(epoch)` yields (features (B, D) float32, labels (B,)) on the head's device.
    """
    optimizer = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    step, history = 0, []
    for epoch in range(cfg.epochs):
        head.train()
        loss_sum = torch.zeros((), device=test_feats.device)
        seen = 0
        lr = cfg.lr
        for feats, labels in batches(epoch):
            lr = lr_for(cfg, step, total_steps, steps_per_epoch)
            set_lr(optimizer, lr)
            loss = F.cross_entropy(head(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # One host sync per epoch, not per step.
            loss_sum += loss.detach() * labels.shape[0]
            seen += labels.shape[0]
            step += 1
        train_loss = loss_sum.item() / max(seen, 1)
        if not math.isfinite(train_loss):
            raise ConfigError(f"linear probe loss became {train_loss} in epoch {epoch + 1}; "
                              "lower optim.lr")
        acc = evaluate_head(head, test_feats, test_labels)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": lr, **acc}
        history.append(row)
        if writer is not None:
            writer.add_scalar("linear/train_loss", train_loss, epoch + 1)
            writer.add_scalar("linear/lr", lr, epoch + 1)
            writer.add_scalar("linear/test_top1", acc["top1"], epoch + 1)
            writer.add_scalar("linear/test_top5", acc["top5"], epoch + 1)
        if log is not None:
            log(f"linear epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}  lr {lr:.4g}  "
                f"test top-1 {acc['top1']:.2f}  top-5 {acc['top5']:.2f}")
    return {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "history": history}


def _shuffled(n: int, batch_size: int, seed: int, device: torch.device) -> Callable[[int], list]:
    """Per-epoch index batches from a seeded CPU generator (same order on any device)."""
    def for_epoch(epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g).to(device)
        return list(perm.split(batch_size))
    return for_epoch


def probe_on_features(train_feats: torch.Tensor, train_labels: torch.Tensor,
                      test_feats: torch.Tensor, test_labels: torch.Tensor,
                      num_classes: int | None = None, cfg: LinearConfig | None = None,
                      writer=None, log=None) -> dict:
    """A linear head trained on fixed (e.g. cached, un-augmented) features: `ssl-sec linear
    mode=features`. cfg: the protocol (default: the CIFAR one, recipes/linear/cifar.yaml);
    num_classes: default the largest label + 1. Returns test top-1/top-5 and the head.

    Shape: train_feats (N, D), test_feats (Q, D), labels int64 in [0, num_classes).
    """
    cfg = cfg or LinearConfig()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    torch.manual_seed(cfg.seed)
    device = train_feats.device
    head = make_head(train_feats.shape[1], num_classes).to(device)
    order = _shuffled(train_feats.shape[0], cfg.optim.batch_size, cfg.seed, device)

    def batches(epoch: int):
        for idx in order(epoch):
            yield train_feats[idx], train_labels[idx]

    steps = math.ceil(train_feats.shape[0] / cfg.optim.batch_size)
    out = train_head(head, batches, steps, test_feats, test_labels, cfg.optim, writer, log)
    return {**out, "head": head}


def probe_full(backbone: nn.Module, train_batches: Batches, steps: int,
               test_feats: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
               cfg: LinearConfig, augment: nn.Module, feat_dim: int, device: torch.device,
               writer=None, log=None) -> dict:
    """Standard protocol: augmented uint8 batches through the frozen eval-mode backbone.

    `train_batches(epoch)` yields (uint8 images (B,3,H,W), labels (B,)) on `device`, `steps`
    per epoch; test_feats (Q, D) are the backbone's features of the plain test view
    (deterministic, so computing them once is exact).
    """
    torch.manual_seed(cfg.seed)
    head = make_head(feat_dim, num_classes).to(device)
    with frozen_backbone(backbone):
        check_trainable(backbone, head)

        def batches(epoch: int):
            for images, labels in train_batches(epoch):
                with torch.no_grad(), autocast_for(device, cfg.precision):
                    feats = backbone(augment(images))
                yield feats.float(), labels

        out = train_head(head, batches, steps, test_feats, test_labels, cfg.optim, writer, log)
    return {**out, "head": head}


def _train_batches(source, cfg: Config, lcfg: LinearConfig, device: torch.device
                   ) -> tuple[Batches, int]:
    """The probe's training batches per epoch and their number: index batches of the uint8
    set on the device, or, for a streamed set, one random-resized crop per image cut by the
    loader's workers (only the flip is left for the device)."""
    bs = lcfg.optim.batch_size
    if not source.streamed:
        images, labels = source.images.to(device), source.labels.to(device)
        order = _shuffled(images.shape[0], bs, lcfg.seed, device)
        return (lambda epoch: ((images[idx], labels[idx]) for idx in order(epoch)),
                math.ceil(images.shape[0] / bs))
    if lcfg.augment.crop != "resized":
        raise ConfigError(f"linear augment.crop={lcfg.augment.crop} needs the images in memory; "
                          "a streamed set is cropped by the loader: use augment.crop=resized "
                          "(recipes/linear/imagenet100.yaml)")
    crops = CropStream(source.index, cfg.augment.size,
                       [(lcfg.augment.crop_scale, (3 / 4, 4 / 3))], lcfg.seed, source.skip_bad)
    loader = StreamLoader(crops, bs, torch.Generator().manual_seed(lcfg.seed), device,
                          workers=source.workers)

    def batches(epoch: int):
        loader.set_epoch(epoch)
        return loader

    return batches, len(loader)


# ----------------------------------------------------------------------------- command
def _data_extra(saved: Config, cfg: LinearConfig) -> dict:
    """The linear recipe's data/model sections as a patch of the checkpoint's config."""
    data = {k: v for k, v in to_dict(cfg)["data"].items() if v is not None}
    if data.get("classes") == "all":
        data["classes"] = None
    elif "classes" not in data and data.get("dataset", saved.data.dataset) != saved.data.dataset:
        data["classes"] = None  # class ids of the pretraining set mean nothing in another one
    model = {k: v for k, v in to_dict(cfg)["model"].items() if v is not None}
    return {"data": data, "model": model, "device": cfg.device, "precision": cfg.precision}


def protocol_text(cfg: LinearConfig, dim: int, num_classes: int) -> str:
    o, a = cfg.optim, cfg.augment
    opt = (f"nn.Linear({dim}, {num_classes}) on pooled backbone features of the frozen eval-mode "
           f"backbone; SGD{' Nesterov' if o.nesterov else ''} lr {o.lr} momentum {o.momentum} "
           f"wd {o.weight_decay}, batch {o.batch_size}, {o.epochs} epochs, "
           + ("cosine schedule" if o.schedule == "cosine"
              else f"step schedule x{o.gamma} at epochs {o.milestones}")
           + "; test: plain eval view; reported: final epoch")
    if cfg.mode == "features":
        return ("FAST MODE (features): trained on cached un-augmented features, no train "
                "augmentation; not the standard protocol. " + opt)
    crop = (f"random crop (zero pad {a.padding})" if a.crop == "pad"
            else f"random resized crop (scale {a.crop_scale})")
    return (f"standard linear protocol (google-research/simclr): train augmentation {crop} + "
            f"horizontal flip (p={a.hflip_p}) on the device; " + opt)


OVERRIDES = ("overrides of the linear recipe, e.g. mode=features optim.epochs=30 "
             "data.dataset=cifar100")


def add_arguments(parser) -> None:
    parser.add_argument("--recipe", default=None,
                        help="linear recipe YAML (default: the built-in CIFAR protocol, "
                             "as recipes/linear/cifar.yaml)")


def run(args) -> dict:
    return linear_command(Path(args.checkpoint), args.recipe, args.overrides,
                          cache=not args.no_cache)


def linear_command(path: Path, recipe: str | Path | None, overrides: list[str],
                   cache: bool = True, verbose: bool | None = None) -> dict:
    """`ssl-sec linear`: train and test a linear probe; writes `<stem>.linear.json` and
    TensorBoard curves under `<checkpoint dir>/linear_tb/<stem>.<mode>/`."""
    from torch.utils.tensorboard import SummaryWriter

    from ..augment import LinearTrainAugment

    lcfg = load_linear_recipe(recipe, overrides)
    path = Path(path)
    # The probe's data, model, device and precision patch the checkpoint's config.
    session = EvalSession(path, data=lambda saved: _data_extra(saved, lcfg), cache=cache)
    cfg, device, backbone = session.cfg, session.device, session.model
    base, splits = session.pretrain_dataset, session.splits
    num_classes = len(splits.bank.classes)

    show = sys.stderr.isatty() if verbose is None else verbose
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if show else None
    t0 = time.perf_counter()

    def feats_of(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Raw (un-normalised) pooled features: what the head sees in the full protocol too.
        return session.features(split, normalize=False, precision=lcfg.precision)

    test_feats, test_y = feats_of("test")
    dim = test_feats.shape[1]
    tb_dir = path.parent / "linear_tb" / f"{path.stem}.{lcfg.mode}"
    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        if lcfg.mode == "features":
            with frozen_backbone(backbone):
                train_feats, train_y = feats_of("train")
            out = probe_on_features(train_feats, train_y, test_feats, test_y, num_classes,
                                    lcfg, writer, log)
            n_train = len(train_y)
        else:
            mean, std = NORMALIZATION[base]
            a = lcfg.augment
            streamed = splits.bank.streamed
            augment = LinearTrainAugment(size=cfg.augment.size, mean=mean, std=std,
                                         crop=None if streamed else a.crop, padding=a.padding,
                                         crop_scale=tuple(a.crop_scale),
                                         hflip_p=a.hflip_p).to(device)
            batches, steps = _train_batches(splits.bank, cfg, lcfg, device)
            out = probe_full(backbone, batches, steps, test_feats, test_y, num_classes, lcfg,
                             augment, dim, device, writer, log)
            n_train = len(splits.bank.labels)
    finally:
        writer.close()
    result = {"top1": out["top1"], "top5": out["top5"], "epochs": lcfg.optim.epochs,
              "protocol": protocol_text(lcfg, dim, num_classes), "mode": lcfg.mode,
              "dataset": cfg.data.dataset, "data_mode": splits.mode, "n_train": n_train,
              "n_test": len(test_y), "num_classes": num_classes, "feature_dim": dim,
              "checkpoint": str(path), "backbone_unchanged": True,
              "tensorboard": str(tb_dir), "recipe": to_dict(lcfg),
              "seconds": round(time.perf_counter() - t0, 2)}
    session.write("linear", result)
    return result

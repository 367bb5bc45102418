"""One feature-extraction routine for every evaluation (kNN monitor, kNN, linear, few-shot)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA ('auto' or 'bf16'); plain fp32 elsewhere."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cuda" and precision == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, transform: nn.Module,
                     batch_size: int = 1024, precision: str = "auto",
                     normalize: bool = True) -> torch.Tensor:
    """Eval-mode backbone features of uint8 images, no augmentation.

    Args:
        backbone: maps normalised images (B,3,h,w) to features (B,D).
        images: uint8 (N,3,H,W) on the device the features are computed on.
        transform: deterministic uint8 -> normalised float transform (EvalTransform).
    Returns:
        float32 (N, D), L2-normalised when `normalize`.
    """
    was_training = backbone.training
    # Train-mode BN would use batch statistics and update running stats: a classic
    # mistake in kNN monitors. Eval mode for the whole pass, restored afterwards.
    backbone.eval()
    device = images.device
    out = []
    try:
        with autocast_for(device, precision):
            for start in range(0, images.shape[0], batch_size):
                x = transform(images[start:start + batch_size])
                out.append(backbone(x).float())
    finally:
        backbone.train(was_training)
    feats = torch.cat(out) if out else images.new_zeros((0, 0), dtype=torch.float32)
    return F.normalize(feats, dim=1) if normalize else feats

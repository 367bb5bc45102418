"""Batched, per-sample image augmentation: the ONLY place augmentation happens.

Every pipeline takes a uint8 batch ``(B, 3, H, W)`` (as the datasets in :mod:`ssl_sec.data` hold
it) and returns normalised float32 views in ``channels_last`` memory format, on the input's device.
The uint8 -> float conversion is ``x.float().div_(255)``: Kornia's ops expect float input in
``[0, 1]`` (uint8 input would be silently wrong, not rejected, for several of them).

Every random parameter is drawn per sample (``same_on_batch=False``), unlike torchvision
transforms applied to a batched tensor, which use one crop for the whole batch.

Kornia 0.9 semantics this module relies on (read from ``kornia/augmentation`` in the installed
0.9.0; re-check them when upgrading):

* ``RandomResizedCrop(p=...)`` gates the whole *batch* (``p`` is passed as ``p_batch``); we always
  use ``p=1``. The crop is drawn per sample as in torchvision's ``get_params`` (10 tries, then a
  fallback). Default ``align_corners=True``; we pass ``False`` (the half-pixel grid of PIL/torchvision).
* ``ColorJitter`` (not ``ColorJiggle``) uses torchvision's formulas: brightness multiplies by the
  factor, contrast/saturation blend with the grey mean/grey image, hue is torchvision's shift, a
  scalar ``s`` draws from ``[max(0, 1 - s), 1 + s]`` (hue from ``[-s, s]``). The factors are drawn
  per sample, but the *order* of the four steps is one random permutation per call (torchvision
  draws it per image), and the input and output are clamped to ``[0, 1]``.
* ``RandomGrayscale`` defaults to ``p=0.1`` and ``RandomGaussianBlur`` to ``p=0.5``: we always pass
  ``p`` explicitly. Greyscale uses the ITU-R 601 weights (0.299, 0.587, 0.114), as torchvision.
* ``RandomSolarize(thresholds, additions)``: a scalar means a range *around a centre* (``0.1`` ->
  thresholds in ``[0.4, 0.6]``, additions in ``[-0.1, 0.1]``). A fixed threshold ``t`` is the pair
  ``(t, t)``; ``additions=0`` is needed or the op also shifts brightness. Pixels ``>= t`` are
  inverted (``torch.where(x < t, x, 1 - x)``), as in torchvision.

Where Kornia 0.9 samples the random parameters (``random_generator/base.py``, ``augmentation/base.py``):
it does NOT follow the input's device. Each op samples on the device its samplers were built for:
CPU at construction, changed only by ``module.to(device)`` (``_apply`` re-creates the samplers) or
``set_rng_device_and_dtype``. Without that, a CUDA batch gets CPU-drawn parameters that are copied
over. Some generators also move their output to the device of their *range arguments*
(``ResizedCropGenerator`` and ``PlainUniformGenerator`` call ``_extract_device_dtype`` on the ranges,
which is the default device, CPU, for Python floats). :class:`ViewAugment` therefore (re)builds its
ops for the device of the first batch it sees, passes the crop scale and the solarize ranges as
tensors on that device and sets every op's sampler device, so all per-sample parameters are drawn
on the input's device. What remains on the host: ``ColorJitter``'s step order
(``torch.randperm(4)`` on the CPU, read with ``.tolist()``) and its "skip a step whose factors are
all neutral" checks (``.any()`` in a Python ``if``, four device->host syncs per call on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from ssl_sec.errors import ConfigError

__all__ = [
    "ViewAugment",
    "EvalTransform",
    "LinearTrainAugment",
    "make_views",
    "preview_grid",
    "to_unit_float",
]

# Kornia's "slice" crop reads every box back to Python and resizes each sample on its own
# (B small interpolate calls plus a host sync); "resample" is one batched warp. Measured on CPU
# with CIFAR batches of 512 (eval/bench_augment.py) the warp is several times faster.
_CROP_MODE = "resample"


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 in ``[0, 1]`` (``x.float().div_(255)``).

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    return images.float().div_(255)


# ---------------------------------------------------------------------------------------------
# validation helpers: every message names the argument, so a config layer can pass it through
# ---------------------------------------------------------------------------------------------


def _prob(owner: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{owner}: {name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _nonneg(owner: str, name: str, value: float, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= upper:
        raise ConfigError(f"{owner}: {name} must be a number in [0, {upper}], got {value!r}")
    return float(value)


def _range(
    owner: str, name: str, value: Sequence[float], low: float, high: float, low_open: bool = True
) -> tuple[float, float]:
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if ok:
        a, b = float(value[0]), float(value[1])
        ok = (a > low if low_open else a >= low) and a <= b <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(
            f"{owner}: {name} must be an ordered pair (min, max) with "
            f"{bracket}{low}, {high}] bounds and min <= max, got {value!r}"
        )
    return a, b


def _size(owner: str, name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _stats(owner: str, name: str, value: Sequence[float], positive: bool) -> tuple[float, ...]:
    ok = isinstance(value, (tuple, list)) and len(value) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if ok and positive:
        ok = all(v > 0 for v in value)
    if not ok:
        need = "3 positive numbers" if positive else "3 numbers"
        raise ConfigError(f"{owner}: {name} must be {need} (one per RGB channel), got {value!r}")
    return tuple(float(v) for v in value)


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel, written out in ``channels_last`` format.

    Shape: ``(B, 3, H, W)`` float in ``[0, 1]`` -> ``(B, 3, H, W)`` float32, channels_last.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x, memory_format=torch.channels_last)
        mean = self.mean.to(x.device, non_blocking=True)
        inv_std = self.inv_std.to(x.device, non_blocking=True)
        return torch.mul(torch.sub(x, mean, out=out), inv_std, out=out)


def _kornia_ops(module: nn.Module) -> list[K.AugmentationBase2D]:
    return [m for m in module.modules() if isinstance(m, K.AugmentationBase2D)]


class ViewAugment(nn.Module):
    """One random SimCLR view per sample: uint8 batch in, normalised float32 view out.

    Order (SimCLR, Chen et al. 2020, appendix A): RandomResizedCrop -> horizontal flip ->
    colour jitter (p=``jitter_p``) -> greyscale (p=``gray_p``) -> [Gaussian blur] -> [solarize]
    -> normalise. An op whose probability is 0 is not constructed at all, so it costs nothing.

    Args (all keyword-only, plain values so the config layer can pass them through):
        size: output side length.
        crop_scale, crop_ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
        hflip_p: probability of a horizontal flip.
        jitter_p: probability of colour jitter; brightness, contrast, saturation, hue are the
            torchvision ``ColorJitter`` strengths (SimCLR CIFAR: 0.4, 0.4, 0.4, 0.1 = 0.5 x the
            ImageNet strength 0.8, 0.8, 0.8, 0.2).
        gray_p: probability of greyscale.
        blur_p, blur_sigma, blur_kernel_frac: Gaussian blur probability, sigma range and kernel
            side as a fraction of ``size`` (rounded, made odd, at least 3: 23 px at 224, 3 at 32).
            SimCLR uses blur on ImageNet but not on CIFAR.
        solarize_p, solarize_threshold: solarisation (BYOL's second view); pixels >= threshold
            are inverted and no brightness is added.
        mean, std: per-channel normalisation in [0, 1] scale (see ``ssl_sec.data.NORMALIZATION``).

    Shape: ``(B, 3, H, W)`` uint8 -> ``(B, 3, size, size)`` float32, channels_last, same device.
    """

    def __init__(
        self,
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        gray_p: float = 0.2,
        blur_p: float = 0.0,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        blur_kernel_frac: float = 0.1,
        solarize_p: float = 0.0,
        solarize_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        o = "ViewAugment"
        self.size = _size(o, "size", size)
        self.crop_scale = _range(o, "crop_scale", crop_scale, 0.0, 1.0)
        self.crop_ratio = _range(o, "crop_ratio", crop_ratio, 0.0, math.inf)
        self.hflip_p = _prob(o, "hflip_p", hflip_p)
        self.jitter_p = _prob(o, "jitter_p", jitter_p)
        self.brightness = _nonneg(o, "brightness", brightness)
        self.contrast = _nonneg(o, "contrast", contrast)
        self.saturation = _nonneg(o, "saturation", saturation)
        self.hue = _nonneg(o, "hue", hue, upper=0.5)
        self.gray_p = _prob(o, "gray_p", gray_p)
        self.blur_p = _prob(o, "blur_p", blur_p)
        self.blur_sigma = _range(o, "blur_sigma", blur_sigma, 0.0, math.inf)
        frac = _nonneg(o, "blur_kernel_frac", blur_kernel_frac, upper=1.0)
        if frac == 0.0:
            raise ConfigError(f"{o}: blur_kernel_frac must be in (0, 1], got {blur_kernel_frac!r}")
        self.blur_kernel_frac = frac
        kernel = max(3, round(frac * self.size))
        self.blur_kernel = kernel + 1 if kernel % 2 == 0 else kernel
        self.solarize_p = _prob(o, "solarize_p", solarize_p)
        self.solarize_threshold = _nonneg(o, "solarize_threshold", solarize_threshold, upper=1.0)
        self.mean = _stats(o, "mean", mean, positive=False)
        self.std = _stats(o, "std", std, positive=True)
        self.normalize = _Normalize(self.mean, self.std)
        self._device = torch.device("cpu")
        self.ops = self._build(self._device)

    def _build(self, device: torch.device) -> nn.Sequential:
        # Ranges that Kornia uses to decide where the parameters end up are given as tensors on
        # ``device`` (see the module docstring); everything else is a Python number.
        def on(pair: tuple[float, float]) -> torch.Tensor:
            return torch.tensor(pair, device=device, dtype=torch.float32)

        size = (self.size, self.size)
        ops: list[nn.Module] = [
            K.RandomResizedCrop(
                size,
                scale=on(self.crop_scale),
                ratio=self.crop_ratio,  # a tuple: a tensor ratio costs a host sync (float(ratio.min()))
                align_corners=False,
                cropping_mode=_CROP_MODE,
                p=1.0,
            )
        ]
        if self.hflip_p > 0:
            ops.append(K.RandomHorizontalFlip(p=self.hflip_p))
        jitter = (self.brightness, self.contrast, self.saturation, self.hue)
        if self.jitter_p > 0 and any(s > 0 for s in jitter):
            ops.append(K.ColorJitter(*jitter, p=self.jitter_p))
        if self.gray_p > 0:
            ops.append(K.RandomGrayscale(p=self.gray_p))
        if self.blur_p > 0:
            ops.append(
                K.RandomGaussianBlur(
                    (self.blur_kernel, self.blur_kernel),
                    self.blur_sigma,
                    border_type="reflect",
                    p=self.blur_p,
                )
            )
        if self.solarize_p > 0:
            t = self.solarize_threshold
            ops.append(
                K.RandomSolarize(thresholds=on((t, t)), additions=on((0.0, 0.0)), p=self.solarize_p)
            )
        seq = nn.Sequential(*ops)
        for op in _kornia_ops(seq):
            op.set_rng_device_and_dtype(device, torch.float32)
        return seq

    def _follow(self, device: torch.device) -> None:
        if device != self._device:
            self.ops = self._build(device)
            self._device = device

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # ``.to(device)`` / ``.cuda()`` rebuild the ops for the new device (see _build).
        out = super()._apply(fn, *args, **kwargs)
        self._follow(fn(torch.zeros(())).device)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_float(images)
        self._follow(x.device)
        x = self.ops(x)
        return self.normalize(x)

    def extra_repr(self) -> str:
        return f"size={self.size}, blur_kernel={self.blur_kernel}, mean={self.mean}, std={self.std}"


class EvalTransform(nn.Module):
    """Deterministic evaluation transform: uint8 -> [resize] -> [centre crop] -> normalise.

    Args:
        mean, std: per-channel normalisation in [0, 1] scale.
        size: if given, centre-crop to ``size x size`` (after the optional resize).
        resize: if given, first resize (bilinear, antialiased) so the shorter side is ``resize``
            (ImageNet protocol: resize=256, size=224). Datasets that were already preprocessed to
            their training size (``load_imagefolder(size=...)``, CIFAR) need neither.

    Shape: ``(B, 3, H, W)`` uint8 -> ``(B, 3, h, w)`` float32, channels_last, same device.
    """

    def __init__(
        self,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        size: int | None = None,
        resize: int | None = None,
    ) -> None:
        super().__init__()
        o = "EvalTransform"
        self.size = None if size is None else _size(o, "size", size)
        self.resize = None if resize is None else _size(o, "resize", resize)
        self.normalize = _Normalize(_stats(o, "mean", mean, False), _stats(o, "std", std, True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_float(images)
        if self.resize is not None:
            h, w = x.shape[-2:]
            scale = self.resize / min(h, w)
            new = (max(self.resize, int(h * scale)), max(self.resize, int(w * scale)))
            if new != (h, w):
                x = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)
                x = x.clamp_(0.0, 1.0)
        if self.size is not None:
            h, w = x.shape[-2:]
            if h < self.size or w < self.size:
                raise ConfigError(
                    f"EvalTransform: size={self.size} is larger than the images ({h}x{w}); "
                    "set resize >= size or a smaller size"
                )
            top, left = int(round((h - self.size) / 2)), int(round((w - self.size) / 2))
            x = x[..., top : top + self.size, left : left + self.size]
        return self.normalize(x)


class LinearTrainAugment(nn.Module):
    """Training augmentation for the linear probe: random crop + horizontal flip.

    ``crop="pad"`` (CIFAR): random ``size x size`` crop of the image zero-padded by ``padding``
    pixels (black, before normalisation, as torchvision's ``RandomCrop(32, padding=4)``), the
    protocol of the CIFAR linear evaluations. ``crop="resized"`` (ImageNet): RandomResizedCrop
    with ``crop_scale``.

    Shape: ``(B, 3, H, W)`` uint8 -> ``(B, 3, size, size)`` float32, channels_last, same device.
    """

    def __init__(
        self,
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop: str = "pad",
        padding: int = 4,
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip_p: float = 0.5,
    ) -> None:
        super().__init__()
        o = "LinearTrainAugment"
        self.size = _size(o, "size", size)
        if crop not in ("pad", "resized"):
            raise ConfigError(f"{o}: crop must be 'pad' or 'resized', got {crop!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"{o}: padding must be an int >= 0, got {padding!r}")
        scale = _range(o, "crop_scale", crop_scale, 0.0, 1.0)
        hflip_p = _prob(o, "hflip_p", hflip_p)
        ops: list[nn.Module] = []
        if crop == "pad":
            ops.append(K.RandomCrop((size, size), padding=padding or None, fill=0, p=1.0))
        else:
            ops.append(
                K.RandomResizedCrop(
                    (size, size), scale=scale, align_corners=False, cropping_mode=_CROP_MODE, p=1.0
                )
            )
        if hflip_p > 0:
            ops.append(K.RandomHorizontalFlip(p=hflip_p))
        self.ops = nn.Sequential(*ops)
        self.normalize = _Normalize(_stats(o, "mean", mean, False), _stats(o, "std", std, True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_float(images)
        for op in _kornia_ops(self.ops):
            if op.device != x.device:
                op.set_rng_device_and_dtype(x.device, torch.float32)
        return self.normalize(self.ops(x))


def make_views(
    aug1: nn.Module, aug2: nn.Module, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views of one uint8 batch; ``aug2`` may be ``aug1`` (two independent draws).

    Shape: ``(B, 3, H, W)`` uint8 -> two ``(B, 3, h, w)`` float32 tensors.
    """
    return aug1(batch), aug2(batch)


def preview_grid(
    views: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    n: int = 16,
) -> torch.Tensor:
    """Denormalise the first ``n`` views into a uint8 grid for TensorBoard's ``add_image``.

    Shape: ``(B, 3, h, w)`` float (normalised) -> ``(3, H, W)`` uint8 on the CPU.
    """
    from torchvision.utils import make_grid

    x = views[:n].detach().float().cpu()
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x * s + m).clamp_(0.0, 1.0)
    nrow = max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    grid = make_grid(x.contiguous(), nrow=nrow, padding=2, pad_value=1.0)
    return grid.mul(255).round_().to(torch.uint8)

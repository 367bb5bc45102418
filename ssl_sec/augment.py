"""Batched, per-sample image augmentation: the ONLY place augmentation happens.

Every pipeline takes a uint8 batch ``(B, 3, H, W)`` (as the datasets in :mod:`ssl_sec.data` hold
it) and returns normalised float32 views in ``channels_last`` memory format, on the input's device.

Why the orchestration is written here and not taken from ``kornia.augmentation``: a training step
must not wait for the host. Kornia's augmentation containers read device values back on every
call (a boolean-mask gather of the samples an op applies to, ``ColorJitter``'s step order via
``.tolist()`` and ``.any()`` checks, the blur's sigma check), so each view costs several host
syncs and the GPU idles between kernels. Here every random parameter is drawn on the batch's
device with a fixed number of draws per call, and each op is applied to the whole batch and
selected per sample with ``torch.where`` (on CUDA) or applied to the chosen rows only (on the
CPU, where compute is scarce and a sync is free). The pixel math of the colour steps is
Kornia's functional ``kornia.enhance`` (torchvision's formulas); crop, flip, blur and solarize
are a few lines of torch. Tests compare every op with torchvision's functional reference and
both scheduling strategies with each other.

Semantics (SimCLR, Chen et al. 2020, appendix A; torchvision transforms):

* RandomResizedCrop: torchvision's ``get_params`` (10 tries of area in ``scale`` x image area and
  log-uniform aspect ratio, integer box, else the centre-crop fallback), resized bilinearly with
  half-pixel centres and no antialiasing (``interpolate(..., align_corners=False)`` of the crop:
  samples never reach outside the box). Horizontal flip is folded into the same warp.
* Colour jitter (p = ``jitter_p``): brightness, contrast, saturation factors from
  ``[max(0, 1 - s), 1 + s]``, hue from ``[-h, h]``, applied in a random order drawn per sample
  (as torchvision does per image), each step clamped to ``[0, 1]``.
* Greyscale: ITU-R 601 weights (0.299, 0.587, 0.114), replicated to 3 channels.
* Gaussian blur: kernel side ``blur_kernel_frac * size`` (odd, >= 3), sigma per sample from
  ``blur_sigma``, reflect padding, separable.
* Solarize: pixels ``>= threshold`` inverted, nothing added.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from torch import nn

from ssl_sec.data.crops import centre_fallback
from ssl_sec.errors import ConfigError

if TYPE_CHECKING:
    from ssl_sec.config import AugmentConfig

__all__ = [
    "ViewAugment",
    "ViewParams",
    "EvalTransform",
    "LinearTrainAugment",
    "TwoViews",
    "preview_grid",
    "sample_crop_boxes",
    "resized_crop",
    "to_unit_float",
]


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 in ``[0, 1]`` (``x.float().div_(255)``).

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``.
    """
    _check_uint8(images)
    return images.float().div_(255)


def _check_uint8(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")


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


# ---------------------------------------------------------------------------------------------
# sampling: every draw on the batch's device, a fixed number of draws per call
# ---------------------------------------------------------------------------------------------


def _uniform(shape: tuple[int, ...], low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, device=device).mul_(high - low).add_(low)


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float], device: torch.device,
                      tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes with torchvision's ``get_params`` semantics, vectorised.

    For each sample: up to ``tries`` draws of an area fraction ``U(scale)`` and a log-uniform
    aspect ratio; the first whose rounded ``(w, h)`` fits the image wins and its corner is
    uniform over the valid positions; if none fits, the centre crop of ``_centre_fallback``.
    All tries are drawn at once (no data-dependent loop, no host sync).

    Returns: ``(n, 4)`` float32 ``[top, left, h, w]`` (integers), on ``device``.
    """
    area = float(height * width)
    target = _uniform((n, tries), scale[0] * area, scale[1] * area, device)
    aspect = _uniform((n, tries), math.log(ratio[0]), math.log(ratio[1]), device).exp_()
    w = torch.sqrt(target * aspect).round_()
    h = torch.sqrt(target / aspect).round_()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fit
    found = fits.any(dim=1)
    fw, fh = centre_fallback(height, width, ratio)
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fw))
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fh))
    corner = torch.rand((n, 2), device=device)
    top = torch.minimum((corner[:, 0] * (height - h + 1)).floor_(), height - h)
    left = torch.minimum((corner[:, 1] * (width - w + 1)).floor_(), width - w)
    top = torch.where(found, top, ((height - h) / 2).floor())
    left = torch.where(found, left, ((width - w) / 2).floor())
    return torch.stack([top, left, h, w], dim=1)


def _source_coords(start: torch.Tensor, length: torch.Tensor, size: int, extent: int
                   ) -> torch.Tensor:
    """grid_sample coordinates (align_corners=False) of ``size`` outputs resampled from the
    pixels ``[start, start + length)`` of an axis of ``extent`` pixels. Shape (B,) -> (B, size).

    ``interpolate(bilinear, align_corners=False)`` reads source position
    ``(i + 0.5) * length / size - 0.5``, clamped to ``[0, length - 1]``: the crop's own pixels
    only. The same clamp here keeps the warp of the full image from blending in neighbours."""
    i = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    src = (i[None, :] * (length / size)[:, None] - 0.5)
    src = torch.minimum(src.clamp_(min=0.0), (length - 1)[:, None]) + start[:, None]
    return src.mul_(2.0 / extent).add_(1.0 / extent - 1.0)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int,
                 flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each sample's box and resize it to ``size x size`` (bilinear), optionally mirrored,
    in one batched warp.

    Shape: x ``(B, C, H, W)`` float, boxes ``(B, 4)`` ``[top, left, h, w]``, flip ``(B,)`` bool
    -> ``(B, C, size, size)``.
    """
    height, width = x.shape[-2:]
    top, left, h, w = boxes.unbind(1)
    gx = _source_coords(left, w, size, width)
    gy = _source_coords(top, h, size, height)
    if flip is not None:
        gx = torch.where(flip[:, None], gx.flip(1), gx)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, reflect padding.

    Shape: x ``(B, C, H, W)``, sigma ``(B,)`` -> ``(B, C, H, W)``. One grouped convolution per
    axis (a kernel per sample and channel); kornia's ``gaussian_blur2d`` reads the sigmas back
    to check them, a host sync on the GPU."""
    b, c, height, width = x.shape
    t = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    taps = torch.exp(-(t[None, :] ** 2) / (2.0 * sigma[:, None].to(x.dtype) ** 2))
    taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)
    r = kernel // 2
    y = F.pad(x.reshape(1, b * c, height, width), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, taps.view(b * c, 1, 1, kernel), groups=b * c)
    y = F.conv2d(y, taps.view(b * c, 1, kernel, 1), groups=b * c)
    return y.view(b, c, height, width)


def _hue_turns(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    return adjust_hue(x, turns * (2 * math.pi))


def _solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


# The colour-jitter steps in torchvision's order of factors (brightness, contrast, saturation,
# hue); which one runs at each of the four positions is drawn per sample.
_JITTER_STEPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_saturation_with_gray_subtraction,
    _hue_turns,
)


def _where_rows(chosen: torch.Tensor, fn: Callable[..., torch.Tensor], x: torch.Tensor,
                *args: torch.Tensor, sync_free: bool) -> torch.Tensor:
    """``fn(x, *args)`` for the rows where ``chosen`` (B,) is True, ``x`` elsewhere.

    sync_free: compute ``fn`` on every row and select (no host sync: the GPU strategy), or
    gather the chosen rows, compute on those only and scatter back (the CPU strategy: it
    reads ``chosen`` on the host, which costs nothing there). Same values either way."""
    if sync_free:
        return torch.where(chosen.view(-1, 1, 1, 1), fn(x, *args), x)
    idx = chosen.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    return x.index_copy(0, idx, fn(x.index_select(0, idx), *(a.index_select(0, idx) for a in args)))


# The reasons of failed recordings already reported in this process.
_FAILED_RECORDINGS: set[str] = set()


class _GraphedView:
    """A view function recorded as a CUDA graph for one batch shape, replayed per call.

    Why: a view is ~400 small kernels (sampling, crop, four jitter positions x four steps,
    greyscale, normalise). At CIFAR size each takes a microsecond of GPU time but several of
    host time to launch, so op-by-op the GPU waits for Python (measured on an H100: 22.8 ms
    for the two views of a 512 batch, more than the 17.7 ms model step). Replaying a graph
    launches them all at once. This is possible because the pipeline never reads a device
    value back on CUDA (a graph cannot contain a host sync).

    Randomness: the graph's random kernels read the CUDA generator's seed and offset at each
    replay and advance it, so every replay draws fresh parameters from the generator's
    stream, and saving / restoring the generator state (checkpoints) works as without graphs.
    Warm-up and recording run under `fork_rng`, so they consume nothing from that stream: a
    resumed run records its graph again and continues the same stream.

    The graph writes into the same output buffer on every replay, so each call returns a
    copy (a ~12 MB device copy for two CIFAR views of 512: microseconds).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor):
        self.input = example.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.random.fork_rng(devices=[example.device]):
            side = torch.cuda.Stream(example.device)
            side.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation, allocator, kernel caches
                    fn(self.input)
            torch.cuda.current_stream(example.device).wait_stream(side)
            # thread_local: only this thread's calls may not break the recording. In the
            # default "global" mode a call such as cudaHostAlloc from ANY thread invalidates
            # it, and a streamed run has one: the DataLoader's pin-memory thread allocates
            # pinned buffers while the first batch's views are recorded (the ImageNet recipes
            # failed so, cudaErrorStreamCaptureInvalidated; in-memory CIFAR has no such thread).
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output = fn(self.input)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.input.copy_(images)
        self.graph.replay()
        return self.output.clone()


@dataclass
class ViewParams:
    """One view's random parameters, one row per sample (all on the batch's device).

    boxes (B, 4) crop ``[top, left, h, w]`` (None: the input is already cropped); flip (B,) bool; jitter (B,) bool;
    factors (B, 4) brightness, contrast, saturation, hue (in turns); order (B, 4) the step
    index at each position; gray, blur, solarize (B,) bool; sigma (B,) blur sigma.
    Ops that the pipeline does not include are None.
    """

    boxes: torch.Tensor | None
    flip: torch.Tensor | None = None
    jitter: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    order: torch.Tensor | None = None
    gray: torch.Tensor | None = None
    blur: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    solarize: torch.Tensor | None = None


class ViewAugment(nn.Module):
    """One random SimCLR view per sample: uint8 batch in, normalised float32 view out.

    Order (SimCLR appendix A): RandomResizedCrop -> horizontal flip -> colour jitter
    (p=``jitter_p``) -> greyscale (p=``gray_p``) -> [Gaussian blur] -> [solarize] -> normalise.
    An op whose probability is 0 is skipped entirely and draws no random numbers.

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
        sync_free: how per-sample ops are applied (see ``_where_rows``); None picks the
            sync-free strategy on CUDA and the row-gather one elsewhere.
        crop: False when the input is already cropped to ``size x size`` (a streaming loader
            cuts the crops from the full-resolution photos in its workers): the view then
            starts at the horizontal flip.
        cuda_graph: on CUDA, record the whole view (sampling included) once per batch shape as
            a CUDA graph and replay it: one launch instead of ~400 small kernels, each of
            which would otherwise cost more host time than GPU time (see ``_GraphedView``).
            If a recording fails, one warning line names the reason and the views are made
            op by op from then on (the same values): a speed optimisation never stops a run.

    Shape: ``(B, 3, H, W)`` uint8 -> ``(B, 3, size, size)`` float32, channels_last, same device.
    """

    @classmethod
    def from_config(cls, a: AugmentConfig, mean: Sequence[float], std: Sequence[float],
                    crop: bool = True) -> ViewAugment:
        """One view's augmentation from its recipe section (checked when the recipe loaded);
        mean, std: the dataset's normalisation."""
        return cls(size=a.size, crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio),
                   hflip_p=a.hflip_p, jitter_p=a.jitter_p, brightness=a.brightness,
                   contrast=a.contrast, saturation=a.saturation, hue=a.hue, gray_p=a.gray_p,
                   blur_p=a.blur_p, blur_sigma=tuple(a.blur_sigma), solarize_p=a.solarize_p,
                   mean=mean, std=std, crop=crop)

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
        sync_free: bool | None = None,
        crop: bool = True,
        cuda_graph: bool = True,
    ) -> None:
        super().__init__()
        o = "ViewAugment"
        self.size = _size(o, "size", size)
        self.crop_scale = _range(o, "crop_scale", crop_scale, 0.0, 1.0)
        self.crop_ratio = _range(o, "crop_ratio", crop_ratio, 0.0, math.inf)
        self.hflip_p = _prob(o, "hflip_p", hflip_p)
        self.jitter_p = _prob(o, "jitter_p", jitter_p)
        self.strengths = (
            _nonneg(o, "brightness", brightness),
            _nonneg(o, "contrast", contrast),
            _nonneg(o, "saturation", saturation),
            _nonneg(o, "hue", hue, upper=0.5),
        )
        self.gray_p = _prob(o, "gray_p", gray_p)
        self.blur_p = _prob(o, "blur_p", blur_p)
        self.blur_sigma = _range(o, "blur_sigma", blur_sigma, 0.0, math.inf)
        frac = _nonneg(o, "blur_kernel_frac", blur_kernel_frac, upper=1.0)
        if frac == 0.0:
            raise ConfigError(f"{o}: blur_kernel_frac must be in (0, 1], got {blur_kernel_frac!r}")
        kernel = max(3, round(frac * self.size))
        self.blur_kernel = kernel + 1 if kernel % 2 == 0 else kernel
        self.solarize_p = _prob(o, "solarize_p", solarize_p)
        self.solarize_threshold = _nonneg(o, "solarize_threshold", solarize_threshold, upper=1.0)
        self.mean = _stats(o, "mean", mean, positive=False)
        self.std = _stats(o, "std", std, positive=True)
        self.normalize = _Normalize(self.mean, self.std)
        self.sync_free = sync_free
        self.crop = crop
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, _GraphedView] = {}

    @property
    def jitters(self) -> bool:
        return self.jitter_p > 0 and any(s > 0 for s in self.strengths)

    def sample(self, n: int, height: int, width: int, device: torch.device) -> ViewParams:
        """Draw the random parameters of ``n`` views of ``height x width`` images."""
        boxes = sample_crop_boxes(n, height, width, self.crop_scale, self.crop_ratio, device) \
            if self.crop else None
        p = ViewParams(boxes)

        def coin(prob: float) -> torch.Tensor:
            return torch.rand(n, device=device) < prob

        if self.hflip_p > 0:
            p.flip = coin(self.hflip_p)
        if self.jitters:
            p.jitter = coin(self.jitter_p)
            # Factor ranges as torchvision's ColorJitter: [max(0, 1 - s), 1 + s], hue [-h, h].
            # (Python-number ranges: a torch.tensor(..., device=cuda) would be a host sync.)
            ranges = [(max(0.0, 1.0 - s), 1.0 + s) for s in self.strengths[:3]]
            ranges.append((-self.strengths[3], self.strengths[3]))
            p.factors = torch.stack([_uniform((n,), lo, hi, device) for lo, hi in ranges], dim=1)
            # A uniformly random permutation per row: the argsort of i.i.d. uniforms.
            p.order = torch.rand((n, 4), device=device).argsort(dim=1)
        if self.gray_p > 0:
            p.gray = coin(self.gray_p)
        if self.blur_p > 0:
            p.blur = coin(self.blur_p)
            p.sigma = _uniform((n,), *self.blur_sigma, device)
        if self.solarize_p > 0:
            p.solarize = coin(self.solarize_p)
        return p

    def apply(self, images: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """The view of each image under its parameters ``p`` (deterministic)."""
        _check_uint8(images)
        sync_free = images.is_cuda if self.sync_free is None else self.sync_free
        if p.boxes is not None:
            x = resized_crop(images.float(), p.boxes, self.size, p.flip).div_(255.0)
        else:  # already cropped: flip only
            if tuple(images.shape[-2:]) != (self.size, self.size):
                raise ValueError(f"ViewAugment(crop=False) expects {self.size}x{self.size} "
                                 f"crops, got {tuple(images.shape[-2:])}")
            x = images.float().div_(255.0)
            if p.flip is not None:
                x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if p.jitter is not None:
            for position in range(4):
                step = p.order[:, position]
                for k, fn in enumerate(_JITTER_STEPS):
                    if self.strengths[k] > 0:
                        x = _where_rows(p.jitter & (step == k), fn, x, p.factors[:, k],
                                        sync_free=sync_free)
        if p.gray is not None:
            x = torch.where(p.gray.view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
        if p.blur is not None:
            def blur(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                return _gaussian_blur(y, sigma, self.blur_kernel)

            x = _where_rows(p.blur, blur, x, p.sigma, sync_free=sync_free)
        if p.solarize is not None:
            x = torch.where(p.solarize.view(-1, 1, 1, 1), _solarize(x, self.solarize_threshold), x)
        return self.normalize(x)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """One random view per image, op by op (what the CUDA graph records)."""
        _check_uint8(images)
        n, _, height, width = images.shape
        return self.apply(images, self.sample(n, height, width, images.device))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self._records(images):
            return self.view(images)
        key = (tuple(images.shape), images.device)
        if key not in self._graphs:
            try:
                self._graphs[key] = _GraphedView(self.view, images)
            except Exception as err:  # noqa: BLE001 - a speed optimisation must not stop a run
                self._stop_recording(err, images.device)
                return self.view(images)
        return self._graphs[key](images)

    def _records(self, images: torch.Tensor) -> bool:
        """Whether this call replays (and first records) a CUDA graph."""
        return images.is_cuda and self.cuda_graph and not torch.is_grad_enabled()

    def _stop_recording(self, err: Exception, device: torch.device) -> None:
        """After a failed recording: views op by op from now on (the same values, slower),
        said in one line. The recording drew no random numbers (``fork_rng``), so the run's
        stream is unchanged. If the device itself is broken, its error is the real one."""
        if device.type == "cuda":
            try:
                torch.cuda.synchronize(device)
            except Exception:  # noqa: BLE001
                raise err from None
        self.cuda_graph, self._graphs = False, {}
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        if reason not in _FAILED_RECORDINGS:  # both views usually fail alike: say it once
            _FAILED_RECORDINGS.add(reason)
            print(f"ssl-sec: warning: the augmentation could not be recorded as a CUDA graph "
                  f"({reason}); making the views op by op instead (same values, slower)",
                  file=sys.stderr, flush=True)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        self._graphs = {}  # recorded on the old device / buffers: record again
        return super()._apply(fn, *args, **kwargs)

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
    with ``crop_scale``. ``crop=None``: the input is already cropped (a streaming loader cut
    it), only the flip is drawn. Parameters are drawn on the batch's device, no host sync.

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
        if crop not in ("pad", "resized", None):
            raise ConfigError(f"{o}: crop must be 'pad' or 'resized', got {crop!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"{o}: padding must be an int >= 0, got {padding!r}")
        self.crop = crop
        self.padding = padding
        self.crop_scale = _range(o, "crop_scale", crop_scale, 0.0, 1.0)
        self.hflip_p = _prob(o, "hflip_p", hflip_p)
        self.normalize = _Normalize(_stats(o, "mean", mean, False), _stats(o, "std", std, True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_uint8(images)
        n, _, height, width = images.shape
        device = images.device
        flip = torch.rand(n, device=device) < self.hflip_p
        if self.crop is None:  # cut by a streaming loader already: flip only
            x = images.float()
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        elif self.crop == "resized":
            boxes = sample_crop_boxes(n, height, width, self.crop_scale, (3 / 4, 4 / 3), device)
            x = resized_crop(images.float(), boxes, self.size, flip)
        else:
            x = self._padded_crop(images, flip)
        return self.normalize(x.div_(255.0))

    def _padded_crop(self, images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """A uniformly placed ``size x size`` window of the zero-padded image, gathered by index
        (exact pixels, no resampling)."""
        n, _, height, width = images.shape
        pad, size = self.padding, self.size
        if height + 2 * pad < size or width + 2 * pad < size:
            raise ConfigError(f"LinearTrainAugment: size={size} is larger than the padded "
                              f"images ({height}x{width} + 2 x {pad})")
        padded = F.pad(images.float(), (pad, pad, pad, pad))
        corner = torch.rand((n, 2), device=images.device)
        top = (corner[:, 0] * (height + 2 * pad - size + 1)).long()
        left = (corner[:, 1] * (width + 2 * pad - size + 1)).long()
        offsets = torch.arange(size, device=images.device)
        rows = top[:, None] + offsets                                  # (B, size)
        cols = left[:, None] + offsets
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        batch = torch.arange(n, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2)                                 # (B, 3, size, size)


class TwoViews(nn.Module):
    """The two views of a training step: view 1 with `first`'s settings, view 2 with
    `second`'s (asymmetric views, e.g. blur 1.0 / 0.1 and solarize 0 / 0.2 on ImageNet);
    `second=None` uses `first` for both, drawn independently.

    Shape: uint8 ``(B, 3, H, W)`` -> two ``(B, 3, size, size)`` float32. A second uint8 batch,
    when given, is the second view's own input (crops a streaming loader cut per view).
    """

    def __init__(self, first: nn.Module, second: nn.Module | None = None) -> None:
        super().__init__()
        self.first = first
        self.second = first if second is None else second

    def forward(self, images: torch.Tensor, images2: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(images), self.second(images if images2 is None else images2)


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

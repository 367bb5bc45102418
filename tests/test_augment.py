"""Augmentation pipelines: shapes, per-sample randomness, exact behaviour at p=0 and p=1."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from helpers import f32_close

from ssl_sec.augment import (
    _JITTER_STEPS,
    EvalTransform,
    LinearTrainAugment,
    TwoViews,
    ViewAugment,
    _gaussian_blur,
    preview_grid,
    resized_crop,
    sample_crop_boxes,
)
from ssl_sec.data import NORMALIZATION, load_cifar
from ssl_sec.errors import ConfigError

DATA = Path(os.environ.get("SSL_SEC_DATA") or Path(__file__).parents[2] / "shared" / "data")
MEAN, STD = NORMALIZATION["cifar10"]
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
# everything off and a crop that keeps the whole image
IDENTITY = {
    "crop_scale": (1.0, 1.0),
    "crop_ratio": (1.0, 1.0),
    "hflip_p": 0.0,
    "jitter_p": 0.0,
    "gray_p": 0.0,
    "blur_p": 0.0,
    "solarize_p": 0.0,
}


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """64 real images (CIFAR-100 subset) as uint8 (64, 3, 32, 32)."""
    return load_cifar("cifar100", DATA, train=False).images[:64]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255)


def test_view_shape_dtype_device_layout(batch: torch.Tensor) -> None:
    aug = ViewAugment(size=32, mean=MEAN, std=STD, blur_p=0.5, solarize_p=0.2)
    out = aug(batch)
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    assert out.device == batch.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    assert ViewAugment(size=24, mean=MEAN, std=STD)(batch).shape == (64, 3, 24, 24)
    with pytest.raises(TypeError):
        aug(batch.float())  # uint8 in, by contract


def test_parameters_sampled_on_input_device(batch: torch.Tensor) -> None:
    aug = ViewAugment(size=32, mean=MEAN, std=STD, blur_p=0.5, solarize_p=0.5)
    p = aug.sample(64, 32, 32, batch.device)
    drawn = [p.boxes, p.flip, p.jitter, p.factors, p.order, p.gray, p.blur, p.sigma, p.solarize]
    assert all(t is not None and t.device == batch.device and t.shape[0] == 64 for t in drawn)
    off = ViewAugment(size=32, mean=MEAN, std=STD, hflip_p=0.0, jitter_p=0.0, gray_p=0.0)
    q = off.sample(64, 32, 32, batch.device)  # ops with p = 0 draw nothing
    assert q.flip is None and q.jitter is None and q.gray is None
    assert q.blur is None and q.solarize is None


def _reference_boxes(seed: int, n: int, height: int, width: int, scale, ratio) -> list:
    """torchvision's RandomResizedCrop.get_params written out per sample (Python math), fed
    the same uniforms in the order sample_crop_boxes draws them."""
    torch.manual_seed(seed)
    area_u, ratio_u, corner_u = torch.rand(n, 10), torch.rand(n, 10), torch.rand(n, 2)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    out = []
    for s in range(n):
        for t in range(10):
            target = height * width * (scale[0] + (scale[1] - scale[0]) * area_u[s, t].item())
            aspect = math.exp(log_lo + (log_hi - log_lo) * ratio_u[s, t].item())
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(corner_u[s, 0].item() * (height - h + 1))
                left = int(corner_u[s, 1].item() * (width - w + 1))
                out.append((top, left, h, w))
                break
        else:  # centre crop at the nearest allowed ratio
            in_ratio = width / height
            if in_ratio < ratio[0]:
                w, h = width, round(width / ratio[0])
            elif in_ratio > ratio[1]:
                w, h = round(height * ratio[1]), height
            else:
                w, h = width, height
            out.append(((height - h) // 2, (width - w) // 2, h, w))
    return out


@pytest.mark.parametrize(("height", "width", "scale", "ratio"), [
    (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
    (48, 20, (0.5, 1.0), (0.5, 2.0)),
    (32, 32, (0.9, 1.0), (3.0, 4.0)),   # mostly impossible: the fallback path
    (20, 48, (1.0, 1.0), (0.2, 0.3)),   # never fits: fallback with the ratio cut
])
def test_crop_boxes_follow_torchvision_get_params(height, width, scale, ratio) -> None:
    torch.manual_seed(3)
    ours = sample_crop_boxes(400, height, width, scale, ratio, torch.device("cpu"))
    ref = _reference_boxes(3, 400, height, width, scale, ratio)
    mismatched = [i for i in range(400) if tuple(int(v) for v in ours[i]) != ref[i]]
    # float32 (ours) vs float64 (Python) can round a w or h that sits exactly at .5 apart
    assert len(mismatched) <= 2, mismatched[:5]
    top, left, h, w = ours.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all() and (h >= 1).all()


def test_resized_crop_equals_torchvision_per_sample(batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    boxes = sample_crop_boxes(64, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), torch.device("cpu"))
    flip = torch.rand(64) < 0.5
    for size in (32, 24, 40):  # same size, down- and upscaling
        ours = resized_crop(batch.float(), boxes, size, flip)
        for i in range(64):
            top, left, h, w = (int(v) for v in boxes[i])
            ref = TF.resized_crop(batch[i].float(), top, left, h, w, [size, size], antialias=False)
            ref = ref.flip(-1) if flip[i] else ref
            assert torch.allclose(ours[i], ref, atol=2e-3, rtol=0), (size, i)


def test_colour_ops_equal_torchvision(batch: torch.Tensor) -> None:
    x = _unit(batch)
    torch.manual_seed(1)
    factors = torch.stack([torch.rand(64) * 0.8 + 0.6, torch.rand(64) * 0.8 + 0.6,
                           torch.rand(64) * 0.8 + 0.6, torch.rand(64) * 0.2 - 0.1], dim=1)
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k, (ours, ref) in enumerate(zip(_JITTER_STEPS, refs, strict=True)):
        out = ours(x, factors[:, k])
        want = torch.stack([ref(x[i], factors[i, k].item()) for i in range(64)])
        assert torch.allclose(out, want, atol=1e-4, rtol=0), k
    sigma = torch.rand(64) * 1.9 + 0.1
    blurred = _gaussian_blur(x, sigma, 5)
    want = torch.stack([TF.gaussian_blur(x[i], [5, 5], [sigma[i].item()] * 2) for i in range(64)])
    assert torch.allclose(blurred, want, atol=1e-5, rtol=0)


def test_pipeline_matches_a_per_image_torchvision_loop(batch: torch.Tensor) -> None:
    """Jitter in each sample's own drawn step order, greyscale, solarize: the batched
    pipeline against a per-image loop of torchvision ops (crop off: scale 1, ratio 1)."""
    aug = ViewAugment(size=32, **UNIT, **{**IDENTITY, "jitter_p": 0.8, "gray_p": 0.3,
                                           "solarize_p": 0.3})
    p = aug.sample(64, 32, 32, batch.device)
    out = aug.apply(batch, p)
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    assert len({tuple(row) for row in p.order.tolist()}) > 10  # many orders in one batch
    for i in range(64):
        y = _unit(batch[i])
        if p.jitter[i]:
            for k in p.order[i].tolist():
                y = refs[k](y, p.factors[i, k].item())
        if p.gray[i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if p.solarize[i]:
            y = TF.solarize(y, 0.5)
        assert torch.allclose(out[i], y, atol=1e-3, rtol=0), i  # 1/4 of a grey level


def test_gpu_and_cpu_strategies_agree(batch: torch.Tensor) -> None:
    """Select-over-the-batch (sync-free, the CUDA strategy) and gather-the-rows (the CPU
    strategy) give the same views for the same parameters."""
    kwargs = {"size": 28, "mean": MEAN, "std": STD, "blur_p": 0.5, "solarize_p": 0.3}
    p = ViewAugment(**kwargs).sample(64, 32, 32, batch.device)
    a = ViewAugment(**kwargs, sync_free=True).apply(batch, p)
    b = ViewAugment(**kwargs, sync_free=False).apply(batch, p)
    # Normalised values reach |2.5|: a few ulps of those (the [0, 1] views below: of 1).
    assert torch.allclose(a, b, **f32_close(b, terms=2))


def test_same_seed_same_views(batch: torch.Tensor) -> None:
    aug = ViewAugment(size=32, mean=MEAN, std=STD, blur_p=0.5)
    torch.manual_seed(5)
    a = aug(batch)
    torch.manual_seed(5)
    assert torch.equal(a, aug(batch))


def test_per_sample_randomness(batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    same = batch[:1].expand(16, -1, -1, -1).contiguous()
    aug = ViewAugment(size=32, mean=MEAN, std=STD)
    out = aug(same)
    flat = out.flatten(1)
    distinct = {tuple(row.tolist()) for row in flat}
    assert len(distinct) == 16  # every copy of the image got its own crop/jitter
    v1, v2 = TwoViews(aug)(batch)
    assert not torch.equal(v1, v2)
    assert (v1 - v2).abs().flatten(1).amax(1).gt(0).all()


def test_identity_when_everything_is_off(batch: torch.Tensor) -> None:
    aug = ViewAugment(size=32, **UNIT, **IDENTITY)
    # The full-image box goes through the same bilinear warp: exact up to float rounding.
    assert torch.allclose(aug(batch), _unit(batch), atol=1e-6, rtol=0)
    normed = ViewAugment(size=32, mean=MEAN, std=STD, **IDENTITY)(batch)
    ref = (_unit(batch) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(normed, ref, **f32_close(ref, terms=2))


def test_probability_one_is_always_applied(batch: torch.Tensor) -> None:
    gray = ViewAugment(size=32, **UNIT, **{**IDENTITY, "gray_p": 1.0})(batch)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])

    flip = ViewAugment(size=32, **UNIT, **{**IDENTITY, "hflip_p": 1.0})(batch)
    assert torch.allclose(flip, _unit(batch).flip(-1), atol=1e-6, rtol=0)

    sol = ViewAugment(size=32, **UNIT, **{**IDENTITY, "solarize_p": 1.0}, solarize_threshold=0.5)(
        batch
    )
    x = ViewAugment(size=32, **UNIT, **IDENTITY)(batch)
    assert torch.equal(sol, torch.where(x < 0.5, x, 1.0 - x))  # inverted above, nothing added

    jit = ViewAugment(size=32, **UNIT, **{**IDENTITY, "jitter_p": 1.0})(batch)
    changed = (jit - x).abs().flatten(1).amax(1) > 0
    assert changed.all()


def test_gaussian_blur_kernel_and_effect(batch: torch.Tensor) -> None:
    assert ViewAugment(size=32, **UNIT).blur_kernel == 3
    assert ViewAugment(size=96, **UNIT).blur_kernel == 11
    assert ViewAugment(size=224, **UNIT).blur_kernel == 23
    blurred = ViewAugment(size=32, **UNIT, **{**IDENTITY, "blur_p": 1.0})(batch)

    def tv(x: torch.Tensor) -> torch.Tensor:
        return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
            x[..., 1:] - x[..., :-1]
        ).abs().mean()

    assert tv(blurred) < 0.9 * tv(_unit(batch))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"hflip_p": 1.5}, "hflip_p"),
        ({"jitter_p": -0.1}, "jitter_p"),
        ({"gray_p": 2}, "gray_p"),
        ({"blur_p": float("nan")}, "blur_p"),
        ({"solarize_p": 1.01}, "solarize_p"),
        ({"crop_scale": (0.9, 0.1)}, "crop_scale"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ({"crop_ratio": (2.0, 1.0)}, "crop_ratio"),
        ({"blur_sigma": (2.0, 0.1)}, "blur_sigma"),
        ({"hue": 0.6}, "hue"),
        ({"brightness": -1}, "brightness"),
        ({"size": 0}, "size"),
        ({"size": 32.0}, "size"),
        ({"solarize_threshold": 1.5}, "solarize_threshold"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs: dict, name: str) -> None:
    args = {"size": 32, "mean": MEAN, "std": STD, **kwargs}
    with pytest.raises(ConfigError, match=name):
        ViewAugment(**args)


def test_eval_transform_deterministic(batch: torch.Tensor) -> None:
    ev = EvalTransform(mean=MEAN, std=STD)
    a, b = ev(batch), ev(batch)
    assert torch.equal(a, b) and a.is_contiguous(memory_format=torch.channels_last)
    ref = (_unit(batch) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(a, ref, **f32_close(ref, terms=2))
    crop = EvalTransform(**UNIT, size=24)(batch)
    assert torch.equal(crop, _unit(batch)[..., 4:28, 4:28])
    resized = EvalTransform(**UNIT, resize=36, size=32)(batch)
    assert resized.shape == (64, 3, 32, 32) and torch.equal(
        resized, EvalTransform(**UNIT, resize=36, size=32)(batch)
    )
    with pytest.raises(ConfigError, match="size"):
        EvalTransform(**UNIT, size=40)(batch)


def test_linear_train_augment_is_padded_crop(batch: torch.Tensor) -> None:
    aug = LinearTrainAugment(size=32, **UNIT, padding=4, hflip_p=0.0)
    out = aug(batch[:8])
    assert out.shape == (8, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)
    padded = F.pad(_unit(batch[:8]), (4, 4, 4, 4))
    for i in range(8):  # every output is one 32x32 window of the zero-padded image
        windows = [padded[i, :, t : t + 32, s : s + 32] for t in range(9) for s in range(9)]
        assert any(torch.equal(out[i], w) for w in windows)
    resized = LinearTrainAugment(size=24, mean=MEAN, std=STD, crop="resized")(batch)
    assert resized.shape == (64, 3, 24, 24)
    with pytest.raises(ConfigError, match="crop"):
        LinearTrainAugment(size=32, mean=MEAN, std=STD, crop="centre")


def test_preview_grid_roundtrip(batch: torch.Tensor) -> None:
    views = ViewAugment(size=32, mean=MEAN, std=STD, **IDENTITY)(batch)
    one = preview_grid(views, MEAN, STD, n=1)
    assert one.dtype == torch.uint8 and one.shape == (3, 32, 32)
    assert (one.int() - batch[0].int()).abs().max() <= 1  # denormalised back to the pixels
    grid = preview_grid(views, MEAN, STD, n=16)
    assert grid.shape == (3, 4 * 34 + 2, 4 * 34 + 2)


def test_two_views_follow_their_own_settings(batch: torch.Tensor) -> None:
    """Asymmetric views: view 2 is always greyscale and solarised, view 1 never."""
    first = ViewAugment(size=32, **UNIT, **IDENTITY)
    second = ViewAugment(size=32, **UNIT, **{**IDENTITY, "gray_p": 1.0, "solarize_p": 1.0})
    v1, v2 = TwoViews(first, second)(batch)
    assert torch.allclose(v1, _unit(batch), atol=1e-6, rtol=0)
    assert torch.equal(v2[:, 0], v2[:, 1]) and (v2 <= 0.5 + 1e-6).all()  # grey, inverted above 0.5
    crops = (batch, batch.flip(-1))  # a second batch: the second view's own input
    w1, w2 = TwoViews(first)(*crops)
    assert torch.allclose(w2, _unit(batch).flip(-1), atol=1e-6, rtol=0)

"""Augmentation pipelines: shapes, per-sample randomness, exact behaviour at p=0 and p=1."""

from __future__ import annotations

import os
from pathlib import Path

import kornia.augmentation as K
import pytest
import torch
import torch.nn.functional as F

from ssl_sec.augment import (
    EvalTransform,
    LinearTrainAugment,
    ViewAugment,
    make_views,
    preview_grid,
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
    aug(batch)
    ops = [m for m in aug.modules() if isinstance(m, K.AugmentationBase2D)]
    assert len(ops) == 6
    assert all(op.device == batch.device for op in ops)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_follows_cuda_input(batch: torch.Tensor) -> None:
    aug = ViewAugment(size=32, mean=MEAN, std=STD, solarize_p=0.5)
    out = aug(batch.cuda())
    assert out.is_cuda
    assert all(
        op.device.type == "cuda" for op in aug.modules() if isinstance(op, K.AugmentationBase2D)
    )
    assert aug.ops[0]._params["src"].is_cuda  # crop boxes drawn and kept on the GPU


def test_per_sample_randomness(batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    same = batch[:1].expand(16, -1, -1, -1).contiguous()
    aug = ViewAugment(size=32, mean=MEAN, std=STD)
    out = aug(same)
    flat = out.flatten(1)
    distinct = {tuple(row[:64].tolist()) for row in flat}
    assert len(distinct) == 16  # every copy of the image got its own crop/jitter
    v1, v2 = make_views(aug, aug, batch)
    assert not torch.equal(v1, v2)
    assert (v1 - v2).abs().flatten(1).amax(1).gt(0).all()


def test_identity_when_everything_is_off(batch: torch.Tensor) -> None:
    aug = ViewAugment(size=32, **UNIT, **IDENTITY)
    assert [type(m).__name__ for m in aug.ops] == ["RandomResizedCrop"]  # p=0 ops not built
    assert torch.equal(aug(batch), _unit(batch))
    normed = ViewAugment(size=32, mean=MEAN, std=STD, **IDENTITY)(batch)
    ref = (_unit(batch) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(normed, ref, atol=1e-6, rtol=0)


def test_probability_one_is_always_applied(batch: torch.Tensor) -> None:
    gray = ViewAugment(size=32, **UNIT, **{**IDENTITY, "gray_p": 1.0})(batch)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])

    flip = ViewAugment(size=32, **UNIT, **{**IDENTITY, "hflip_p": 1.0})(batch)
    assert torch.equal(flip, _unit(batch).flip(-1))

    sol = ViewAugment(size=32, **UNIT, **{**IDENTITY, "solarize_p": 1.0}, solarize_threshold=0.5)(
        batch
    )
    x = _unit(batch)
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
    assert torch.allclose(a, ref, atol=1e-6, rtol=0)
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

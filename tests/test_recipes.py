"""Every recipe we ship runs: a few real steps of each `recipes/**/*.yaml` through the product
path (`engine.train` on `load_recipe(recipe, overrides)`; `linear_command` for recipes/linear/).

The list is globbed, so a new recipe is covered without editing this file. Each recipe runs
in two twins that share every line below except their `Scale`:

- `test_recipe_runs_on_cpu` (CI, ~2 min on 2 cores): CIFAR recipes keep their model
  (ResNet-18, CIFAR stem, 2048-wide heads) on 16 real CIFAR-10/100 images, batch 8, 2 steps,
  with 16-px views (a quarter of the cost of 32 px, at which the other CPU tests train).
  STL-10 recipes run the same way on tiny files in the official binary format (16 images
  per split; no STL-10 copy is needed).
  ImageNet-style recipes stream a generated folder of 500x375 JPEGs (4 classes, 32 train /
  16 val) at 64 px with 2 loader workers, batch 8, small heads; then they continue from
  their mid-epoch checkpoint, which must repeat the uninterrupted run exactly.
- `test_recipe_runs_on_gpu` (`-m gpu`, the acceptance suite, ~2 min on an H100/H200): the
  recipes' own batch sizes, heads and view sizes (224 px for ImageNet-style recipes, a 1,024-
  image folder, every core as a loader worker) in bf16; ImageNet-style recipes with
  `data.decode=cpu` and `data.decode=gpu`, then a mid-epoch resume; fp16 with loss scaling for
  FP16_RECIPE; every view recorded as a CUDA graph.

What each run must show: one finite training row per step with exactly the loss terms the
recipe asks for, the kNN result in range, a loadable checkpoint at the last step, and the
recipe's distinguishing settings in effect in what the engine really used (method,
optimizer, stem, feature width, SEC ramp, each view's augmentation, streaming with workers,
decode, precision). Linear recipes: two epochs on an untrained checkpoint of the data they
are for, with their protocol (mode, crop, dataset, lr schedule) in effect.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import write_stl10

import ssl_sec
from ssl_sec import engine
from ssl_sec.checkpoint import load_checkpoint
from ssl_sec.config import load_linear_recipe, to_dict
from ssl_sec.data.stream import StreamLoader, default_workers
from ssl_sec.evaluation.linear import linear_command
from ssl_sec.recipe import Config, load_recipe

ROOT = Path(__file__).resolve().parents[1]
# The JPEG-folder builder the benchmarks use too. Appended, not prepended: eval/ must not
# shadow the tests' own modules (helpers, conftest).
sys.path.append(str(ROOT / "eval"))
from jpeg_folder import build_jpeg_folder  # noqa: E402

RECIPES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))
# Pooled feature width of each backbone a recipe names (a new arch: add its width here).
FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048}
# fp16 with dynamic loss scaling on the GPU: the recipe with every term (MoCo's queue must
# never take keys from a step whose gradients overflowed; SEC and Circle in fp16).
FP16_RECIPE = "recipes/cifar10/moco_sec_circle.yaml"


@dataclass(frozen=True)
class Scale:
    """How big a twin runs the recipes. None keeps the recipe's own value."""

    device: str
    batch: int | None  # pretraining batch
    cifar_steps: int  # CIFAR: steps of the one epoch (train_subset = steps x batch)
    cifar_test: int  # CIFAR: test images for the kNN
    cifar_size: int | None  # CIFAR views (32 in the recipes)
    folder: dict  # the JPEG folder: train images, val images, classes
    image_size: int | None  # ImageNet-style views (224 in the recipes)
    heads: tuple[str, ...]  # overrides of the projection heads
    workers: int | None  # loader workers (None: the recipes' default, every core)
    decodes: tuple[str, ...]  # data.decode values an ImageNet-style recipe runs with
    exact_resume: bool  # deterministic device: a resumed run repeats the first one bit for bit
    linear: tuple[int, int, int]  # linear probe: train images, test images, batch


CPU = Scale(device="cpu", batch=8, cifar_steps=2, cifar_test=16, cifar_size=16,
            folder={"n": 32, "val": 16, "classes": 4}, image_size=64,
            heads=("model.proj_hidden_dim=128", "model.proj_output_dim=32"), workers=2,
            decodes=("cpu",), exact_resume=True, linear=(32, 16, 16))
GPU = Scale(device="cuda", batch=None, cifar_steps=4, cifar_test=1000, cifar_size=None,
            folder={"n": 1024, "val": 256, "classes": 10}, image_size=None, heads=(),
            workers=None, decodes=("cpu", "gpu"), exact_resume=False, linear=(512, 256, 256))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def jpeg_folders(tmp_path_factory):
    """ImageNet-style folders of 500x375 JPEGs (eval/jpeg_folder.py), each built once per
    session: `jpeg_folders(n=, val=, classes=)` -> the folder holding train/ and val/."""
    base = tmp_path_factory.mktemp("jpeg_folders")
    built: dict[tuple, Path] = {}

    def get(n: int, val: int, classes: int) -> Path:
        key = (n, val, classes)
        if key not in built:
            built[key] = build_jpeg_folder(base / f"{n}-{val}-{classes}", n, val, classes=classes)
        return built[key]

    return get


@pytest.fixture(scope="session")
def stl10_folders(tmp_path_factory):
    """STL-10 in its official binary format (tests/helpers.py `write_stl10`), built once per
    session: `stl10_folders(n, test)` -> a root holding stl10_binary/ with n unlabeled and n
    train images (the CIFAR runs' train_subset) and `test` test images."""
    base = tmp_path_factory.mktemp("stl10")
    built: dict[tuple, Path] = {}

    def get(n: int, test: int) -> Path:
        if (n, test) not in built:
            built[(n, test)] = base / f"{n}-{test}"
            write_stl10(built[(n, test)], train=n, test=test, unlabeled=n)
        return built[(n, test)]

    return get


@pytest.fixture
def used(monkeypatch) -> list[dict]:
    """What the engine really trained with, one entry per `train` call: its loader (kind,
    workers, decode) and its two views. (A wrapper around engine.data_pipeline, the one
    place that builds both: checks against the objects in use, not the recipe text.)"""
    seen: list[dict] = []
    real = engine.data_pipeline

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        loader = out[0]
        # Facts only, not the loader: holding it would keep its persistent workers alive.
        streamed = isinstance(loader, StreamLoader)
        seen.append({"streamed": streamed, "views": out[1],
                     "workers": loader.loader.num_workers if streamed else None,
                     "decode_on_device": streamed and loader.on_device})
        return out

    monkeypatch.setattr(engine, "data_pipeline", spy)
    return seen


# ----------------------------------------------------------------------------- the twins
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_on_cpu(recipe, tmp_path, data_root, jpeg_folders, stl10_folders, used,
                            make_checkpoint):
    _run_recipe(recipe, CPU, tmp_path, jpeg_folders, used, make_checkpoint, stl10_folders)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_on_gpu(recipe, tmp_path, data_root, jpeg_folders, stl10_folders, used,
                            make_checkpoint):
    _run_recipe(recipe, GPU, tmp_path, jpeg_folders, used, make_checkpoint, stl10_folders)


def _run_recipe(recipe: str, scale: Scale, tmp_path: Path, jpeg_folders, used,
                make_checkpoint, stl10_folders) -> None:
    if recipe.startswith("recipes/linear/"):
        _linear(recipe, scale, jpeg_folders(**scale.folder), make_checkpoint)
        return
    base = load_recipe(ROOT / recipe)
    common = [f"out_dir={tmp_path}", f"device={scale.device}", "log_every=1", "ckpt_every=0",
              "ckpt_every_minutes=0", "optim.epochs=1",
              # A recipe's warm-up may be longer than this one-epoch run (it must fit in it).
              f"optim.warmup_epochs={min(base.optim.warmup_epochs, 1)}"]
    common += [f"optim.batch_size={scale.batch}"] if scale.batch else []
    common += ["precision=fp16"] if scale.device == "cuda" and recipe == FP16_RECIPE else []
    batch = scale.batch or base.optim.batch_size
    if base.data.dataset != "imagefolder":
        extra = [f"augment.size={scale.cifar_size}"] if scale.cifar_size else []
        if base.data.dataset == "stl10":  # tiny files in the official format
            root = stl10_folders(scale.cifar_steps * batch, scale.cifar_test)
            extra.append(f"data.root={root}")
        # No download: a machine without the set (an offline GPU machine's data pack) says so
        # at once instead of waiting on the network.
        cfg = load_recipe(ROOT / recipe, [*common, f"data.train_subset={scale.cifar_steps * batch}",
                                          f"data.test_subset={scale.cifar_test}",
                                          "data.download=false", *extra])
        result = engine.train(cfg, progress_bar=False)
        _check_run(cfg, scale, tmp_path / cfg.name, result, scale.cifar_steps, used[-1])
        return
    # ImageNet-style: stream the 500x375 folder. A last.pt every steps/2 steps leaves the
    # mid-epoch checkpoint as prev.pt when the epoch ends: the resume below starts there.
    folder = jpeg_folders(**scale.folder)
    steps = scale.folder["n"] // batch
    middle = max(steps // 2, 1)
    common += [f"data.root={folder}", "data.classes_file=null", f"ckpt_every_steps={middle}",
               *scale.heads]
    common += [f"augment.size={scale.image_size}"] if scale.image_size else []
    common += [f"data.workers={scale.workers}"] if scale.workers is not None else []
    for decode in scale.decodes:
        cfg = load_recipe(ROOT / recipe, [*common, f"data.decode={decode}", f"name={decode}"])
        result = engine.train(cfg, progress_bar=False)
        _check_run(cfg, scale, tmp_path / decode, result, steps, used[-1])
    # Continue the last run from its mid-epoch checkpoint: new workers, the loader `middle`
    # batches into the epoch, the views recorded again on a GPU.
    run = tmp_path / cfg.name
    assert load_checkpoint(run / "prev.pt")["batch_in_epoch"] == middle < steps
    first_rows, first = _train_rows(run), load_checkpoint(run / "last.pt")["model"]
    resumed = engine.train(cfg, resume=run / "prev.pt", progress_bar=False)
    _check_run(cfg, scale, run, resumed, steps, used[-1])
    if scale.exact_resume:  # the CPU is deterministic: the same steps and weights exactly
        assert [r["loss/total"] for r in _train_rows(run)] == \
            [r["loss/total"] for r in first_rows]
        again = load_checkpoint(run / "last.pt")["model"]
        for key, value in first.items():
            torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key,
                                       equal_nan=True)


# ----------------------------------------------------------------------------- checks
def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_rows(run: Path) -> list[dict]:
    return [r for r in _rows(run) if r["kind"] == "train"]


def _check_run(cfg: Config, scale: Scale, run: Path, result: dict, steps: int,
               used_run: dict) -> None:
    """One finite row per step with the recipe's loss terms, the kNN result, the checkpoint,
    and the method, optimizer, SEC ramp, backbone, data path, views and precision the
    recipe names."""
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    terms = {"loss/total", "loss/infonce"}
    terms |= {"loss/sec"} if cfg.loss.sec.eta > 0 else set()
    terms |= {"loss/circle"} if cfg.loss.circle.weight > 0 else set()
    for r in rows:
        assert {k for k in r if k.startswith("loss/")} == terms, r
        assert all(math.isfinite(r[k]) for k in terms), r
    if cfg.loss.sec.eta > 0:
        weights = [r["diag/sec_weight"] for r in rows]
        if cfg.loss.sec.ramp == "linear":  # 0 at the first step, eta at the last
            assert weights[0] == 0 and weights == sorted(weights)
            assert weights[-1] == pytest.approx(cfg.loss.sec.eta, rel=1e-5)
        else:
            assert weights == pytest.approx([cfg.loss.sec.eta] * steps, rel=1e-5)
    fp16 = cfg.precision == "fp16"
    assert all(("perf/loss_scale" in r) == fp16 for r in rows)  # loss scaling: fp16 only
    knn = [r for r in _rows(run) if r["kind"] == "knn"]
    assert len(knn) == 1 and 0 <= knn[0]["knn/top1"] <= knn[0]["knn/top5"] <= 100, knn
    assert result["top1"] == knn[0]["knn/top1"] and result["step"] == steps

    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == steps and ckpt["config"] == to_dict(cfg)
    assert ("lars_exclude" in ckpt["optimizer"]["param_groups"][0]) == (cfg.optim.name == "lars")
    assert ckpt["optimizer"]["state"], "no optimizer step was taken"
    assert (ckpt["scaler"].get("scale", 0) > 0) == fp16
    model = ckpt["model"]
    if cfg.method == "moco":
        assert 0 < int(model["queue_len"]) <= cfg.moco.queue_size
        assert model["queue"].shape == (cfg.moco.queue_size, cfg.model.proj_output_dim)
        assert any(k.startswith("momentum_encoder.") for k in model)
    elif cfg.method == "mocov3":  # a momentum encoder and a predictor, no queue
        assert any(k.startswith("momentum_encoder.") for k in model)
        assert any(k.startswith("predictor.") for k in model)
        assert not any(k.startswith("queue") for k in model)
    else:
        assert not any(k.startswith(("queue", "momentum_encoder.")) for k in model)
    # The checkpoint's backbone as a user loads it: the recipe's stem and feature width.
    backbone = ssl_sec.load_backbone(run / "last.pt")
    assert backbone.conv1.kernel_size == ((3, 3) if cfg.model.cifar_stem else (7, 7))
    with torch.no_grad():
        feats = backbone(torch.zeros(2, 3, cfg.augment.size, cfg.augment.size))
    assert feats.shape == (2, FEATURE_DIMS[cfg.model.arch]) and torch.isfinite(feats).all()

    streamed = cfg.data.dataset == "imagefolder"
    assert used_run["streamed"] == streamed  # CIFAR: the uint8 set on the device
    if streamed:
        assert used_run["workers"] == (default_workers() if cfg.data.workers is None
                                       else cfg.data.workers)
        assert used_run["decode_on_device"] == (cfg.data.decode == "gpu")
    # Each view with its own recipe section (`augment2` for the second view where the recipe
    # has one: ImageNet's asymmetric blur / solarize), cropped by the loader when streamed.
    first, second = used_run["views"].first, used_run["views"].second
    assert (second is first) == (cfg.augment2 is None)
    for view, want in ((first, cfg.augment), (second, cfg.augment2 or cfg.augment)):
        got = (view.size, view.hflip_p, view.jitter_p, view.gray_p, view.blur_p,
               view.solarize_p, tuple(view.blur_sigma), view.crop)
        assert got == (want.size, want.hflip_p, want.jitter_p, want.gray_p, want.blur_p,
                       want.solarize_p, tuple(want.blur_sigma), not streamed)
        if scale.device == "cuda":
            # Recorded as a CUDA graph (at 224 px with blur and solarize too): a failed
            # recording falls back to op-by-op views, correct but slow, and must not go unseen.
            assert view.cuda_graph and view._graphs, "the views fell back to op-by-op"


def _linear(recipe: str, scale: Scale, folder: Path, make_checkpoint) -> None:
    """Two epochs of the linear recipe on an untrained checkpoint of the data it is for, its
    protocol in effect and every number in range. A recipe whose training crop is `resized`
    is the ImageNet protocol (a streamed folder needs it): its checkpoint streams the JPEG
    folder. The others get a CIFAR-10 checkpoint (recipes/linear/cifar100.yaml then is the
    transfer evaluation it documents)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lcfg = load_linear_recipe(ROOT / recipe)
    imagenet = lcfg.augment.crop == "resized"
    n_train, n_test, batch = scale.linear
    workers = "null" if scale.workers is None else scale.workers
    path = make_checkpoint(*([] if not imagenet else [
        "data.dataset=imagefolder", f"data.root={folder}", "data.mode=stream",
        f"data.workers={workers}", f"augment.size={scale.image_size or 224}"]))
    result = linear_command(path, ROOT / recipe,
                            ["optim.epochs=2", f"optim.batch_size={batch}",
                             f"device={scale.device}", f"data.train_subset={n_train}",
                             f"data.test_subset={n_test}"], verbose=False)
    assert json.loads(path.with_name("last.linear.json").read_text())["top1"] == result["top1"]
    assert result["backbone_unchanged"] and result["feature_dim"] == FEATURE_DIMS["resnet18"]
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert (result["n_train"], result["n_test"], result["epochs"]) == (n_train, n_test, 2)
    assert result["mode"] == lcfg.mode
    assert result["protocol"].startswith("FAST MODE") == (lcfg.mode == "features")
    if lcfg.mode == "full":
        assert ("random resized crop" if imagenet else "random crop (zero pad") \
            in result["protocol"]
    dataset = lcfg.data.dataset or ("imagefolder" if imagenet else "cifar10")
    classes = {"cifar10": 10, "cifar100": 100, "imagefolder": scale.folder["classes"]}
    assert (result["dataset"], result["num_classes"]) == (dataset, classes[dataset])
    assert result["data_mode"] == ("stream" if imagenet else "memory")
    # The lr schedule in effect, per epoch as logged: cosine decays within the two epochs,
    # the ImageNet step schedule holds the base lr until its first milestone (epoch 60).
    events = EventAccumulator(result["tensorboard"])
    events.Reload()
    lrs = [e.value for e in events.Scalars("linear/lr")]
    losses = [e.value for e in events.Scalars("linear/train_loss")]
    assert len(lrs) == len(losses) == 2 and all(map(math.isfinite, losses))
    if lcfg.optim.schedule == "cosine":
        assert lcfg.optim.lr > lrs[0] > lrs[1]
    else:
        assert lrs == pytest.approx([lcfg.optim.lr] * 2)

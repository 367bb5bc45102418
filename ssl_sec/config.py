"""The recipe schema: one set of dataclasses that holds every default.

A recipe YAML names only what differs from these defaults; unknown keys, wrong types and
out-of-range values are errors (`ConfigError`), never silently ignored. Dotted overrides
(`optim.lr=0.3`) are parsed as YAML scalars and go through the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .archs import check_arch
from .data.registry import DATASETS
from .errors import ConfigError
from .runtime import PRECISIONS


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    # Where the data lives; None means $SSL_SEC_DATA, then ./data.
    root: str | None = None
    # Download the official archive (md5-verified) when the data is not found (CIFAR; an
    # image folder has no official archive).
    download: bool = True
    # Keep only these class ids (e.g. source classes for few-shot transfer); None = all.
    classes: list[int] | None = None
    # Use only the first N training / test images (0 = all): for quick runs and tests.
    train_subset: int = 0
    test_subset: int = 0
    # ImageFolder only: side of the square the images are resized to when loaded.
    image_size: int = 64
    # ImageFolder only: a file with one class folder name (WNID) per line, e.g. ImageNet-100.
    classes_file: str | None = None
    # ImageFolder only. "memory": decode the set once at image_size and keep it on the device;
    # "stream": read the files from disk every epoch (crops from the full-resolution photos,
    # ssl_sec/data/stream.py); "auto": memory when the decoded set fits memory_budget_gb.
    # CIFAR is always in memory.
    mode: str = "auto"
    memory_budget_gb: float = 8.0
    # Stream: DataLoader worker processes (null = every core of the machine).
    workers: int | None = None
    # Stream: "cpu" decodes in the workers; "gpu" has them read the file bytes only and the
    # device decode the JPEGs (torchvision.io.decode_jpeg on CUDA).
    decode: str = "cpu"
    # A file that cannot be read stops the run with its name; true: leave it out (reported once).
    skip_bad_images: bool = False
    # Stream evaluation view: shorter side resized to this before the centre crop at
    # augment.size (null: augment.size / 0.875, i.e. 256 for 224).
    eval_resize: int | None = None


@dataclass
class AugmentConfig:
    """SimCLR view augmentation; every probability and range explicit (kornia defaults differ)."""

    size: int = 32
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: float = 0.0


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    # 3x3 stride-1 conv1 and no max-pool: the standard for 32x32 images.
    cifar_stem: bool = True
    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128
    # channels_last helps convolutions on GPUs and on recent CPUs alike.
    channels_last: bool = True


@dataclass
class MocoConfig:
    queue_size: int = 4096
    momentum: float = 0.99
    # "constant" or "cosine" (cosine-increased to 1 over the run, as BYOL / solo-learn).
    momentum_schedule: str = "constant"
    symmetric: bool = True
    # Single-device BatchNorm remedy: "split" (split-BN into groups) or "none".
    bn_remedy: str = "split"
    bn_splits: int = 8


@dataclass
class LossConfig:
    temperature: float = 0.2
    w_infonce: float = 1.0
    # SEC: eta(t) * mean_i (||z_i|| - mu)^2.
    sec_eta: float = 0.0
    # "constant" or "linear" (0 -> eta over the run, as the SEC authors' SSL code).
    sec_ramp: str = "constant"
    # "batch": mu = detached mean norm of the batch; "ema": mu kept in a checkpointed buffer.
    sec_mu: str = "batch"
    sec_momentum: float = 0.1
    # "projector" (z, default) or "backbone" (pooled features h).
    sec_on: str = "projector"
    # Circle-style term (issue 3). margin / gamma: the best mean over 3 seeds of the sweep
    # in eval/sweep_circle.py (eval/RESULTS.md), as in the recipes.
    w_circle: float = 0.0
    circle_margin: float = 0.4
    circle_gamma: float = 4.0


@dataclass
class OptimConfig:
    name: str = "lars"
    lr: float = 0.8
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 512
    epochs: int = 200
    warmup_epochs: float = 10.0
    # Final lr of the cosine schedule as a fraction of lr.
    min_lr_ratio: float = 0.0
    # Max gradient norm (0 = no clipping).
    grad_clip: float = 0.0
    # LARS trust coefficient.
    lars_eta: float = 0.02


@dataclass
class EvalConfig:
    # Run the kNN monitor every this many epochs (0 = only at the end).
    knn_every: int = 10
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_backend: str = "auto"
    # Memory budget for one chunk of the kNN similarity matrix.
    knn_memory_mb: int = 1024


@dataclass
class Config:
    method: str = "simclr"
    seed: int = 0
    # "auto" = cuda when available, else cpu.
    device: str = "auto"
    # auto | bf16 | fp16 | fp32 (ssl_sec/runtime.py): "auto" = bf16 autocast on CUDA (fp16 +
    # loss scaling on GPUs without bf16), fp32 on the CPU; "bf16" is autocast on the CPU too.
    precision: str = "auto"
    # Deterministic kernels only (bit-exact resume on CUDA; slower). The CPU is deterministic
    # without it.
    deterministic: bool = False
    # Runs go to out_dir/name; an existing run directory is never overwritten.
    out_dir: str = "runs"
    name: str = "run"
    log_every: int = 50
    # Keep a numbered checkpoint every this many epochs (0 = only last.pt).
    ckpt_every: int = 50
    # last.pt is written at every epoch end and, within an epoch, every this many steps
    # and/or minutes (0 = off), with the loader position: a kill loses at most one
    # interval. The checkpoint it replaces is kept as prev.pt.
    ckpt_every_steps: int = 0
    ckpt_every_minutes: float = 10.0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The second view's augmentation when the views differ (BYOL's and solo-learn's
    # ImageNet setting: blur 1.0 / 0.1, solarize 0 / 0.2). Keys it does not give take
    # `augment`'s values; absent = both views use `augment`.
    augment2: AugmentConfig | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- linear probe
@dataclass
class LinearDataConfig:
    """What the probe trains and tests on. A None inherits the checkpoint's pretraining data
    setting; a different `dataset` drops the checkpoint's `classes` (ids of another set)."""

    dataset: str | None = None
    root: str | None = None
    download: bool | None = None
    # A list of class ids, "all" (every class), or None (the checkpoint's own choice).
    classes: list[int] | str | None = None
    # The protocol uses every labelled image (0 = all), whatever subset the pretraining used;
    # null inherits the checkpoint's subsets (quick checks).
    train_subset: int | None = 0
    test_subset: int | None = 0
    image_size: int | None = None
    classes_file: str | None = None


@dataclass
class LinearModelConfig:
    """The backbone the probe expects; None = whatever the checkpoint holds. A value that
    differs from the checkpoint is refused (CheckpointError), never silently rebuilt."""

    arch: str | None = None
    cifar_stem: bool | None = None


@dataclass
class LinearOptimConfig:
    """google-research/simclr CIFAR protocol: SGD Nesterov 0.1, momentum 0.9, no weight decay,
    batch 512, 100 epochs, cosine. ImageNet-100 (solo-learn): batch 256, schedule=step
    (milestones 60/80); the MoCo CIFAR demo uses lr 30 (its features are not normalised)."""

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    batch_size: int = 512
    epochs: int = 100
    # "cosine" (per step, to 0) or "step" (x gamma at each milestone epoch).
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=lambda: [60, 80])
    gamma: float = 0.1


@dataclass
class LinearAugmentConfig:
    """Train-time augmentation of the probe (test images get the plain eval view)."""

    # "pad": random crop of the zero-padded image (CIFAR); "resized": RandomResizedCrop (ImageNet).
    crop: str = "pad"
    padding: int = 4
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip_p: float = 0.5


@dataclass
class LinearConfig:
    """Linear probe recipe (`recipes/linear/*.yaml`), validated like the pretraining recipe."""

    # "full": the standard protocol, augmented images through the frozen backbone every step;
    # "features": fast mode on cached un-augmented features (labelled so in the result).
    mode: str = "full"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    data: LinearDataConfig = field(default_factory=LinearDataConfig)
    model: LinearModelConfig = field(default_factory=LinearModelConfig)
    optim: LinearOptimConfig = field(default_factory=LinearOptimConfig)
    augment: LinearAugmentConfig = field(default_factory=LinearAugmentConfig)


# ----------------------------------------------------------------------------- checks
MAX_SEED = 2**32 - 1
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 2, 4, 4, 60, 60


def show(value: Any) -> str:
    """`repr(value)` cut to a readable length: an error message quotes what it was given,
    and a YAML alias bomb must not become a gigabyte of text."""
    text = _SHOW.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _plain_name(name: str) -> bool:
    return (0 < len(name) <= 200 and name not in (".", "..") and "/" not in name
            and not any(ord(c) < 32 for c in name))


def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={show(value)} is out of range: it must be {rule}")


def _choice(key: str, value: Any, options: tuple) -> None:
    _need(value in options, key, value, "one of " + ", ".join(map(str, options)))


def _check_ranges(cfg: Config) -> None:
    need, choice = _need, _choice

    def pair(key: str, value: list[float], lo: float, hi: float) -> None:
        need(len(value) == 2 and lo <= value[0] <= value[1] <= hi, key, value,
             f"[low, high] with {lo} <= low <= high <= {hi}")

    # The registries are the lists of names (imported here: they import this module).
    from .evaluation.knn import BACKENDS
    from .methods import METHODS

    choice("method", cfg.method, tuple(METHODS))
    choice("device", cfg.device.split(":")[0], ("auto", "cpu", "cuda"))
    choice("precision", cfg.precision, PRECISIONS)
    need(0 <= cfg.seed <= MAX_SEED, "seed", cfg.seed, f"in [0, {MAX_SEED}] (a 32-bit seed)")
    need(cfg.log_every >= 1, "log_every", cfg.log_every, ">= 1")
    need(cfg.ckpt_every >= 0, "ckpt_every", cfg.ckpt_every, ">= 0")
    need(cfg.ckpt_every_steps >= 0, "ckpt_every_steps", cfg.ckpt_every_steps, ">= 0 (0 = off)")
    need(cfg.ckpt_every_minutes >= 0, "ckpt_every_minutes", cfg.ckpt_every_minutes,
         ">= 0 (0 = off)")
    need(_plain_name(cfg.name), "name", cfg.name,
         "a folder name of 1 to 200 characters, not '.' or '..', without '/' or control "
         "characters")
    need(bool(cfg.out_dir) and "\0" not in cfg.out_dir, "out_dir", cfg.out_dir, "a folder path")
    d = cfg.data
    choice("data.dataset", d.dataset, DATASETS)
    need(d.train_subset >= 0, "data.train_subset", d.train_subset, ">= 0")
    need(d.test_subset >= 0, "data.test_subset", d.test_subset, ">= 0")
    need(d.image_size >= 8, "data.image_size", d.image_size, ">= 8")
    choice("data.mode", d.mode, ("auto", "memory", "stream"))
    need(d.memory_budget_gb > 0, "data.memory_budget_gb", d.memory_budget_gb, "> 0")
    need(d.workers is None or 0 <= d.workers <= 256, "data.workers", d.workers,
         "in [0, 256] (null: every core)")
    choice("data.decode", d.decode, ("cpu", "gpu"))
    need(d.eval_resize is None or d.eval_resize >= cfg.augment.size, "data.eval_resize",
         d.eval_resize, f">= augment.size={cfg.augment.size} (null: augment.size / 0.875)")
    if d.mode == "stream" and not DATASETS[d.dataset].folder:
        need(False, "data.mode", d.mode, f"memory or auto for {d.dataset} (only image folders "
             "are streamed)")
    if d.decode == "gpu":
        need(d.mode != "memory", "data.decode", d.decode, "cpu with data.mode=memory (GPU "
             "decoding is a streaming option)")
    for section, a in (("augment", cfg.augment), ("augment2", cfg.augment2)):
        if a is None:
            continue
        need(a.size >= 8, f"{section}.size", a.size, ">= 8")
        for key in ("hflip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            v = getattr(a, key)
            need(0.0 <= v <= 1.0, f"{section}.{key}", v, "a probability in [0, 1]")
        for key in ("brightness", "contrast", "saturation"):
            need(getattr(a, key) >= 0, f"{section}.{key}", getattr(a, key), ">= 0")
        need(0.0 <= a.hue <= 0.5, f"{section}.hue", a.hue, "in [0, 0.5]")
        pair(f"{section}.crop_scale", a.crop_scale, 1e-6, 1.0)
        pair(f"{section}.crop_ratio", a.crop_ratio, 1e-6, 1e6)
        pair(f"{section}.blur_sigma", a.blur_sigma, 1e-6, 1e6)
    if cfg.augment2 is not None:
        need(cfg.augment2.size == cfg.augment.size, "augment2.size", cfg.augment2.size,
             f"equal to augment.size={cfg.augment.size} (both views go through one batch)")
    m = cfg.model
    check_arch(m.arch, m.cifar_stem)
    need(m.proj_hidden_dim >= 1, "model.proj_hidden_dim", m.proj_hidden_dim, ">= 1")
    need(m.proj_output_dim >= 1, "model.proj_output_dim", m.proj_output_dim, ">= 1")
    mo = cfg.moco
    need(mo.queue_size >= 1, "moco.queue_size", mo.queue_size, ">= 1")
    need(0.0 <= mo.momentum <= 1.0, "moco.momentum", mo.momentum, "in [0, 1]")
    choice("moco.momentum_schedule", mo.momentum_schedule, ("constant", "cosine"))
    choice("moco.bn_remedy", mo.bn_remedy, ("split", "none"))
    need(mo.bn_splits >= 1, "moco.bn_splits", mo.bn_splits, ">= 1")
    lo = cfg.loss
    need(lo.temperature > 0, "loss.temperature", lo.temperature, "> 0")
    need(lo.w_infonce >= 0, "loss.w_infonce", lo.w_infonce, ">= 0")
    need(lo.w_circle >= 0, "loss.w_circle", lo.w_circle, ">= 0")
    need(lo.sec_eta >= 0, "loss.sec_eta", lo.sec_eta, ">= 0")
    need(lo.w_infonce + lo.w_circle > 0, "loss.w_infonce", lo.w_infonce,
         "> 0 unless loss.w_circle > 0 (a contrastive term is needed)")
    choice("loss.sec_ramp", lo.sec_ramp, ("constant", "linear"))
    choice("loss.sec_mu", lo.sec_mu, ("batch", "ema"))
    need(0.0 < lo.sec_momentum <= 1.0, "loss.sec_momentum", lo.sec_momentum, "in (0, 1]")
    choice("loss.sec_on", lo.sec_on, ("projector", "backbone"))
    need(0.0 <= lo.circle_margin <= 1.0, "loss.circle_margin", lo.circle_margin, "in [0, 1]")
    need(lo.circle_gamma > 0, "loss.circle_gamma", lo.circle_gamma, "> 0")
    o = cfg.optim
    choice("optim.name", o.name, ("sgd", "lars"))
    need(o.lr > 0, "optim.lr", o.lr, "> 0")
    need(0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "in [0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    need(o.batch_size >= 2, "optim.batch_size", o.batch_size, ">= 2 (contrastive pairs need negatives)")
    need(o.epochs >= 1, "optim.epochs", o.epochs, ">= 1")
    need(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs", o.warmup_epochs,
         "in [0, optim.epochs]")
    need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
    need(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, ">= 0")
    need(o.lars_eta > 0, "optim.lars_eta", o.lars_eta, "> 0")
    e = cfg.eval
    need(e.knn_every >= 0, "eval.knn_every", e.knn_every, ">= 0")
    need(e.knn_k >= 1, "eval.knn_k", e.knn_k, ">= 1")
    need(e.knn_temperature > 0, "eval.knn_temperature", e.knn_temperature, "> 0")
    choice("eval.knn_backend", e.knn_backend, BACKENDS)
    METHODS[cfg.method].check_config(cfg, need)
    need(e.knn_memory_mb >= 1, "eval.knn_memory_mb", e.knn_memory_mb, ">= 1")


# ----------------------------------------------------------------------------- building
def _type_ok(value: Any, hint: Any) -> Any:
    """Return `value` coerced to `hint` (int -> float only), or raise TypeError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _type_ok(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        (item,) = typing.get_args(hint)
        return [_type_ok(v, item) for v in value]
    if hint is float:
        # bool is an int subclass in Python; `lr: true` is a mistake, not 1.0.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value) or abs(value) > 1e300:
                raise _NotFinite("a finite number")
            return float(value)
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**63:
                raise _NotFinite("an integer below 2**63")
            return value
        raise TypeError
    if hint in (str, bool):
        if isinstance(value, hint):
            return value
        raise TypeError
    raise TypeError


class _NotFinite(Exception):
    """A number that is inf, nan, or beyond what torch and numpy take (|int| >= 2**63)."""


def _section_type(hint: Any) -> type | None:
    """The dataclass a field holds (`Section` or `Section | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {show(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.6) or \
                [k for k in fields if k.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown key '{prefix}{show(key).strip(chr(39))}'{hint}; "
                              f"valid keys: {', '.join(fields)}")
        hint = hints[key]
        section = _section_type(hint)
        if section is not None:
            # A section (a nested dataclass); an optional one (augment2) may be null.
            optional = section is not hint
            kwargs[key] = None if value is None and optional else \
                _build(section, value, f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _type_ok(value, hint)
        except TypeError:
            raise ConfigError(
                f"'{prefix}{key}' must be {_type_name(hint)}, got {show(value)}") from None
        except _NotFinite as err:
            raise ConfigError(f"'{prefix}{key}' must be {err}, got {show(value)}") from None
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["optim.lr=0.3", "loss.sec_eta=0.1"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=0.3)")
        try:
            value = yaml_load(raw) if raw != "" else None
        except (yaml.YAMLError, RecursionError):
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(values: dict, overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a nested dict plus dotted overrides."""
    merged = _merge(values or {}, parse_overrides(overrides or []))
    if isinstance(merged.get("augment2"), dict):
        # The second view's keys that are not given take the first view's values.
        first = _build(AugmentConfig, merged.get("augment", {}), "augment.")
        merged["augment2"] = {**dataclasses.asdict(first), **merged["augment2"]}
    cfg = _build(Config, merged, "")
    _check_ranges(cfg)
    return cfg


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a recipe YAML (safe_load) and apply `key=value` overrides."""
    path = Path(path)
    cfg = from_dict(_read_yaml(path, "recipes/quickstart.yaml"), overrides)
    # A class list named in a recipe is found beside the recipe (recipes/imagenet100/).
    listed = cfg.data.classes_file
    if listed and not Path(listed).is_absolute() and (path.parent / listed).is_file():
        cfg.data.classes_file = str((path.parent / listed).resolve())
    return cfg


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load with two fixes for recipes: a key given twice in one mapping is an
    error (YAML keeps the last one without a word, so a second `optim:` section would
    silently replace the first), and `1e6` / `1e-3` are numbers (YAML 1.1 reads only
    `1.0e+6` as one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise _DuplicateKey(key_node.value, key_node.start_mark.line + 1,
                                        seen[key_node.value])
                seen[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """Parse recipe or override text (safe: plain data only, no Python objects)."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path, example: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' not found; pass a YAML file such as {example}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe '{path}' is not UTF-8 text (byte {err.start}); pass a "
                          f"YAML file such as {example}") from None
    except OSError as err:
        raise ConfigError(f"recipe '{path}' cannot be read ({err.strerror})") from None
    try:
        values = yaml_load(text) or {}
    except _DuplicateKey as err:
        raise ConfigError(f"recipe '{path}' gives '{show(err.key).strip(chr(39))}' twice "
                          f"(lines {err.first} and {err.line}); YAML would keep only the "
                          "last: merge them into one") from None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"recipe '{path}' is not valid YAML{where}; fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"recipe '{path}' is nested too deeply to be a recipe") from None
    if not isinstance(values, dict):
        raise ConfigError(f"recipe '{path}' must be a YAML mapping of sections, got "
                          f"{type(values).__name__}")
    return values


# ----------------------------------------------------------------------------- linear recipes
def _check_linear_ranges(cfg: LinearConfig) -> None:
    need, choice = _need, _choice

    choice("mode", cfg.mode, ("full", "features"))
    need(0 <= cfg.seed <= MAX_SEED, "seed", cfg.seed, f"in [0, {MAX_SEED}] (a 32-bit seed)")
    choice("device", cfg.device.split(":")[0], ("auto", "cpu", "cuda"))
    choice("precision", cfg.precision, PRECISIONS)
    d = cfg.data
    if d.dataset is not None:
        choice("data.dataset", d.dataset, DATASETS)
    if isinstance(d.classes, str):
        need(d.classes == "all", "data.classes", d.classes, "a list of class ids, 'all' or null")
    elif d.classes is not None:
        need(len(d.classes) > 0, "data.classes", d.classes, "a non-empty list of class ids")
    for key in ("train_subset", "test_subset"):
        v = getattr(d, key)
        need(v is None or v >= 0, f"data.{key}", v, ">= 0")
    need(d.image_size is None or d.image_size >= 8, "data.image_size", d.image_size, ">= 8")
    if cfg.model.arch is not None:
        check_arch(cfg.model.arch, False)
    o = cfg.optim
    need(o.lr > 0, "optim.lr", o.lr, "> 0")
    need(0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "in [0, 1)")
    need(not o.nesterov or o.momentum > 0, "optim.nesterov", o.nesterov,
         "false when optim.momentum is 0 (Nesterov needs momentum)")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    need(o.batch_size >= 1, "optim.batch_size", o.batch_size, ">= 1")
    need(o.epochs >= 1, "optim.epochs", o.epochs, ">= 1")
    choice("optim.schedule", o.schedule, ("cosine", "step"))
    need(list(o.milestones) == sorted(o.milestones) and all(m >= 1 for m in o.milestones),
         "optim.milestones", o.milestones, "increasing epochs >= 1")
    need(0.0 < o.gamma <= 1.0, "optim.gamma", o.gamma, "in (0, 1]")
    a = cfg.augment
    choice("augment.crop", a.crop, ("pad", "resized"))
    need(a.padding >= 0, "augment.padding", a.padding, ">= 0")
    need(len(a.crop_scale) == 2 and 0.0 < a.crop_scale[0] <= a.crop_scale[1] <= 1.0,
         "augment.crop_scale", a.crop_scale, "[low, high] with 0 < low <= high <= 1")
    need(0.0 <= a.hflip_p <= 1.0, "augment.hflip_p", a.hflip_p, "a probability in [0, 1]")


def linear_from_dict(values: dict, overrides: list[str] | None = None) -> LinearConfig:
    """Build and validate a LinearConfig from a nested dict plus dotted overrides."""
    merged = _merge(values or {}, parse_overrides(overrides or []))
    cfg = _build(LinearConfig, merged, "")
    _check_linear_ranges(cfg)
    return cfg


def load_linear_recipe(path: str | Path | None, overrides: list[str] | None = None) -> LinearConfig:
    """Read a linear-probe recipe (None: the schema defaults, i.e. the CIFAR protocol)."""
    if path is None:
        return linear_from_dict({}, overrides)
    return linear_from_dict(_read_yaml(Path(path), "recipes/linear/cifar.yaml"), overrides)


def to_dict(cfg: Config | LinearConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=True)

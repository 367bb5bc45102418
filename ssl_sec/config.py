"""The recipe schema's core: dataclass sections that hold every default and check their own
fields, and the machinery that builds them from YAML.

A recipe YAML names only what differs from these defaults; unknown keys, wrong types and
out-of-range values are errors (`ConfigError`), never silently ignored. Dotted overrides
(`optim.lr=0.3`) are parsed as YAML scalars and go through the same checks.

This module knows no method, loss term or kNN backend: those own their sections, and
`ssl_sec/recipe.py`, above their registries, assembles the whole schema (`Config`) and
checks the registry names. So nothing here imports them, and there is no import circle.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .archs import check_arch
from .data.registry import DATASETS
from .errors import ConfigError
from .runtime import PRECISIONS

# ----------------------------------------------------------------------------- checks
MAX_SEED = 2**32 - 1
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 2, 4, 4, 60, 60

# Field metadata: may this key differ between a run and its resumption? "free": where
# things are and how often to log or evaluate; "adjustable": it changes the optimisation,
# but the NaN advice names it, so a resume may change it (and says so). Every other key
# changes the optimisation and must match.
FREE = {"resume": "free"}
ADJUSTABLE = {"resume": "adjustable"}


def show(value: Any) -> str:
    """`repr(value)` cut to a readable length: an error message quotes what it was given,
    and a YAML alias bomb must not become a gigabyte of text."""
    text = _SHOW.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _plain_name(name: str) -> bool:
    return (0 < len(name) <= 200 and name not in (".", "..") and "/" not in name
            and not any(ord(c) < 32 for c in name))


class Need:
    """The recipe-range check of one section: `need(ok, key, value, rule)` raises the user's
    error "section.key=value is out of range: it must be rule" when `ok` is false."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def __call__(self, ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{self.prefix}{key}={show(value)} is out of range: it must be "
                              f"{rule}")

    def choice(self, key: str, value: Any, options: Iterable) -> None:
        options = tuple(options)
        self(value in options, key, value, "one of " + ", ".join(map(str, options)))

    def pair(self, key: str, value: list[float], lo: float, hi: float) -> None:
        self(len(value) == 2 and lo <= value[0] <= value[1] <= hi, key, value,
             f"[low, high] with {lo} <= low <= high <= {hi}")

    def probability(self, key: str, value: float) -> None:
        self(0.0 <= value <= 1.0, key, value, "a probability in [0, 1]")

    def section(self, name: str) -> Need:
        return Need(f"{self.prefix}{name}.")


def check_sections(cfg: Any, need: Need) -> None:
    """Run `check` of every section (a dataclass field holding one) of `cfg`."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "check"):
            section.check(need.section(f.name))


def resume_policy(cls: type, prefix: str = "") -> dict[str, str]:
    """{dotted key: "free" | "adjustable"} from the fields' metadata, sections included."""
    policy: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "resume" in f.metadata:
            policy[prefix + f.name] = f.metadata["resume"]
        section = _section_type(hints[f.name])
        if section is not None:
            policy.update(resume_policy(section, f"{prefix}{f.name}."))
    return policy


# ----------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    dataset: str = "cifar10"
    # Where the data lives; None means $SSL_SEC_DATA, then ./data.
    root: str | None = field(default=None, metadata=FREE)
    # Download the official archive (md5-verified) when the data is not found (CIFAR; an
    # image folder has no official archive).
    download: bool = field(default=True, metadata=FREE)
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
    memory_budget_gb: float = field(default=8.0, metadata=FREE)
    # Stream: DataLoader worker processes (null = every core of the machine).
    workers: int | None = field(default=None, metadata=FREE)
    # Stream: "cpu" decodes in the workers; "gpu" has them read the file bytes only and the
    # device decode the JPEGs (torchvision.io.decode_jpeg on CUDA).
    decode: str = "cpu"
    # A file that cannot be read stops the run with its name; true: leave it out (reported once).
    skip_bad_images: bool = False
    # Stream evaluation view: shorter side resized to this before the centre crop at
    # augment.size (null: augment.size / 0.875, i.e. 256 for 224).
    eval_resize: int | None = None

    def check(self, need: Need) -> None:
        need.choice("dataset", self.dataset, DATASETS)
        need(self.train_subset >= 0, "train_subset", self.train_subset, ">= 0")
        need(self.test_subset >= 0, "test_subset", self.test_subset, ">= 0")
        need(self.image_size >= 8, "image_size", self.image_size, ">= 8")
        need.choice("mode", self.mode, ("auto", "memory", "stream"))
        need(self.memory_budget_gb > 0, "memory_budget_gb", self.memory_budget_gb, "> 0")
        need(self.workers is None or 0 <= self.workers <= 256, "workers", self.workers,
             "in [0, 256] (null: every core)")
        need.choice("decode", self.decode, ("cpu", "gpu"))
        if self.mode == "stream" and not DATASETS[self.dataset].folder:
            need(False, "mode", self.mode, f"memory or auto for {self.dataset} (only image "
                 "folders are streamed)")
        if self.decode == "gpu":
            need(self.mode != "memory", "decode", self.decode, "cpu with data.mode=memory (GPU "
                 "decoding is a streaming option)")


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

    def check(self, need: Need) -> None:
        need(self.size >= 8, "size", self.size, ">= 8")
        for key in ("hflip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            need.probability(key, getattr(self, key))
        for key in ("brightness", "contrast", "saturation"):
            need(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        need(0.0 <= self.hue <= 0.5, "hue", self.hue, "in [0, 0.5]")
        need.pair("crop_scale", self.crop_scale, 1e-6, 1.0)
        need.pair("crop_ratio", self.crop_ratio, 1e-6, 1e6)
        need.pair("blur_sigma", self.blur_sigma, 1e-6, 1e6)


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    # 3x3 stride-1 conv1 and no max-pool: the standard for 32x32 images.
    cifar_stem: bool = True
    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128
    # channels_last helps convolutions on GPUs and on recent CPUs alike.
    channels_last: bool = True

    def check(self, need: Need) -> None:
        check_arch(self.arch, self.cifar_stem)
        need(self.proj_hidden_dim >= 1, "proj_hidden_dim", self.proj_hidden_dim, ">= 1")
        need(self.proj_output_dim >= 1, "proj_output_dim", self.proj_output_dim, ">= 1")


@dataclass
class OptimConfig:
    name: str = "lars"
    lr: float = field(default=0.8, metadata=ADJUSTABLE)
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 512
    epochs: int = 200
    warmup_epochs: float = 10.0
    # Final lr of the cosine schedule as a fraction of lr.
    min_lr_ratio: float = 0.0
    # Max gradient norm (0 = no clipping).
    grad_clip: float = field(default=0.0, metadata=ADJUSTABLE)
    # LARS trust coefficient.
    lars_eta: float = 0.02

    def check(self, need: Need) -> None:
        need.choice("name", self.name, ("sgd", "lars"))
        need(self.lr > 0, "lr", self.lr, "> 0")
        need(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        need(self.batch_size >= 2, "batch_size", self.batch_size,
             ">= 2 (contrastive pairs need negatives)")
        need(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        need(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", self.warmup_epochs,
             "in [0, optim.epochs]")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        need(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0")
        need(self.lars_eta > 0, "lars_eta", self.lars_eta, "> 0")


@dataclass
class EvalConfig:
    # Run the kNN monitor every this many epochs (0 = only at the end).
    knn_every: int = field(default=10, metadata=FREE)
    knn_k: int = 200
    knn_temperature: float = 0.1
    # One of ssl_sec.evaluation.knn.BACKENDS (checked with the other registry names, in
    # ssl_sec/recipe.py).
    knn_backend: str = field(default="auto", metadata=FREE)
    # Memory budget for one chunk of the kNN similarity matrix.
    knn_memory_mb: int = field(default=1024, metadata=FREE)

    def check(self, need: Need) -> None:
        need(self.knn_every >= 0, "knn_every", self.knn_every, ">= 0")
        need(self.knn_k >= 1, "knn_k", self.knn_k, ">= 1")
        need(self.knn_temperature > 0, "knn_temperature", self.knn_temperature, "> 0")
        need(self.knn_memory_mb >= 1, "knn_memory_mb", self.knn_memory_mb, ">= 1")


@dataclass
class BaseConfig:
    """The core of a pretraining recipe. The full schema, `ssl_sec.recipe.Config`, adds the
    objective's term sections (`loss.<term>`) and each method's own section from their
    registries."""

    method: str = "simclr"
    seed: int = 0
    # "auto" = cuda when available, else cpu.
    device: str = field(default="auto", metadata=FREE)
    # auto | bf16 | fp16 | fp32 (ssl_sec/runtime.py): "auto" = bf16 autocast on CUDA (fp16 +
    # loss scaling on GPUs without bf16), fp32 on the CPU; "bf16" is autocast on the CPU too.
    precision: str = "auto"
    # Deterministic kernels only (bit-exact resume on CUDA; slower). The CPU is deterministic
    # without it.
    deterministic: bool = False
    # Runs go to out_dir/name; an existing run directory is never overwritten.
    out_dir: str = field(default="runs", metadata=FREE)
    name: str = field(default="run", metadata=FREE)
    log_every: int = field(default=50, metadata=FREE)
    # Keep a numbered checkpoint every this many epochs (0 = only last.pt).
    ckpt_every: int = field(default=50, metadata=FREE)
    # last.pt is written at every epoch end and, within an epoch, every this many steps
    # and/or minutes (0 = off), with the loader position: a kill loses at most one
    # interval. The checkpoint it replaces is kept as prev.pt.
    ckpt_every_steps: int = field(default=0, metadata=FREE)
    ckpt_every_minutes: float = field(default=10.0, metadata=FREE)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The second view's augmentation when the views differ (BYOL's and solo-learn's
    # ImageNet setting: blur 1.0 / 0.1, solarize 0 / 0.2). Keys it does not give take
    # `augment`'s values; absent = both views use `augment`.
    augment2: AugmentConfig | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self, need: Need) -> None:
        """The top-level keys, every section, and the checks that span sections."""
        need.choice("device", self.device.split(":")[0], ("auto", "cpu", "cuda"))
        need.choice("precision", self.precision, PRECISIONS)
        need(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"in [0, {MAX_SEED}] (a 32-bit seed)")
        need(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        need(self.ckpt_every >= 0, "ckpt_every", self.ckpt_every, ">= 0")
        need(self.ckpt_every_steps >= 0, "ckpt_every_steps", self.ckpt_every_steps,
             ">= 0 (0 = off)")
        need(self.ckpt_every_minutes >= 0, "ckpt_every_minutes", self.ckpt_every_minutes,
             ">= 0 (0 = off)")
        need(_plain_name(self.name), "name", self.name,
             "a folder name of 1 to 200 characters, not '.' or '..', without '/' or control "
             "characters")
        need(bool(self.out_dir) and "\0" not in self.out_dir, "out_dir", self.out_dir,
             "a folder path")
        check_sections(self, need)
        d = self.data
        need(d.eval_resize is None or d.eval_resize >= self.augment.size, "data.eval_resize",
             d.eval_resize, f">= augment.size={self.augment.size} (null: augment.size / 0.875)")
        if self.augment2 is not None:
            need(self.augment2.size == self.augment.size, "augment2.size", self.augment2.size,
                 f"equal to augment.size={self.augment.size} (both views go through one batch)")


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

    def check(self, need: Need) -> None:
        if self.dataset is not None:
            need.choice("dataset", self.dataset, DATASETS)
        if isinstance(self.classes, str):
            need(self.classes == "all", "classes", self.classes,
                 "a list of class ids, 'all' or null")
        elif self.classes is not None:
            need(len(self.classes) > 0, "classes", self.classes, "a non-empty list of class ids")
        for key in ("train_subset", "test_subset"):
            v = getattr(self, key)
            need(v is None or v >= 0, key, v, ">= 0")
        need(self.image_size is None or self.image_size >= 8, "image_size", self.image_size,
             ">= 8")


@dataclass
class LinearModelConfig:
    """The backbone the probe expects; None = whatever the checkpoint holds. A value that
    differs from the checkpoint is refused (CheckpointError), never silently rebuilt."""

    arch: str | None = None
    cifar_stem: bool | None = None

    def check(self, need: Need) -> None:
        if self.arch is not None:
            check_arch(self.arch, False)


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

    def check(self, need: Need) -> None:
        need(self.lr > 0, "lr", self.lr, "> 0")
        need(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "in [0, 1)")
        need(not self.nesterov or self.momentum > 0, "nesterov", self.nesterov,
             "false when optim.momentum is 0 (Nesterov needs momentum)")
        need(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        need(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        need(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        need.choice("schedule", self.schedule, ("cosine", "step"))
        need(list(self.milestones) == sorted(self.milestones)
             and all(m >= 1 for m in self.milestones),
             "milestones", self.milestones, "increasing epochs >= 1")
        need(0.0 < self.gamma <= 1.0, "gamma", self.gamma, "in (0, 1]")


@dataclass
class LinearAugmentConfig:
    """Train-time augmentation of the probe (test images get the plain eval view)."""

    # "pad": random crop of the zero-padded image (CIFAR); "resized": RandomResizedCrop (ImageNet).
    crop: str = "pad"
    padding: int = 4
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip_p: float = 0.5

    def check(self, need: Need) -> None:
        need.choice("crop", self.crop, ("pad", "resized"))
        need(self.padding >= 0, "padding", self.padding, ">= 0")
        need(len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
             "crop_scale", self.crop_scale, "[low, high] with 0 < low <= high <= 1")
        need.probability("hflip_p", self.hflip_p)


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

    def check(self, need: Need) -> None:
        need.choice("mode", self.mode, ("full", "features"))
        need(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"in [0, {MAX_SEED}] (a 32-bit seed)")
        need.choice("device", self.device.split(":")[0], ("auto", "cpu", "cuda"))
        need.choice("precision", self.precision, PRECISIONS)
        check_sections(self, need)


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
    """`["optim.lr=0.3", "loss.sec.eta=0.1"]` -> nested dict; values parsed as YAML scalars."""
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


def linear_from_dict(values: dict, overrides: list[str] | None = None) -> LinearConfig:
    """Build and validate a LinearConfig from a nested dict plus dotted overrides."""
    merged = _merge(values or {}, parse_overrides(overrides or []))
    cfg = _build(LinearConfig, merged, "")
    cfg.check(Need())
    return cfg


def load_linear_recipe(path: str | Path | None, overrides: list[str] | None = None) -> LinearConfig:
    """Read a linear-probe recipe (None: the schema defaults, i.e. the CIFAR protocol)."""
    if path is None:
        return linear_from_dict({}, overrides)
    return linear_from_dict(_read_yaml(Path(path), "recipes/linear/cifar.yaml"), overrides)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=True)

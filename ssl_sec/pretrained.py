"""Using a pretrained checkpoint elsewhere: its backbone as an nn.Module, or its weights
written under the key names of the library the architecture comes from.

    backbone = ssl_sec.load_backbone("runs/quickstart/last.pt")          # (B,3,H,W) -> (B,D)
    ssl-sec export --checkpoint runs/quickstart/last.pt                  # .safetensors
    ssl-sec export --verify runs/quickstart/last.resnet18.torchvision.safetensors

A torchvision backbone's keys are torchvision's own (the classifier's last Linear, which
pretraining does not train, is left out), so `torchvision.models.resnet18()` loads the file
with strict=True except for `fc.*`. A run with the CIFAR stem needs the same two changes on
the torchvision model first (they are in the file's metadata):
`conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)` and `maxpool = nn.Identity()`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .archs import TIMM, build_backbone, has_cifar_stem
from .checkpoint import atomic_save, load_checkpoint
from .config import _merge, to_yaml
from .digest import check_seal, digest
from .errors import CheckpointError, ConfigError, UserError
from .recipe import Config, from_dict, upgrade

BACKBONE_PREFIX = "encoder.backbone."
# Each format and the file names it may be written under (a reader trusts the name).
FORMATS = {"safetensors": (".safetensors",), "torchvision": (".pt", ".pth"),
           "timm": (".safetensors",)}
# A safetensors export's metadata key holding the digest of its tensors and other metadata.
DIGEST_KEY = "ssl_sec_sha256"


def checkpoint_config(path: Path, ckpt: dict, overrides: list[str] | None = None,
                      extra: dict | None = None) -> Config:
    """The checkpoint's config with `extra` (a nested dict) and then `overrides` applied.

    The backbone's shape cannot be changed after training: asking for another `model.arch` or
    `model.cifar_stem` than the checkpoint holds is a CheckpointError, not a silent rebuild.
    """
    saved = upgrade(ckpt["config"])
    try:
        from_dict(saved)
    except ConfigError as err:
        raise CheckpointError(f"checkpoint '{path}' holds a config this ssl_sec cannot use "
                              f"({err}); it was written by another version or damaged") from None
    cfg = from_dict(_merge(saved, extra or {}), overrides)
    held = saved.get("model", {})
    for key in ("arch", "cifar_stem"):
        if key in held and held[key] != getattr(cfg.model, key):
            raise CheckpointError(
                f"checkpoint '{path}' holds a backbone with model.arch={held.get('arch')!r} "
                f"model.cifar_stem={held.get('cifar_stem')!r}, but model.{key}="
                f"{getattr(cfg.model, key)!r} was asked; drop that override or pass a "
                "checkpoint trained with it")
    return cfg


def backbone_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The backbone's weights of a checkpoint, under the backbone's own key names."""
    return {k[len(BACKBONE_PREFIX):]: v for k, v in ckpt["model"].items()
            if k.startswith(BACKBONE_PREFIX)}


def backbone_from_checkpoint(path: Path, ckpt: dict, cfg: Config) -> nn.Module:
    """The checkpoint's backbone (eval mode, on the CPU)."""
    return _fitted_backbone(path, ckpt, cfg)[0]


def _fitted_backbone(path: Path, ckpt: dict, cfg: Config) -> tuple[nn.Module, int]:
    """The checkpoint's backbone (eval mode, on the CPU) and its feature dimension."""
    backbone, dim = build_backbone(cfg.model.arch, cfg.model.cifar_stem, cfg.augment.size)
    try:
        backbone.load_state_dict(backbone_state(ckpt))
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint '{path}' does not match model.arch={cfg.model.arch} "
                              f"cifar_stem={cfg.model.cifar_stem} "
                              f"({str(err).splitlines()[0][:120]})") from None
    return backbone.eval(), dim


def load_backbone(checkpoint: str | Path, with_projector: bool = False) -> nn.Module:
    """The pretrained backbone of an ssl_sec checkpoint, in eval mode on the CPU:
    images (B, 3, H, W), normalised as in pretraining, -> features (B, D).

    with_projector=True: the backbone and the projection head together, whose forward
    returns (h, z): features (B, D) and projections (B, d). (For MoCo: the query encoder.)
    """
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(path, ckpt)
    if not with_projector:
        return backbone_from_checkpoint(path, ckpt, cfg)
    from .methods import METHODS

    method = METHODS[cfg.method](cfg)
    try:
        method.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint '{path}' does not fit a {cfg.method} model "
                              f"({str(err).splitlines()[0][:120]})") from None
    return method.encoder.eval()


def export_format(fmt: str | None, out: Path | None) -> str:
    """The format to write: `fmt`, else the one `out`'s extension names, else safetensors. A
    name whose extension contradicts the format is a UserError: a `.safetensors` file that
    holds a pickle fails in every safetensors reader."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if out is None:
        return fmt or "safetensors"
    suffix = out.suffix.lower()
    if fmt is None:
        named = {".safetensors": "safetensors", ".pt": "torchvision", ".pth": "torchvision"}
        if suffix not in named:
            raise UserError(f"--out '{out}': the format cannot be told from '{suffix or out.name}'"
                            "; name the file *.safetensors (safetensors, or timm with --format "
                            "timm) or *.pt (torchvision)")
        return named[suffix]
    if suffix not in FORMATS[fmt]:
        raise UserError(f"--out '{out}' does not name a {fmt} file (--format {fmt} writes "
                        f"{' or '.join(FORMATS[fmt])}); rename it, or drop --format to write "
                        "the format its name says")
    return fmt


def export_backbone(checkpoint: str | Path, fmt: str | None = None,
                    out: str | Path | None = None, force: bool = False) -> dict:
    """Write the checkpoint's backbone weights for use without ssl_sec.

    fmt: "safetensors" (no pickle; the source library's key names, the recipe, provenance
    and a SHA-256 digest in its metadata), "torchvision" (a torch state_dict .pt for
    torchvision models, sealed like a checkpoint) or "timm" (safetensors under timm's key
    names: ResNets and timm: backbones); None: the one `out`'s extension names (safetensors
    without `out`). `verify_export` checks the digest. Returns what was written and how to
    load it.
    """
    out = Path(out) if out is not None else None
    fmt = export_format(fmt, out)
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(path, ckpt)
    _, dim = _fitted_backbone(path, ckpt, cfg)  # the weights fit the architecture
    arch, state = cfg.model.arch, backbone_state(ckpt)
    library = "timm" if arch.startswith(TIMM) else "torchvision"
    if fmt == "timm" and library == "torchvision" and not has_cifar_stem(arch):
        raise UserError(f"--format timm: timm key names are known for ResNet-family and timm: "
                        f"backbones, not {arch}; use --format safetensors or torchvision")
    if fmt == "torchvision" and library == "timm":
        raise UserError(f"--format torchvision: {arch} is a timm model; use --format "
                        "safetensors or timm")
    target = "timm" if fmt == "timm" else library
    # torchvision's and timm's ResNets name their weights alike (conv1, bn1, layerN.M.*).
    name = arch[len(TIMM):] if arch.startswith(TIMM) else arch
    stem = ("conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); maxpool = nn.Identity()"
            if cfg.model.cifar_stem else "standard")
    suffix = FORMATS[fmt][0]
    out = out if out is not None else path.with_name(f"{path.stem}.{name}.{target}{suffix}")
    if out.exists() and not force:
        raise UserError(f"'{out}' exists; pass --out NEW_FILE, or --force to replace it")
    loader = (f"torchvision.models.{name}()" if target == "torchvision"
              else f"timm.create_model('{name}', num_classes=0)")
    info = {"file": str(out), "format": fmt, "keys": target, "arch": name,
            "cifar_stem": stem, "feature_dim": dim,
            "tensors": len(state), "load": f"{loader}, apply cifar_stem if not standard, then "
            "load_state_dict(weights, strict=False): only the classifier head is missing"}
    tensors = {k: v.contiguous() for k, v in state.items()}
    if fmt == "torchvision":
        atomic_save(tensors, out, sealed=True)
    else:
        from safetensors.torch import save

        meta = {"ssl_sec_version": __version__, "checkpoint": str(path),
                "step": str(ckpt["step"]), "method": cfg.method,
                "knn": json.dumps(ckpt.get("knn", {})), "recipe": to_yaml(cfg),
                **{k: str(v) for k, v in info.items() if k != "file"}}
        meta[DIGEST_KEY] = _export_digest(tensors, meta)
        _write_atomically(out, save(tensors, metadata=meta))
    return info


def _export_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """The SHA-256 of a safetensors export's tensors and metadata (its own key left out),
    both by name: the order a reader lists them in does not matter."""
    return digest({"tensors": dict(sorted(tensors.items())),
                   "metadata": dict(sorted((k, v) for k, v in meta.items() if k != DIGEST_KEY))})


def _write_atomically(out: Path, data: bytes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def verify_export(file: str | Path) -> dict:
    """Check an export written by `export_backbone` against its digest: the safetensors
    metadata's, or a torchvision .pt's seal. A mismatch, or a file without a digest, is a
    CheckpointError naming the file."""
    path = Path(file)
    if not path.is_file():
        raise UserError(f"--verify '{path}': no such file; pass a file written by "
                        "'ssl-sec export'")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
            raise CheckpointError(f"'{path}' cannot be read as safetensors "
                                  f"({str(err).splitlines()[0][:120]}); it is damaged or not "
                                  "a safetensors file; export it again") from None
        expected = meta.get(DIGEST_KEY)
        intact = None if expected is None else _export_digest(tensors, meta) == expected
    else:
        intact = check_seal(path)
        tensors = torch.load(path, map_location="cpu", weights_only=True) if intact else {}
    if intact is None:
        raise CheckpointError(f"'{path}' carries no ssl_sec digest (not written by "
                              "'ssl-sec export', or by a version before exports carried one); "
                              "there is nothing to verify it against")
    if not intact:
        raise CheckpointError(f"'{path}' fails its sha256 check: its bytes changed after it "
                              "was exported (a flipped bit, a partial copy or a failing "
                              "disk); export it again from its checkpoint")
    return {"file": str(path), "verified": True, "algorithm": "sha256",
            "tensors": len(tensors)}

"""Checkpoints: atomic, rotated (`last.pt` and `prev.pt`), sealed with a SHA-256 of their
bytes, loaded with weights_only=True and checked (seal, then key by key) before anything
reads them."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .digest import check_seal, seal
from .errors import CheckpointError

# 2: the loader position (`batch_in_epoch`, mid-epoch checkpoints) and `world_size`.
# Version 1 files (epoch-end checkpoints only) read as version 2 with batch 0.
# 3: sealed (ssl_sec/digest.py); every load checks the seal. Version 1 and 2 files carry
# none: they load with a note.
FORMAT_VERSION = 3

# What a training checkpoint holds, and the type of each entry. Evaluation needs only the
# first three; `--resume` needs all of them.
_MODEL_KEYS = {"config": dict, "model": dict, "step": int}
_TRAINING_KEYS = {"epoch": int, "optimizer": dict, "scaler": dict, "loader_rng": torch.Tensor,
                  "rng": (dict, list)}


def atomic_save(obj: Any, path: str | Path, before_replace=None, sealed: bool = False) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`
    (`before_replace()` runs just before the rename, once the new file is complete).
    sealed=True: the file ends with the SHA-256 of its bytes (digest.seal), hashed as they
    are written.

    A crash mid-write leaves the previous file intact: rename is atomic on POSIX. A failed
    write (disk full, quota) is a CheckpointError that names the file; the temp file goes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    out = _Writer(os.fdopen(fd, "w+b"), hashlib.sha256() if sealed else None)
    try:
        with out.file:
            torch.save(obj, out)
            if out.hash is not None:
                seal(out.file, out.hash.hexdigest())
            out.file.flush()
            os.fsync(out.file.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failed = out.error or (err if isinstance(err, OSError) else None)
        if failed is not None:
            raise CheckpointError(
                f"could not write checkpoint '{path}' ({_first_line(failed)}); the previous "
                "checkpoint is kept; free space (or fix the folder) and continue with "
                "--resume") from None
        raise


class _Writer:
    """A file wrapper that hashes what is written (when given a hash) and remembers the
    OSError of a failed write: torch.save reports a full disk as an opaque RuntimeError of
    its zip writer."""

    def __init__(self, file, hash_=None):
        self.file, self.hash, self.error = file, hash_, None

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as err:
            self.error = err
            raise
        if self.hash is not None:
            self.hash.update(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def save_rotated(state: dict, last: Path, prev: Path) -> None:
    """Write `state`, sealed, to `last`, keeping the checkpoint it replaces as `prev`.

    At every instant `last` is a complete checkpoint (old or new) and `prev` the one
    before it: once the new file is written in full, the old `last` is hard-linked to
    `prev` (atomically, via a temp name), then the new file is renamed over `last`. A
    write that fails (disk full) leaves both as they were.
    """

    def keep_previous() -> None:
        if last.is_file():
            link_atomically(last, prev)

    atomic_save(state, last, before_replace=keep_previous, sealed=True)


def link_atomically(src: Path, dst: Path) -> None:
    """`dst` becomes the same file as `src` (a hard link; a copy where the file system has
    none), replacing any `dst` atomically. Checkpoints are never modified in place, only
    replaced by rename, so a link keeps its content."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def stale_temp_files(folder: Path) -> list[Path]:
    """Temp files of checkpoint writes (and links) a killed process never finished."""
    return sorted(folder.glob(".*.pt.*.tmp"))


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, path: Path) -> None:
    try:
        torch.set_rng_state(state["torch"])
        random.setstate(_as_tuple(state["python"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint '{path}' holds a damaged RNG state "
                              f"({_first_line(err)}); resume from another checkpoint "
                              "(--resume-from)") from None


def _as_tuple(obj: Any) -> Any:
    """random.setstate needs tuples; a round trip through some loaders gives lists."""
    if isinstance(obj, (list, tuple)):
        return tuple(_as_tuple(o) for o in obj)
    return obj


def training_state(config: dict, step: int, steps_per_epoch: int, model, optimizer, scaler,
                   loader, rng_states: list[dict], knn: dict, skipped: int) -> dict:
    """Everything a resume needs, as written to last.pt (read back by
    `restore_training_state`). rng_states: each rank's `rng_state()`, in rank order."""
    batch = step % steps_per_epoch
    return {
        "format": "ssl_sec", "format_version": FORMAT_VERSION, "config": config,
        "epoch": step // steps_per_epoch, "batch_in_epoch": batch, "step": step,
        "world_size": len(rng_states), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        # Mid-epoch: the state that drew this epoch's order (replayed on resume, the done
        # batches skipped); at an epoch end: the state that draws the next epoch's.
        "loader_rng": loader.epoch_state if batch else loader.generator.get_state(),
        "rng": rng_states, "knn": knn, "skipped_steps": skipped,
    }


def restore_training_state(ckpt: dict, path: Path, model, optimizer, scaler, loader,
                           rank: int, steps_per_epoch: int, total_steps: int) -> int:
    """Put a `training_state` checkpoint (from `load_checkpoint(path, training=True)`) back
    into the model, optimizer, loss scaler, data order and this rank's RNGs; returns its
    step. Whatever does not fit is a CheckpointError naming the file."""
    step, batch = ckpt["step"], ckpt["batch_in_epoch"]
    if not 0 <= step <= total_steps or batch != step % steps_per_epoch:
        raise CheckpointError(f"checkpoint '{path}' is at step {step} (batch {batch} of its "
                              f"epoch), which does not fit this run's {steps_per_epoch} steps "
                              "per epoch; resume with the data it was trained on")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint '{path}' does not fit this model "
                              f"({_first_line(err)})") from None
    try:
        loader.generator.set_state(ckpt["loader_rng"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}' holds a damaged data-order state "
                              f"({_first_line(err)[:120]}); resume from another checkpoint "
                              "(--resume-from)") from None
    # One RNG state per rank (a run resumes with the world size it was saved with).
    rng = ckpt["rng"]
    set_rng_state(rng[rank] if isinstance(rng, list) else rng, path)
    return step


def load_checkpoint(path: str | Path, training: bool = False) -> dict:
    """Load a checkpoint safely (weights_only=True: no code runs from the file) and check
    that it is ours and whole: its seal (before anything is unpickled), the keys evaluation
    needs, and with `training=True` the keys a resume needs, each of the right type.
    Anything else is a CheckpointError naming the file (and `prev.pt` beside it, when there
    is one to fall back on)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; pass the path of a .pt file "
                              "written by 'ssl-sec pretrain' (e.g. runs/NAME/last.pt)")
    intact = check_seal(path)
    if intact is False:
        raise CheckpointError(
            f"checkpoint '{path}' fails its sha256 check: its bytes changed after it was "
            "written (a flipped bit, a partial copy or a failing disk), so it must not be "
            "used" + (_fallback(path) or "; copy it again from where it came from"))
    try:
        with warnings.catch_warnings():  # torch's own two-line warnings: the error says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        why = ("it holds objects other than tensors and plain values, such as code that "
               "would run on loading; nothing was run" if "Weights only load failed" in str(err)
               else _first_line(err))
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({why}); it is corrupt, "
                              f"truncated or not an ssl_sec checkpoint{_fallback(path)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ssl_sec":
        raise CheckpointError(f"checkpoint '{path}' is not an ssl_sec checkpoint "
                              "(no 'format: ssl_sec' marker); pass one written by 'ssl-sec pretrain'")
    version = ckpt.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format_version {version!r}, newer than "
                              f"this ssl_sec reads ({FORMAT_VERSION}); upgrade ssl_sec")
    if intact is None:
        _unsealed(path, version)
    needed = {**_MODEL_KEYS, **(_TRAINING_KEYS if training else {})}
    for key, kind in needed.items():
        if key not in ckpt:
            raise CheckpointError(f"checkpoint '{path}' lacks '{key}'; it is damaged or was "
                                  f"not written by 'ssl-sec pretrain'{_fallback(path)}")
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise CheckpointError(f"checkpoint '{path}' has a {type(ckpt[key]).__name__} as "
                                  f"'{key}'; it is damaged or was not written by "
                                  f"'ssl-sec pretrain'{_fallback(path)}")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CheckpointError(f"checkpoint '{path}' has non-tensor weights under 'model'; it "
                              f"is damaged{_fallback(path)}")
    ckpt.setdefault("batch_in_epoch", 0)
    return ckpt


_NOTED: set[Path] = set()


def _unsealed(path: Path, version: int) -> None:
    """A checkpoint without a seal: an error from version 3 on (the seal was lost with a
    damaged end of file), a note once per file and process for older ones."""
    if version >= 3:
        raise CheckpointError(f"checkpoint '{path}' lost its sha256 seal (the end of the "
                              f"file is damaged or cut){_fallback(path)}")
    if path.resolve() not in _NOTED:
        _NOTED.add(path.resolve())
        print(f"note: checkpoint '{path}' carries no digest (format_version {version}, "
              "written before checkpoints were sealed): it loads unverified", file=sys.stderr,
              flush=True)


def _fallback(path: Path) -> str:
    """How to go on when `path` (a run's last.pt) is damaged and prev.pt is beside it."""
    prev = path.with_name("prev.pt")
    if path.name == "last.pt" and prev.is_file():
        return (f"; the previous checkpoint '{prev}' exists: continue from it with "
                f"'ssl-sec pretrain RECIPE --resume-from {prev}'")
    return ""

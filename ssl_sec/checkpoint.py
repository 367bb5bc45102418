"""Checkpoints: atomic, rotated (`last.pt` and `prev.pt`), loaded with weights_only=True and
checked key by key before anything reads them."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

# 2: the loader position (`batch_in_epoch`, mid-epoch checkpoints) and `world_size`.
# Version 1 files (epoch-end checkpoints only) read as version 2 with batch 0.
FORMAT_VERSION = 2

# What a training checkpoint holds, and the type of each entry. Evaluation needs only the
# first three; `--resume` needs all of them.
_MODEL_KEYS = {"config": dict, "model": dict, "step": int}
_TRAINING_KEYS = {"epoch": int, "optimizer": dict, "scaler": dict, "loader_rng": torch.Tensor,
                  "rng": (dict, list)}


def atomic_save(obj: Any, path: str | Path, before_replace=None) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`
    (`before_replace()` runs just before the rename, once the new file is complete).

    A crash mid-write leaves the previous file intact: rename is atomic on POSIX. A failed
    write (disk full, quota) is a CheckpointError that names the file; the temp file goes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    out = _WriteErrors(os.fdopen(fd, "wb"))
    try:
        with out.file:
            torch.save(obj, out)
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


class _WriteErrors:
    """A file wrapper that remembers the OSError of a failed write: torch.save reports a
    full disk as an opaque RuntimeError of its zip writer."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def save_rotated(state: dict, last: Path, prev: Path) -> None:
    """Write `state` to `last`, keeping the checkpoint it replaces as `prev`.

    At every instant `last` is a complete checkpoint (old or new) and `prev` the one
    before it: once the new file is written in full, the old `last` is hard-linked to
    `prev` (atomically, via a temp name), then the new file is renamed over `last`. A
    write that fails (disk full) leaves both as they were.
    """

    def keep_previous() -> None:
        if last.is_file():
            link_atomically(last, prev)

    atomic_save(state, last, before_replace=keep_previous)


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
    that it is ours and whole: the keys evaluation needs, and with `training=True` the keys
    a resume needs, each of the right type. Anything else is a CheckpointError naming the
    file (and `prev.pt` beside it, when there is one to fall back on)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; pass the path of a .pt file "
                              "written by 'ssl-sec pretrain' (e.g. runs/NAME/last.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({_first_line(err)}); "
                              f"it is corrupt, truncated or not an ssl_sec checkpoint"
                              f"{_fallback(path)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ssl_sec":
        raise CheckpointError(f"checkpoint '{path}' is not an ssl_sec checkpoint "
                              "(no 'format: ssl_sec' marker); pass one written by 'ssl-sec pretrain'")
    version = ckpt.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format_version {version!r}, newer than "
                              f"this ssl_sec reads ({FORMAT_VERSION}); upgrade ssl_sec")
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


def _fallback(path: Path) -> str:
    """How to go on when `path` (a run's last.pt) is damaged and prev.pt is beside it."""
    prev = path.with_name("prev.pt")
    if path.name == "last.pt" and prev.is_file():
        return (f"; the previous checkpoint '{prev}' exists: continue from it with "
                f"'ssl-sec pretrain RECIPE --resume-from {prev}'")
    return ""

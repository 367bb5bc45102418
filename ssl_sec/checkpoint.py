"""Atomic checkpoints that hold every piece of training state, loaded with weights_only=True."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves the previous checkpoint intact: rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(obj: Any) -> Any:
    """random.setstate needs tuples; a round trip through some loaders gives lists."""
    if isinstance(obj, (list, tuple)):
        return tuple(_as_tuple(o) for o in obj)
    return obj


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (weights_only=True: no arbitrary code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; pass the path of a .pt file "
                              "written by 'ssl-sec pretrain' (e.g. runs/NAME/last.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({first[:160]}); "
                              "it is corrupt or not an ssl_sec checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ssl_sec" or "model" not in ckpt:
        raise CheckpointError(f"checkpoint '{path}' is not an ssl_sec checkpoint "
                              "(no 'format: ssl_sec' marker); pass one written by 'ssl-sec pretrain'")
    return ckpt

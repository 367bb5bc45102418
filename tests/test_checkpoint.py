"""Atomic saves and safe loads."""

import pickle

import pytest
import torch

from ssl_sec.checkpoint import atomic_save, load_checkpoint
from ssl_sec.errors import CheckpointError


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"format": "ssl_sec", "config": {"seed": 0}, "step": 0,
                 "model": {"w": torch.ones(2)}}, path)
    good = path.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save({"format": "ssl_sec", "model": {}, "x": Boom()}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp files left
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


def test_load_refuses_code_and_foreign_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "ssl_sec", "model": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(evil)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an ssl_sec checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")

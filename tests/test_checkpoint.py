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


# ----------------------------------------------------------------------------- seal
def _sealed_checkpoint(folder, **extra):
    """A small but real checkpoint (a ResNet-18 and its optimizer state), written as training
    writes it: last.pt, with prev.pt beside it."""
    import torchvision

    from ssl_sec.checkpoint import FORMAT_VERSION, save_rotated

    model = torchvision.models.resnet18(num_classes=10)
    state = {"format": "ssl_sec", "format_version": FORMAT_VERSION, "config": {"seed": 0},
             "model": model.state_dict(), "step": 4, "epoch": 1,
             "optimizer": {"state": {0: {"momentum_buffer": torch.randn(64, 3, 7, 7)}},
                           "param_groups": [{"lr": 0.3, "params": [0]}]}, **extra}
    last, prev = folder / "last.pt", folder / "prev.pt"
    save_rotated({**state, "step": 2}, last, prev)
    save_rotated(state, last, prev)
    return last, prev


def _offsets(path) -> dict[str, list[int]]:
    """Byte offsets in each part of a checkpoint's zip archive."""
    import struct
    import zipfile

    data = path.read_bytes()

    def start(name: str) -> int:  # where an entry's bytes begin, after its local header
        info = zipfile.ZipFile(path).getinfo(name)
        names, extra = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        return info.header_offset + 30 + names + extra

    entries = zipfile.ZipFile(path).namelist()
    pickled = start(next(n for n in entries if n.endswith("data.pkl")))
    tensor = start(next(n for n in entries if n.endswith("data/0")))
    return {"header": [0, 4, 8, 14, 22, 28, 30], "pickle": [pickled + 2, pickled + 90],
            "tensor data": [tensor + 100, len(data) // 2, len(data) * 3 // 4],
            "end": [len(data) - 1, len(data) - 40, len(data) - 75, len(data) - 80,
                    len(data) - 100, len(data) - 160]}


def test_a_flipped_byte_anywhere_is_caught_and_names_prev_pt(tmp_path):
    """One bit flipped in the header, the pickled state, the tensor data or the end of the
    file: every one is a CheckpointError naming the file and prev.pt, and nothing loads."""
    last, prev = _sealed_checkpoint(tmp_path)
    good = last.read_bytes()
    assert load_checkpoint(last)["step"] == 4
    tried = 0
    for part, offsets in _offsets(last).items():
        for offset in offsets:
            damaged = bytearray(good)
            damaged[offset] ^= 0x10
            last.write_bytes(bytes(damaged))
            with pytest.raises(CheckpointError) as caught:
                load_checkpoint(last)
            message = str(caught.value)
            assert str(last) in message and str(prev) in message, (part, offset, message)
            tried += 1
    assert tried == 18
    last.write_bytes(good)
    assert load_checkpoint(last)["step"] == 4  # the good bytes load again


def test_a_flip_in_tensor_data_is_a_sha256_failure_and_a_cut_file_unreadable(tmp_path):
    last, _ = _sealed_checkpoint(tmp_path)
    good = last.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x01  # one bit of a weight: torch.load alone would not notice
    last.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="fails its sha256 check"):
        load_checkpoint(last)
    standalone = tmp_path / "copy.pt"  # no prev.pt beside it: the advice is another copy
    standalone.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="copy it again"):
        load_checkpoint(standalone)
    last.write_bytes(good[:-30])  # the seal cut off with the end of the file
    with pytest.raises(CheckpointError, match="fails its sha256 check|cannot be read"):
        load_checkpoint(last)


def test_checkpoints_from_before_the_seal_load_with_one_note(tmp_path, capsys):
    """Format version 2 (no seal): it loads, with a note once per file; a version-3 file
    without its seal is refused."""
    old = tmp_path / "old.pt"
    torch.save({"format": "ssl_sec", "format_version": 2, "config": {"seed": 0},
                "model": {"w": torch.ones(2)}, "step": 3}, old)
    assert load_checkpoint(old)["step"] == 3
    assert load_checkpoint(old)["step"] == 3
    err = capsys.readouterr().err
    assert err.count("carries no digest") == 1 and "loads unverified" in err
    unsealed = tmp_path / "unsealed.pt"
    from ssl_sec.checkpoint import FORMAT_VERSION

    torch.save({"format": "ssl_sec", "format_version": FORMAT_VERSION, "config": {"seed": 0},
                "model": {"w": torch.ones(2)}, "step": 3}, unsealed)
    with pytest.raises(CheckpointError, match="lost its sha256 seal"):
        load_checkpoint(unsealed)


def test_the_seal_is_the_sha256_of_the_bytes_torch_wrote(tmp_path):
    """The seal is an ordinary zip comment: zipfile and torch read the archive as written."""
    import hashlib
    import zipfile

    from ssl_sec.digest import SEAL

    path = tmp_path / "x.pt"
    atomic_save({"a": torch.arange(5)}, path, sealed=True)
    data = path.read_bytes()
    comment = zipfile.ZipFile(path).comment
    assert comment.startswith(SEAL)
    body = data[:-len(comment) - 2] + b"\0\0"
    assert comment[len(SEAL):].decode() == hashlib.sha256(body).hexdigest()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(5))
    # A damaged seal is a damaged file, even where the content alone would pass as an older,
    # unsealed checkpoint: the comment's length, its prefix, a digit.
    atomic_save({"format": "ssl_sec", "config": {}, "model": {}, "step": 0}, path, sealed=True)
    good = path.read_bytes()
    for offset in (len(good) - len(comment) - 2, len(good) - len(comment) + 3, len(good) - 1):
        damaged = bytearray(good)
        damaged[offset] ^= 0x02
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


def test_a_damaged_checkpoint_is_one_line_exit_2(tmp_path):
    from helpers import run_cli

    last, prev = _sealed_checkpoint(tmp_path)
    damaged = bytearray(last.read_bytes())
    damaged[len(damaged) // 3] ^= 0x04
    last.write_bytes(bytes(damaged))
    proc = run_cli("knn", "--checkpoint", str(last))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "fails its sha256 check" in lines[0] and f"--resume-from {prev}" in lines[0]


def test_a_code_payload_is_one_line_without_torch_warnings(tmp_path):
    """A pickle payload saved with a newer pickle protocol: torch.load warns about the
    protocol before refusing it; the user sees only our line."""
    from helpers import run_cli

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "ssl_sec", "model": Evil()}, evil, pickle_protocol=4)
    proc = run_cli("knn", "--checkpoint", str(evil), process=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot be read" in lines[0] and "pwned" not in proc.stdout

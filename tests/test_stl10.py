"""STL-10 in its official binary format, on tiny files written in that format (tests/helpers.py
`write_stl10`: 6 train, 4 test, 5 unlabeled images with a pixel pattern that a reader without
the column-major transpose would get wrong). The real set (2.6 GB) is not downloaded."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import SMALL, STL10_CLASSES, stl10_pixels, write_stl10

from ssl_sec.data import DATASETS, load_dataset, load_splits
from ssl_sec.data import stl10 as stl10_mod
from ssl_sec.data.stl10 import load_stl10
from ssl_sec.errors import ConfigError, DataError
from ssl_sec.recipe import from_dict


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_reads_the_official_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_stl10(tmp_path)
    train = load_stl10(tmp_path, "train")
    assert train.images.shape == (6, 3, 96, 96) and train.images.dtype == torch.uint8
    assert train.images.is_contiguous() and train.name == "stl10"
    assert torch.equal(train.images, torch.from_numpy(stl10_pixels(6)))
    # Rows first: one column right adds 3, one row down adds 1 (the files store columns first).
    assert int(train.images[0, 0, 0, 1]) == 3 and int(train.images[0, 0, 1, 0]) == 1
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5]  # 1..6 on disk
    assert train.classes == STL10_CLASSES and train.num_classes == 10

    test = load_stl10(folder, "test")  # root may be stl10_binary/ itself
    assert torch.equal(test.images, torch.from_numpy(stl10_pixels(4, 1000)))
    assert test.labels.tolist() == [0, 1, 2, 3]

    monkeypatch.setenv("SSL_SEC_DATA", str(tmp_path))  # root from the environment
    unlabeled = load_stl10(None, "unlabeled")
    assert torch.equal(unlabeled.images, torch.from_numpy(stl10_pixels(5, 2000)))
    assert unlabeled.labels.tolist() == [-1] * 5 and unlabeled.classes == STL10_CLASSES


def test_registry_entry_and_split_names(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    spec = DATASETS["stl10"]
    assert (spec.title, spec.folder, spec.splits, spec.pretrain) == \
        ("STL-10", False, ("train", "test", "unlabeled"), "unlabeled")
    assert len(load_dataset("stl10", tmp_path, "unlabeled")) == 5
    for load in (lambda: load_dataset("stl10", tmp_path, "extra"),
                 lambda: load_stl10(tmp_path, "extra")):
        with pytest.raises(ConfigError) as e:
            load()
        assert "'extra'" in _one_line(e) and "unlabeled" in str(e.value)


def test_bad_files_are_one_line_errors_naming_them(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_SEC_DATA", raising=False)
    with pytest.raises(DataError) as e:  # nothing there: where it looked, and the fix
        load_stl10(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "stl10_binary") in _one_line(e)
    assert "data.root" in str(e.value) and "data.download=true" in str(e.value)

    folder = write_stl10(tmp_path)
    x = folder / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-100])  # truncated
    with pytest.raises(DataError) as e:
        load_stl10(tmp_path, "train")
    assert str(x) in _one_line(e) and "27,648" in str(e.value)
    assert "data.download=true" in str(e.value)

    x.write_bytes(stl10_pixels(5).transpose(0, 1, 3, 2).tobytes())  # 5 images, 6 labels
    with pytest.raises(DataError) as e:
        load_stl10(tmp_path, "train")
    assert str(folder / "train_y.bin") in _one_line(e) and "6 labels" in str(e.value)

    (folder / "test_y.bin").write_bytes(bytes([1, 2, 11, 4]))  # label 11 of 10 classes
    with pytest.raises(DataError) as e:
        load_stl10(tmp_path, "test")
    assert str(folder / "test_y.bin") in _one_line(e) and "1..10" in str(e.value)

    (folder / "unlabeled_X.bin").unlink()
    with pytest.raises(DataError) as e:
        load_stl10(tmp_path, "unlabeled")
    assert str(folder / "unlabeled_X.bin") in _one_line(e)


def _archive(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """stl10_binary.tar.gz of the tiny set, and its files' MD5s."""
    folder = write_stl10(tmp_path / "src")
    archive = tmp_path / "stl10_binary.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname="stl10_binary")
    md5s = {name: hashlib.md5((folder / name).read_bytes()).hexdigest()
            for name in stl10_mod.FILE_MD5}
    return archive, md5s


def test_download_checks_the_archive_and_each_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    archive, md5s = _archive(tmp_path)
    good = archive.read_bytes()
    monkeypatch.setattr(stl10_mod, "URL", archive.as_uri())
    monkeypatch.setattr(stl10_mod, "MD5", hashlib.md5(good).hexdigest())
    root = tmp_path / "root"

    # A corrupted archive (one flipped byte): refused by its MD5, nothing left behind.
    archive.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    with pytest.raises(DataError) as e:
        load_stl10(root, "train", download=True)
    assert "MD5" in _one_line(e) and stl10_mod.MD5 in str(e.value)
    assert list(root.iterdir()) == []

    # The archive is right but a file is not what the official list says (here: the tiny
    # files against the real MD5s): refused, nothing left behind.
    archive.write_bytes(good)
    with pytest.raises(DataError) as e:
        load_stl10(root, "train", download=True)
    assert "train_X.bin" in _one_line(e) and stl10_mod.FILE_MD5["train_X.bin"] in str(e.value)
    assert list(root.iterdir()) == []

    monkeypatch.setattr(stl10_mod, "FILE_MD5", md5s)
    s = load_stl10(root, "unlabeled", download=True)
    assert len(s) == 5 and sorted(p.name for p in root.iterdir()) == ["stl10_binary"]
    assert len(load_stl10(root, "train")) == 6  # now found, no download

    # Unreachable URL: one line naming the searched paths and the fix.
    monkeypatch.setattr(stl10_mod, "URL", (tmp_path / "absent.tar.gz").as_uri())
    with pytest.raises(DataError) as e:
        load_stl10(tmp_path / "other", download=True)
    assert str(tmp_path / "other" / "stl10_binary") in _one_line(e)
    assert "SSL_SEC_DATA" in str(e.value)


def test_download_rejects_path_traversal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_stl10(tmp_path / "src")
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "class_names.txt", arcname="../escaped.txt")
    monkeypatch.setattr(stl10_mod, "URL", archive.as_uri())
    monkeypatch.setattr(stl10_mod, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    root = tmp_path / "root"
    with pytest.raises(DataError, match="unsafe"):
        load_stl10(root, download=True)
    assert not (tmp_path / "escaped.txt").exists() and not (root / "escaped.txt").exists()


def test_splits_pretrain_on_unlabeled(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    cfg = from_dict({}, ["data.dataset=stl10", f"data.root={tmp_path}"])
    splits = load_splits(cfg.data)
    assert (len(splits.pretrain), len(splits.bank), len(splits.test)) == (5, 6, 4)
    assert splits.pretrain.labels.tolist() == [-1] * 5  # never used as labels
    assert torch.equal(splits.pretrain.images, torch.from_numpy(stl10_pixels(5, 2000)))
    assert torch.equal(splits.bank.images, torch.from_numpy(stl10_pixels(6)))
    assert splits.num_classes == 10 and splits.mode == "memory"
    # A class subset restricts the labelled splits only.
    cfg = from_dict({}, ["data.dataset=stl10", f"data.root={tmp_path}", "data.classes=[0,1]"])
    splits = load_splits(cfg.data)
    assert (len(splits.pretrain), len(splits.bank), len(splits.test)) == (5, 2, 2)


def test_pretraining_run_on_stl10(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One epoch through the engine on the tiny files at 96 px: it pretrains on the 5
    unlabeled images (one batch of 4) and its kNN bank is the 6 train images."""
    from ssl_sec.engine import train

    write_stl10(tmp_path / "data")
    cfg = from_dict({}, SMALL + [f"out_dir={tmp_path}", "data.dataset=stl10",
                                 f"data.root={tmp_path / 'data'}", "optim.batch_size=4",
                                 "optim.epochs=1", "optim.warmup_epochs=0", "augment.size=96",
                                 "augment.blur_p=0.5", "eval.knn_k=200", "log_every=1"])
    result = train(cfg, progress_bar=False)
    assert "5 pretraining / 6 kNN-bank / 4 test images, 1 steps/epoch" in capsys.readouterr().out
    assert result["epoch"] == 1 and result["step"] == 1
    assert result["k"] == 6  # k = the bank's size when eval.knn_k is larger
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert (tmp_path / "run" / "last.pt").is_file()

"""Data layer on the real shared data (CIFAR-10, the CIFAR-100 subset, an Imagenette sample)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_sec.data import (
    NORMALIZATION,
    DeviceLoader,
    ImageSet,
    load_cifar,
    load_dataset,
    load_imagefolder,
)
from ssl_sec.data import cifar as cifar_mod
from ssl_sec.data.cifar import RestrictedUnpickler
from ssl_sec.errors import ConfigError, DataError

DATA = Path(os.environ.get("SSL_SEC_DATA") or Path(__file__).parents[2] / "shared" / "data")
SAMPLE = DATA / "imagefolder-sample"


@pytest.fixture(scope="module")
def c10_train() -> ImageSet:
    return load_cifar("cifar10", DATA, train=True)


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


def test_cifar10_train(c10_train: ImageSet) -> None:
    s = c10_train
    assert s.images.shape == (50000, 3, 32, 32) and s.images.dtype == torch.uint8
    assert s.images.is_contiguous()
    assert s.labels.dtype == torch.int64
    assert torch.bincount(s.labels, minlength=10).tolist() == [5000] * 10
    assert s.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert s.classes == [
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ]  # fmt: skip
    assert s.name == "cifar10" and len(s) == 50000


def test_cifar10_normalization_matches_pixels(c10_train: ImageSet) -> None:
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for chunk in c10_train.images.split(5000):
        x = chunk.double().div_(255)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = c10_train.images[:, 0].numel()
    mean = total / n
    std = (squares / n - mean.square()).sqrt()
    ref_mean, ref_std = NORMALIZATION["cifar10"]
    assert torch.allclose(mean, torch.tensor(ref_mean, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(std, torch.tensor(ref_std, dtype=torch.float64), atol=1e-4)


def test_cifar10_test() -> None:
    s = load_cifar("cifar10", DATA, train=False)
    assert s.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(s.labels, minlength=10).tolist() == [1000] * 10


def test_cifar100_subset() -> None:
    tr = load_cifar("cifar100", DATA, train=True)
    te = load_cifar("cifar100", DATA, train=False)
    assert tr.images.shape == (1117, 3, 32, 32) and te.images.shape == (916, 3, 32, 32)
    assert tr.labels[:5].tolist() == [19, 29, 0, 11, 1]
    assert len(tr.classes) == 100
    assert [tr.classes[i] for i in (19, 29, 0, 11, 1)] == [
        "cattle", "dinosaur", "apple", "boy", "aquarium_fish",
    ]  # fmt: skip
    assert tr.labels.unique().numel() == 100 and te.labels.unique().numel() == 100


def test_root_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    # root pointing at the batches folder itself
    a = load_cifar("cifar100", DATA / "cifar-100-python", train=False)
    # root from the environment
    monkeypatch.setenv("SSL_SEC_DATA", str(DATA))
    b = load_cifar("cifar100", None, train=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_missing_root_names_searched_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_SEC_DATA", raising=False)
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_cifar("cifar10", root)
    msg = str(e.value)
    assert str(root / "cifar-10-batches-py") in msg and str(root) in msg
    assert "SSL_SEC_DATA" in msg and "data.root" in msg and "\n" not in msg


def _fake_cifar100(tmp_path: Path, train_payload: bytes) -> Path:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    shutil.copy(DATA / "cifar-100-python" / "meta", folder / "meta")
    (folder / "train").write_bytes(train_payload)
    return tmp_path


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):  # type: ignore[override]
        return (os.system, (self.cmd,))


def test_restricted_unpickler_rejects_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(
        {"data": _Evil(f"echo pwned > {marker}"), "fine_labels": [0]}, protocol=2
    )
    root = _fake_cifar100(tmp_path, payload)
    with pytest.raises(DataError) as e:
        load_cifar("cifar100", root, train=True)
    assert "system" in str(e.value) and str(root / "cifar-100-python" / "train") in str(e.value)
    assert not marker.exists()
    with pytest.raises(DataError, match="builtins.eval"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(eval)), "mem").load()


def test_restricted_unpickler_reads_numpy2_pickles() -> None:
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = RestrictedUnpickler(io.BytesIO(pickle.dumps({"x": a}, protocol=2)), "mem").load()
    assert np.array_equal(out["x"], a)


def test_malformed_batch_names_path(tmp_path: Path) -> None:
    bad = {"data": np.zeros((4, 100), dtype=np.uint8), "fine_labels": [0, 1, 2, 3]}
    root = _fake_cifar100(tmp_path, pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"\(N, 3072\)") as e:
        load_cifar("cifar100", root, train=True)
    assert str(root / "cifar-100-python" / "train") in str(e.value)
    short = {"data": np.zeros((4, 3072), dtype=np.uint8), "fine_labels": [0, 1]}
    (root / "cifar-100-python" / "train").write_bytes(pickle.dumps(short, protocol=2))
    with pytest.raises(DataError, match="4 images"):
        load_cifar("cifar100", root, train=True)
    (root / "cifar-100-python" / "train").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="train"):
        load_cifar("cifar100", root, train=True)


def _tarball(path: Path, members: dict[str, Path]) -> str:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for arcname, src in members.items():
            tar.add(src, arcname=arcname)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = DATA / "cifar-100-python"
    archive = tmp_path / "c100.tar.gz"
    md5 = _tarball(archive, {f"cifar-100-python/{n}": src / n for n in ("meta", "test", "train")})
    spec = cifar_mod.CIFAR_SPECS["cifar100"]
    root = tmp_path / "root"

    # wrong checksum: error, archive deleted, nothing extracted
    monkeypatch.setitem(
        cifar_mod.CIFAR_SPECS,
        "cifar100",
        dataclasses.replace(spec, url=archive.as_uri(), md5="0" * 32),
    )
    with pytest.raises(DataError, match="MD5"):
        load_cifar("cifar100", root, train=False, download=True)
    assert list(root.iterdir()) == []

    monkeypatch.setitem(
        cifar_mod.CIFAR_SPECS, "cifar100", dataclasses.replace(spec, url=archive.as_uri(), md5=md5)
    )
    s = load_cifar("cifar100", root, train=False, download=True)
    assert s.images.shape == (916, 3, 32, 32)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-100-python"]

    # unreachable URL: one line naming the searched paths and the fix
    monkeypatch.setitem(
        cifar_mod.CIFAR_SPECS,
        "cifar100",
        dataclasses.replace(spec, url=(tmp_path / "absent.tar.gz").as_uri()),
    )
    with pytest.raises(DataError) as e:
        load_cifar("cifar100", tmp_path / "other", download=True)
    assert str(tmp_path / "other" / "cifar-100-python") in str(e.value)
    assert "SSL_SEC_DATA" in str(e.value)


def test_download_rejects_path_traversal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "evil.tar.gz"
    md5 = _tarball(archive, {"../escaped.txt": DATA / "cifar-100-python" / "meta"})
    spec = dataclasses.replace(cifar_mod.CIFAR_SPECS["cifar100"], url=archive.as_uri(), md5=md5)
    monkeypatch.setitem(cifar_mod.CIFAR_SPECS, "cifar100", spec)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="unsafe"):
        load_cifar("cifar100", root, download=True)
    assert not (tmp_path / "escaped.txt").exists()


def test_imageset_subset_and_select_classes() -> None:
    s = load_cifar("cifar100", DATA, train=False)
    sub = s.subset([5, 0, 2])
    assert torch.equal(sub.images, s.images[[5, 0, 2]]) and sub.images.is_contiguous()
    keep = s.select_classes([7, 3])
    assert set(keep.labels.tolist()) == {3, 7} and keep.classes == s.classes
    assert len(keep) == int(((s.labels == 3) | (s.labels == 7)).sum())
    remapped = s.select_classes([7, 3], remap=True)
    assert remapped.classes == [s.classes[7], s.classes[3]]
    assert torch.equal(remapped.labels, (keep.labels == 3).long())
    assert torch.equal(remapped.images, keep.images)
    with pytest.raises(DataError):
        s.select_classes([100])


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------


def test_imagefolder_sample() -> None:
    s = load_imagefolder(SAMPLE, size=64)
    assert s.images.shape == (300, 3, 64, 64) and s.images.dtype == torch.uint8
    assert s.classes == sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    assert torch.bincount(s.labels).tolist() == [30] * 10
    files = [f for c in s.classes for f in sorted((SAMPLE / c).iterdir())]
    gray = [i for i, f in enumerate(files) if Image.open(f).mode == "L"]
    assert len(gray) == 5
    for i in gray:  # converted to RGB: three equal channels
        assert torch.equal(s.images[i, 0], s.images[i, 1]) and torch.equal(
            s.images[i, 1], s.images[i, 2]
        )
    colour = next(i for i in range(300) if i not in gray)
    assert not torch.equal(s.images[colour, 0], s.images[colour, 2])


def test_imagefolder_class_list_and_limit(tmp_path: Path) -> None:
    wanted = ["n03888257", "n01440764", "n03028079"]
    f = tmp_path / "classes.txt"
    f.write_text("\n".join(wanted) + "\n")
    s = load_imagefolder(SAMPLE, size=32, classes_file=f, max_per_class=4)
    assert s.classes == sorted(wanted) and s.images.shape == (12, 3, 32, 32)
    assert s.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_imagenet100_class_list_missing_classes() -> None:
    classes_file = DATA / "imagenet100" / "classes.txt"
    listed = classes_file.read_text().split()
    missing = [c for c in listed if not (SAMPLE / c).is_dir()]
    assert len(listed) == 100 and missing
    with pytest.raises(DataError) as e:
        load_imagefolder(SAMPLE, size=32, classes_file=classes_file)
    assert missing[0] in str(e.value) and f"{len(missing)} of 100" in str(e.value)


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    s = load_dataset("imagefolder", SAMPLE, "train", download=False, image_size=32)
    assert s.images.shape == (300, 3, 32, 32)
    assert len(load_dataset("cifar100", DATA, "test", download=False)) == 916
    with pytest.raises(ConfigError) as e:
        load_dataset("cifar1000", DATA, "train", download=False)
    assert "cifar10, cifar100, imagefolder" in str(e.value)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("imagefolder", SAMPLE, "train", download=False)


# --------------------------------------------------------------------------------------------
# DeviceLoader
# --------------------------------------------------------------------------------------------


def _indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # image i carries its index in its pixels (mod 256) and in its label
    labels = torch.arange(n, dtype=torch.int64)
    images = (labels % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return images, labels


def test_device_loader_covers_permutation() -> None:
    images, labels = _indexed(103)
    loader = DeviceLoader(images, labels, batch_size=10, drop_last=False)
    assert len(loader) == 11
    seen = []
    for x, y in loader:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 2, 2)
        assert torch.equal(x[:, 0, 0, 0].long(), y % 256)
        seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == list(range(103))
    assert not torch.equal(torch.cat(seen), labels)  # shuffled

    dropped = DeviceLoader(images, labels, batch_size=10)
    assert len(dropped) == 10
    got = torch.cat([y for _, y in dropped])
    assert got.numel() == 100 and got.unique().numel() == 100


def test_device_loader_reproducible() -> None:
    images, labels = _indexed(50)

    def epochs(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        loader = DeviceLoader(images, labels, batch_size=8, generator=g)
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(2)]

    a, b = epochs(1), epochs(1)
    assert a == b and a[0] != a[1] and epochs(2) != a

    # resuming from the saved generator state replays the epoch
    g = torch.Generator().manual_seed(3)
    loader = DeviceLoader(images, labels, batch_size=8, generator=g)
    first = [y for _, y in loader]
    g2 = torch.Generator()
    g2.set_state(loader.epoch_state)
    again = [y for _, y in DeviceLoader(images, labels, batch_size=8, generator=g2)]
    assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True))


def test_device_loader_rejects_oversized_batch() -> None:
    images, labels = _indexed(5)
    with pytest.raises(ConfigError, match="batch_size=6"):
        DeviceLoader(images, labels, batch_size=6)
    assert len(DeviceLoader(images, labels, batch_size=6, drop_last=False)) == 1
    with pytest.raises(ConfigError):
        DeviceLoader(images, labels, batch_size=0)


def test_splits_separate_pretraining_bank_and_test() -> None:
    from ssl_sec.data import load_splits
    from ssl_sec.recipe import from_dict

    cfg = from_dict({}, [f"data.root={DATA}", "data.dataset=cifar100", "data.train_subset=100",
                         "data.test_subset=50", "data.classes=[0,1,2,3,4]"])
    splits = load_splits(cfg.data)
    assert splits.mode == "memory" and splits.pretrain is splits.bank  # CIFAR: same images
    assert len(splits.bank) <= 100 and len(splits.test) <= 50
    assert set(splits.test.labels.tolist()) <= {0, 1, 2, 3, 4}
    assert splits.num_classes == 100

"""The on-disk feature cache: same features as a fresh extraction, keyed by content."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEADLINE_S, rewrite_checkpoint
from torch import nn

from ssl_sec.augment import EvalTransform
from ssl_sec.checkpoint import load_checkpoint
from ssl_sec.data.imageset import ImageSet
from ssl_sec.evaluation import features as features_mod
from ssl_sec.evaluation.features import cached_features, extract_features, file_sha256
from ssl_sec.evaluation.knn_command import knn_command

ROOT = Path(__file__).resolve().parents[1]


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    transform = EvalTransform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return net.eval(), images, transform


def _cached(net, images, transform, cache_dir, key, **kwargs):
    """cached_features of (images, labels 0..N-1) on the CPU; the features only."""
    labels = torch.arange(images.shape[0])
    feats, got = cached_features(net, ImageSet(images, labels, [], "t"), transform, cache_dir,
                                 key,
                                 torch.device("cpu"), 16, **kwargs)
    assert torch.equal(got, labels)
    return feats


def test_cache_returns_the_extracted_features_and_reads_them_back(tmp_path, monkeypatch):
    net, images, transform = _setup()
    key = {"checkpoint_sha256": "abc", "dataset": "x", "split": "test"}
    first = _cached(net, images, transform, tmp_path, key)
    torch.testing.assert_close(first, extract_features(net, images, transform), rtol=0, atol=0)
    assert torch.allclose(first.norm(dim=1), torch.ones(40))
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    entry = torch.load(files[0], weights_only=True)
    assert entry["key_parts"]["split"] == "test" and entry["key_parts"]["normalized"] is True

    def boom(*args, **kwargs):
        raise AssertionError("extract_features called although the cache holds the entry")

    monkeypatch.setattr(features_mod, "labelled_features", boom)
    again = _cached(net, images, transform, tmp_path, key)
    assert torch.equal(again, first)


def test_cache_key_covers_parts_images_and_normalisation(tmp_path):
    net, images, transform = _setup()
    key = {"checkpoint_sha256": "abc", "split": "test"}
    _cached(net, images, transform, tmp_path, key)
    _cached(net, images, transform, tmp_path, {**key, "checkpoint_sha256": "def"})
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    _cached(net, other, transform, tmp_path, key)
    raw = _cached(net, images, transform, tmp_path, key, normalize=False)
    assert len(list(tmp_path.glob("*.pt"))) == 4
    assert not torch.allclose(raw.norm(dim=1), torch.ones(40))


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    net, images, transform = _setup()
    key = {"split": "train"}
    good = _cached(net, images, transform, tmp_path, key)
    (entry,) = tmp_path.glob("*.pt")
    entry.write_bytes(b"garbage")
    assert torch.equal(_cached(net, images, transform, tmp_path, key), good)
    assert torch.load(entry, weights_only=True)["features"].shape == good.shape


def test_no_cache_dir_means_no_files(tmp_path):
    net, images, transform = _setup()
    out = _cached(net, images, transform, None, {"split": "test"})
    assert out.shape == (40, 8) and not list(tmp_path.iterdir())


def test_file_sha256_follows_content(tmp_path):
    f = tmp_path / "a.pt"
    f.write_bytes(b"one")
    a = file_sha256(f)
    f.write_bytes(b"two")
    os.utime(f, ns=(1, 1))
    assert file_sha256(f) != a


def test_knn_command_uses_the_cache(make_checkpoint, data_root, monkeypatch):
    path = make_checkpoint()
    first = knn_command(path, ["eval.knn_k=5"])
    assert len(list((path.parent / "features").glob("*.pt"))) == 2

    def boom(*args, **kwargs):
        raise AssertionError("features recomputed")

    monkeypatch.setattr(features_mod, "labelled_features", boom)
    second = knn_command(path, ["eval.knn_k=5"])
    assert (second["top1"], second["top5"]) == (first["top1"], first["top5"])
    monkeypatch.undo()
    # A changed checkpoint (same name) gets new features.
    ckpt = load_checkpoint(path)
    ckpt["epoch"] = 1
    rewrite_checkpoint(path, ckpt)
    knn_command(path, ["eval.knn_k=5"])
    assert len(list((path.parent / "features").glob("*.pt"))) == 4


def test_knn_cli_no_cache(make_checkpoint, data_root):
    path = make_checkpoint()
    proc = subprocess.run([sys.executable, "-m", "ssl_sec", "knn", "--checkpoint", str(path),
                           "--no-cache", "eval.knn_k=5"], cwd=ROOT, env={**os.environ},
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["feature_cache"] is None
    assert not (path.parent / "features").exists()


@pytest.mark.parametrize("bad", [{"x": object()}])
def test_key_parts_must_be_json(tmp_path, bad):
    net, images, transform = _setup()
    with pytest.raises(TypeError, match="JSON"):
        _cached(net, images, transform, tmp_path, bad)

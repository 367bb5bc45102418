"""Few-shot protocol: exact on clustered features, seeded, CI by the formula, real CIFAR-100."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli

from ssl_sec.data import load_splits
from ssl_sec.errors import UserError
from ssl_sec.evaluation.kshot import (
    fit_logistic,
    kshot_command,
    kshot_evaluate,
    mean_ci95,
    nn1_predict,
    parse_classes,
    prototype_predict,
)
from ssl_sec.recipe import from_dict

ROOT = Path(__file__).resolve().parents[1]


def _clustered(per_class: int, class_ids: list[int], dim: int, noise: float, seed: int):
    """L2-normalised features around orthogonal class centres (noise 0: perfect clusters)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(class_ids).repeat_interleave(per_class)
    centres = torch.eye(len(class_ids), dim)
    idx = torch.arange(len(class_ids)).repeat_interleave(per_class)
    x = centres[idx] + noise * torch.randn(len(labels), dim, generator=g)
    return F.normalize(x, dim=1), labels


def test_perfect_clusters_give_100_percent_for_every_classifier():
    feats, labels = _clustered(12, [3, 7, 11, 20, 42], dim=16, noise=0.05, seed=0)
    out = kshot_evaluate(feats, labels, shots=[1, 5, 10], replications=4, seed=0)
    assert out["skipped"] == {} and set(out["results"]) == {"1", "5", "10"}
    for k, entry in out["results"].items():
        assert entry["n_support"] == 5 * int(k) and entry["n_query"] == 60 - 5 * int(k)
        for method in ("prototype", "nn1", "logistic"):
            assert entry[method]["values"] == [100.0] * 4, (k, method)
            assert entry[method]["mean"] == 100.0 and entry[method]["ci95"] == 0.0


def test_replications_are_reproducible_with_a_seed_and_differ_with_another():
    feats, labels = _clustered(15, list(range(6)), dim=12, noise=0.9, seed=1)
    a = kshot_evaluate(feats, labels, shots=[1, 5], replications=5, seed=0)
    b = kshot_evaluate(feats, labels, shots=[1, 5], replications=5, seed=0)
    c = kshot_evaluate(feats, labels, shots=[1, 5], replications=5, seed=1)
    assert a == b
    for k in ("1", "5"):
        for method in ("prototype", "nn1", "logistic"):
            values = a["results"][k][method]["values"]
            assert len(values) == 5 and len(set(values)) > 1  # replications differ
            assert all(0 <= v <= 100 for v in values)
        assert a["results"][k]["prototype"]["values"] != c["results"][k]["prototype"]["values"]


def test_ci95_is_1_96_sample_std_over_sqrt_r():
    mean, ci = mean_ci95([50.0, 60.0, 70.0])
    # sample std of (50, 60, 70) is 10; 1.96 * 10 / sqrt(3)
    assert mean == pytest.approx(60.0) and ci == pytest.approx(11.316065, abs=1e-6)
    assert mean_ci95([42.0]) == (42.0, None)
    feats, labels = _clustered(10, list(range(4)), dim=8, noise=1.0, seed=2)
    out = kshot_evaluate(feats, labels, shots=[2], replications=7, seed=3)
    for method in ("prototype", "nn1", "logistic"):
        v = out["results"]["2"][method]["values"]
        hand = 1.96 * math.sqrt(sum((x - sum(v) / 7) ** 2 for x in v) / 6) / math.sqrt(7)
        assert out["results"]["2"][method]["ci95"] == pytest.approx(hand)
        assert out["results"]["2"][method]["mean"] == pytest.approx(sum(v) / 7)


def test_k_is_skipped_when_a_class_has_too_few_images():
    feats, labels = _clustered(8, [0, 1, 2], dim=8, noise=0.1, seed=0)
    feats, labels = feats[:-3], labels[:-3]  # class 2 keeps 5 images
    out = kshot_evaluate(feats, labels, shots=[1, 4, 5, 10], replications=2)
    assert set(out["results"]) == {"1", "4"}
    assert set(out["skipped"]) == {"5", "10"}
    assert "class 2 has only 5 images" in out["skipped"]["5"]
    assert out["images_per_class"] == {"min": 5, "max": 8}


def test_prototype_and_nn1_by_hand():
    support = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    support_y = torch.tensor([0, 0, 1])
    query = F.normalize(torch.tensor([[0.5, 0.9], [1.0, 0.1]]), dim=1)
    # prototype of class 0 = normalise(mean((1,0), (0.6,0.8))) = normalise(0.8, 0.4)
    # q0 = (0.486, 0.874): cos to (0.894, 0.447) = 0.825, to (0, 1) = 0.874 -> class 1
    assert prototype_predict(support, support_y, query, 2).tolist() == [1, 0]
    # 1-NN: q0 is closest to (0.6, 0.8) (cos 0.991) -> class 0
    assert nn1_predict(support, support_y, query).tolist() == [0, 0]


def test_logistic_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    feats, labels = _clustered(20, list(range(4)), dim=10, noise=0.8, seed=4)
    w, b = fit_logistic(feats, labels, 4, c=1.0)
    x = feats.double().numpy()
    ours = torch.softmax(torch.from_numpy(x) @ w.T + b, dim=1).numpy()
    # The reference in float64: scikit-learn keeps float32 input in float32 and then stops
    # 3e-5 to 2.4e-4 away from the optimum, depending on the features' last bits (so on the
    # CPU's kernels). In float64 it is within 1e-7 of it; ours (float64 L-BFGS, stopped by
    # its tolerances) within 7e-6.
    ref = sklearn.LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x, labels.numpy())
    np.testing.assert_allclose(ours, ref.predict_proba(x), rtol=0, atol=1e-4)


def test_parse_classes():
    assert parse_classes(["50-53"]) == [50, 51, 52, 53]
    assert parse_classes(["1,3", "2", "7-8"]) == [1, 2, 3, 7, 8]
    for bad in (["a"], ["5-2"], [","]):
        with pytest.raises(UserError, match="--target-classes"):
            parse_classes(bad)


def test_source_only_pretraining_config_sees_only_source_classes(data_root):
    source = list(range(50))
    cfg = from_dict({}, ["data.dataset=cifar100", f"data.classes={source}"])
    splits = load_splits(cfg.data)
    train_set, test_set = splits.bank, splits.test
    assert int(train_set.labels.max()) < 50 and int(test_set.labels.max()) < 50
    assert set(train_set.labels.tolist()) == set(source)


def test_kshot_command_on_source_only_cifar100_checkpoint(make_checkpoint, data_root):
    source = list(range(50))
    path = make_checkpoint("data.dataset=cifar100", f"data.classes={source}",
                           "data.train_subset=0", "data.test_subset=0")
    result = kshot_command(path, shots=[1, 5], replications=2, seed=0)
    assert result["target_classes"] == list(range(50, 100)) and result["disjoint"] is True
    assert result["source_classes"] == source and result["split"] == "test"
    # The CIFAR-100 test subset holds 4..15 images of each target class.
    assert result["images_per_class"]["min"] == 4 and set(result["skipped"]) == {"5"}
    entry = result["results"]["1"]
    assert entry["n_support"] == 50 and entry["n_query"] == result["n_images"] - 50
    for method in ("prototype", "nn1", "logistic"):
        assert len(entry[method]["values"]) == 2 and 0 <= entry[method]["mean"] <= 100
    saved = json.loads(path.with_name("last.kshot.json").read_text())
    assert saved["results"] == result["results"]
    again = kshot_command(path, shots=[1], replications=2, seed=0, split="all",
                          target_classes=["60-64"])
    assert again["target_classes"] == [60, 61, 62, 63, 64] and again["split"] == "all"
    assert again["images_per_class"]["min"] >= 4 + 5


def test_cli_kshot_errors_one_line_exit_2(make_checkpoint):
    path = make_checkpoint()
    for process, args, fragment in [
        (True, ["kshot", "--checkpoint", "missing.pt"], "checkpoint 'missing.pt' not found"),
        (False, ["kshot", "--checkpoint", str(path), "--target-classes", "x-y"],
         "--target-classes"),
    ]:
        proc = run_cli(*args, process=process)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert fragment in lines[0], proc.stderr

"""ooDML-style shift splits (`ssl-sec shift`): the Fréchet distance against scipy and exact
values, Recall@1 against a loop, the swap trajectory on synthetic classes whose hardest split
is known, and the command end to end."""

import json
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import run_cli

from ssl_sec.config import EvalConfig
from ssl_sec.evaluation import shift as shift_mod
from ssl_sec.evaluation.shift import (
    _ranked,
    class_means,
    evaluate_split,
    frechet_distance,
    pca,
    pick_splits,
    recall_at_1,
    shift_command,
    shift_trajectory,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- FID
def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root, float64."""
    diff = a.mean(0) - b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(s_a @ s_b)
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross).real)


@pytest.mark.parametrize("n_a, n_b, d", [(40, 30, 5), (200, 150, 16), (60, 60, 32)])
def test_frechet_distance_matches_scipy_sqrtm(n_a, n_b, d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n_a, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(n_b, d)) * rng.uniform(0.5, 2.0, size=d) + rng.normal(size=d)
    ours, ref = frechet_distance(a, b), _scipy_fid(a, b)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert frechet_distance(b, a) == pytest.approx(ours, rel=1e-9)  # symmetric


@pytest.mark.parametrize("n, d", [(50, 8), (10, 19)])  # the second: singular covariances
def test_frechet_distance_exact_values(n, d):
    a = np.random.default_rng(1).normal(size=(n, d))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.linspace(-1.0, 2.0, d)
    # Same covariance, means apart by `shift`: the distance is ||shift||^2 exactly.
    assert frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-9)
    # Scaled by s about its mean: trace terms give (1 - s)^2 Tr S.
    scaled = a.mean(0) + 3.0 * (a - a.mean(0))
    assert frechet_distance(a, scaled) == pytest.approx(
        4.0 * np.trace(np.cov(a, rowvar=False)), rel=1e-9)


def test_pca_keeps_the_geometry_of_the_class_means():
    means = np.random.default_rng(2).normal(size=(12, 40))
    full = pca(means, 32)  # capped at C - 1 = 11 components: every distance kept
    assert full.shape == (12, 11)
    dist = lambda x: np.linalg.norm(x[:, None] - x[None], axis=2)  # noqa: E731
    np.testing.assert_allclose(dist(full), dist(means), rtol=1e-9, atol=1e-9)
    assert pca(means, 3).shape == (12, 3)


def test_class_means_against_a_loop():
    feats = torch.randn(30, 4)
    labels = torch.arange(30) % 3
    means = class_means(feats, labels, [2, 0])
    assert means.shape == (2, 4) and means.dtype == np.float64
    np.testing.assert_allclose(means[0], feats[labels == 2].double().mean(0).numpy())
    np.testing.assert_allclose(means[1], feats[labels == 0].double().mean(0).numpy())


# ----------------------------------------------------------------------------- Recall@1
def test_recall_at_1_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(3)
    feats = torch.nn.functional.normalize(torch.randn(101, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (101,), generator=g)
    hits = 0
    for i in range(101):
        sims = [float(feats[i] @ feats[j]) if j != i else -np.inf for j in range(101)]
        hits += int(labels[int(np.argmax(sims))] == labels[i])
    expected = 100.0 * hits / 101
    assert recall_at_1(feats, labels) == pytest.approx(expected)
    assert recall_at_1(feats, labels, chunk=7) == pytest.approx(expected)  # chunk boundaries


def test_pick_splits_rise_in_fid():
    fids = [1.0, 1.5, 1.2, 3.0, 2.0, 5.0, 5.5, 4.0]
    picks = pick_splits(fids, 4)
    assert picks[0] == 0 and picks[-1] == 6  # the start and the maximum
    assert (np.diff([fids[i] for i in picks]) >= 0).all()
    assert picks == sorted(set(picks)) and len(picks) <= 4
    assert pick_splits(list(np.linspace(0, 1, 20)), 8) == [0, 3, 6, 9, 11, 14, 17, 19]


# ----------------------------------------------------------------------------- synthetic
def _two_groups(sigma: float, per: int, seed: int, dim: int = 24):
    """20 classes in two groups of 10: group A (classes 0-9) at +e0, group B at -e0, class j
    of a group offset by e_{1 + j mod 10}. Classes of one group are equally close to each
    other (distance sqrt 2) and far from the other group's (distance >= 2). Samples: mean +
    sigma * N(0, I), L2-normalised. Returns ((train feats, labels), (test feats, labels))."""
    g = np.random.default_rng(seed)
    means = np.zeros((20, dim))
    means[:10, 0], means[10:, 0] = 1.0, -1.0
    means[np.arange(20), 1 + np.arange(20) % 10] = 1.0

    def sample():
        x = means.repeat(per, 0) + sigma * g.normal(size=(20 * per, dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return torch.tensor(x, dtype=torch.float32), torch.arange(20).repeat_interleave(per)

    return sample(), sample()


def test_swap_rule_direction_raises_fid_and_its_reverse_lowers_it():
    (feats, labels), _ = _two_groups(0.4, 50, seed=0)
    means = pca(class_means(feats, labels, list(range(20))), 32)
    for step in shift_trajectory(means, seed=0)[:-1]:  # every split before the maximum
        test = np.zeros(20, dtype=bool)
        test[list(step.test)] = True
        d_train = np.linalg.norm(means - means[~test].mean(0), axis=1)
        d_test = np.linalg.norm(means - means[test].mean(0), axis=1)
        for sign in (1, -1):  # the rule's first choice, and the reversed rule's
            trial = test.copy()
            trial[_ranked(sign * (d_test - d_train), ~test)[0]] = True
            trial[_ranked(sign * (d_train - d_test), test)[0]] = False
            fid = frechet_distance(means[~trial], means[trial])
            assert (fid > step.fid) if sign == 1 else (fid < step.fid)


@pytest.mark.parametrize("split_seed", [0, 1, 2])
def test_trajectory_separates_the_groups_and_accuracy_drops(split_seed):
    """From a random split (test classes drawn from both groups, each test class with ~4
    equidistant rivals of its group) the trajectory must end with the test set = one whole
    group (the FID maximum: 4 L^2 (2p - 1)^2 along e0 peaks at p = 0 or 1), where every test
    class has 9 equidistant rivals: kNN top-1 and Recall@1 on the test classes must drop.
    Measured on 6 data seeds x 4 split seeds (sigma 0.4, 50 images per class): drops of
    6.2-12.8 points (kNN) and 8.0-18.8 (Recall@1); asserted with a 3-point margin."""
    (train_f, train_y), (test_f, test_y) = _two_groups(0.4, 50, seed=0)
    means = pca(class_means(train_f, train_y, list(range(20))), 32)
    trajectory = shift_trajectory(means, seed=split_seed)
    fids = [s.fid for s in trajectory]
    assert len(trajectory) >= 3 and (np.diff(fids) > 0).all()
    assert all(s.rank == 0 for s in trajectory[1:])  # the rule's first choice every time
    assert set(trajectory[-1].test) in ({*range(10)}, {*range(10, 20)})
    assert len(set(trajectory[0].test) & {*range(10)}) in range(2, 9)  # a mixed start
    picks = pick_splits(fids, 8)
    assert picks[0] == 0 and picks[-1] == len(trajectory) - 1
    eval_cfg = EvalConfig(knn_k=20)
    first, last = (evaluate_split(train_f, train_y, test_f, test_y,
                                  list(trajectory[i].test), eval_cfg)
                   for i in (picks[0], picks[-1]))
    assert first["n_queries"] == last["n_queries"] == 500
    assert first["knn_top1"] - last["knn_top1"] > 3.0, (first, last)
    assert first["recall_at_1"] - last["recall_at_1"] > 3.0, (first, last)


# ----------------------------------------------------------------------------- command
def test_cli_shift_writes_json_png_and_table(make_checkpoint, data_root, monkeypatch):
    path = make_checkpoint()
    proc = run_cli("shift", "--checkpoint", str(path), "--splits", "4", "eval.knn_k=20")
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(path.with_name("last.shift.json").read_text())
    for key in ("checkpoint", "dataset", "pca_dim", "seed", "splits", "trajectory_fid",
                "swap_rule"):
        assert key in saved, key
    assert saved["dataset"] == "cifar100" and saved["n_classes"] == 100
    assert saved["pca_dim"] == 32 and saved["seed"] == 0
    rows = saved["splits"]
    assert 2 <= len(rows) <= 4
    for row in rows:
        assert {"index", "fid", "n_train_classes", "n_test_classes", "test_classes",
                "knn_top1", "recall_at_1"} <= row.keys()
        assert row["n_train_classes"] == row["n_test_classes"] == 50
        assert len(set(row["test_classes"])) == 50 and 0 <= row["knn_top1"] <= 100
    fids = [r["fid"] for r in rows]
    assert (np.diff(fids) >= 0).all() and fids[-1] > fids[0]
    assert fids[-1] == max(saved["trajectory_fid"])
    png = path.with_name("last.shift.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "kNN top1" in proc.stdout and str(png) in proc.stdout

    # Without matplotlib: the JSON alone, and one line saying what the PNG needs.
    png.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    proc = run_cli("shift", "--checkpoint", str(path), "--splits", "4", "eval.knn_k=20")
    assert proc.returncode == 0 and not png.exists()
    assert proc.stderr.strip().splitlines() == [
        "note: the accuracy-vs-FID plot needs matplotlib: pip install ssl_sec[plots]; "
        "wrote the JSON only"]
    assert json.loads(path.with_name("last.shift.json").read_text())["splits"] == rows


def test_cli_shift_errors_one_line_exit_2(make_checkpoint, tmp_path):
    path = make_checkpoint()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    for process, args, fragment in [
        (True, ["--checkpoint", "missing.pt"], "checkpoint 'missing.pt' not found"),
        (False, ["--checkpoint", str(corrupt)], "corrupt.pt"),
        (False, ["--checkpoint", str(path), "eval.knn_kk=3"], "unknown key"),
        (False, ["--checkpoint", str(path), "--splits", "1"], "--splits 1: must be >= 2"),
        (False, ["--checkpoint", str(path), "--pca-dim", "0"], "--pca-dim 0: must be >= 1"),
    ]:
        proc = run_cli("shift", *args, process=process)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert fragment in lines[0], proc.stderr


def test_shift_command_checks_arguments_before_loading(tmp_path):
    with pytest.raises(shift_mod.UserError, match="--seed"):
        shift_command(tmp_path / "none.pt", seed=-1)

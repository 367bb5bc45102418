"""Tests of the weighted kNN classifier against a loop reference, analytic values and itself."""

import math

import numpy as np
import pytest
import torch
from helpers import f32_rtol

from ssl_sec.errors import ConfigError
from ssl_sec.evaluation import knn as knn_module
from ssl_sec.evaluation.knn import knn_accuracy, knn_classify

BACKENDS = ["torch", "faiss"]


def vote_rtol(dim: int, temperature: float) -> float:
    """Relative tolerance of kNN scores computed by two float32 kernels: a similarity of unit
    vectors in `dim` dimensions may differ by one rounding per term, and a vote
    exp((s - s_max) / T) then differs relatively by that / T. The scores are sums of positive
    votes, so the relative error of a vote bounds that of a score."""
    return f32_rtol(terms=dim, ulps=1.0) / temperature


def _features(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def _labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def _reference_loop(bank, bank_labels, queries, k, temperature, num_classes):
    """The protocol written out in float64, one query at a time.

    Returns the scores (Q, C) and, per query, the gap between the k-th and (k+1)-th largest
    similarity (inf when k >= N): a gap below float32 resolution means the neighbour set is
    an exact tie in float32 arithmetic, and either choice is correct.
    """
    bank = bank.double().numpy()
    queries = queries.double().numpy()
    bank_labels = bank_labels.numpy()
    k = min(k, len(bank))
    scores = np.zeros((len(queries), num_classes))
    gaps = np.full(len(queries), np.inf)
    for q, query in enumerate(queries):
        sims = [float(np.dot(query, b)) for b in bank]
        order = sorted(range(len(bank)), key=lambda i: -sims[i])
        if k < len(bank):
            gaps[q] = sims[order[k - 1]] - sims[order[k]]
        top = sims[order[0]]  # weights relative to the nearest neighbour's (no overflow)
        for i in order[:k]:
            scores[q, bank_labels[i]] += math.exp((sims[i] - top) / temperature)
    return scores, gaps


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_loop_reference(backend):
    bank, queries = _features(400, 32, seed=0), _features(60, 32, seed=1)
    bank_labels = _labels(400, 7, seed=2)
    k, temperature = 50, 0.1

    ours = knn_classify(bank, bank_labels, queries, k=k, temperature=temperature, backend=backend)
    ref, gaps = _reference_loop(bank, bank_labels, queries, k, temperature, num_classes=7)

    assert ours.dtype == torch.float32 and ours.shape == (60, 7)
    comparable = gaps > 1e-5  # queries whose neighbour set is not a float32 tie
    assert comparable.sum() >= 55
    ours = ours.double().numpy()
    err = np.abs(ours - ref).max(axis=1) / ref.max(axis=1)
    assert err[comparable].max() < 1e-4

    top2 = np.sort(ref, axis=1)[:, -2:]
    distinct = comparable & ((top2[:, 1] - top2[:, 0]) > 1e-4 * top2[:, 1])
    assert distinct.sum() >= 55
    np.testing.assert_array_equal(ours.argmax(1)[distinct], ref.argmax(1)[distinct])


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_temperature_does_not_overflow(backend):
    # exp(1 / 0.01) overflows float32: unshifted votes would all be inf and tie.
    bank, queries = _features(400, 32, seed=30), _features(60, 32, seed=31)
    bank_labels = _labels(400, 7, seed=32)
    ours = knn_classify(bank, bank_labels, queries, k=50, temperature=0.01, backend=backend)
    ref, gaps = _reference_loop(bank, bank_labels, queries, 50, 0.01, num_classes=7)
    assert torch.isfinite(ours).all()
    top2 = np.sort(ref, axis=1)[:, -2:]
    distinct = (gaps > 1e-5) & ((top2[:, 1] - top2[:, 0]) > 1e-4 * top2[:, 1])
    assert distinct.sum() >= 50
    np.testing.assert_array_equal(ours.numpy().argmax(1)[distinct], ref.argmax(1)[distinct])


def test_hand_computed_two_class_example():
    # Unit vectors in 2-D with exactly known cosines to the query (1, 0): 1, 0, -1, 0.6.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    bank_labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    # k=3 keeps sims 1 (class 0), 0.6 (class 0), 0 (class 1); T=0.5 gives weights e^2, e^1.2,
    # e^0, divided by the nearest neighbour's e^2.
    expected = torch.tensor([[1.0 + math.exp(-0.8), math.exp(-2.0)]])
    for backend in BACKENDS:
        scores = knn_classify(bank, bank_labels, query, k=3, temperature=0.5, backend=backend)
        torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)


def test_faiss_and_torch_agree():
    bank, queries = _features(2000, 64, seed=3), _features(300, 64, seed=4)
    bank_labels = _labels(2000, 10, seed=5)
    s_torch = knn_classify(bank, bank_labels, queries, k=100, backend="torch")
    s_faiss = knn_classify(bank, bank_labels, queries, k=100, backend="faiss")
    # Sums of positive votes exp((s - s_max) / T), so relative; faiss and torch compute each
    # 64-term dot product with their own kernels, and an error of one rounding per term in a
    # similarity becomes that error / T in a vote (measured: 3% of this on AVX2, scalar and SSE4.1 kernels).
    torch.testing.assert_close(s_faiss, s_torch, rtol=vote_rtol(64, 0.1), atol=0)
    assert torch.equal(s_faiss.argmax(1), s_torch.argmax(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_does_not_change_results(backend):
    bank, queries = _features(300, 16, seed=6), _features(97, 16, seed=7)
    bank_labels = _labels(300, 5, seed=8)
    # 0.01 MiB holds about 6 query rows for torch and 20 for faiss: many uneven chunks.
    small = knn_classify(bank, bank_labels, queries, k=20, backend=backend, memory_mb=0.01)
    large = knn_classify(bank, bank_labels, queries, k=20, backend=backend, memory_mb=1024)
    # Not bitwise: BLAS picks its blocking from the matrix shape, so a row's dot products can
    # round differently (1 ulp, ~1e-7) in a 6-row and a 97-row product.
    torch.testing.assert_close(small, large, rtol=vote_rtol(16, 0.1), atol=0)
    assert torch.equal(small.argmax(1), large.argmax(1))


def test_chunk_sizes_follow_the_budget(monkeypatch):
    seen = []
    real = knn_module._knn_torch

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(knn_module, "_knn_torch", spy)
    bank, bank_labels = _features(1000, 8, seed=9), _labels(1000, 4, seed=10)
    knn_classify(bank, bank_labels, _features(50, 8, seed=11), k=10, backend="torch", memory_mb=0.1)
    per_query = 4 * 1000 + 2 * 10 * 12 + 4 * 4  # similarity row + top-k and vote buffers + scores
    assert seen == [int(0.9 * 0.1 * 2**20) // per_query]  # 10% headroom


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_below_one_row_warns_and_still_works(backend):
    bank, queries = _features(50, 8, seed=12), _features(5, 8, seed=13)
    bank_labels = _labels(50, 3, seed=14)
    with pytest.warns(UserWarning, match="one query at a time"):
        tiny = knn_classify(bank, bank_labels, queries, k=5, backend=backend, memory_mb=1e-6)
    # One query at a time against all at once: another BLAS blocking, as above.
    torch.testing.assert_close(tiny, knn_classify(bank, bank_labels, queries, k=5, backend=backend),
                               rtol=vote_rtol(8, 0.1), atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_test_set(backend):
    bank, queries = _features(500, 16, seed=15), _features(7, 16, seed=16)
    bank_labels = _labels(500, 10, seed=17)
    scores = knn_classify(bank, bank_labels, queries, backend=backend)
    ref, _ = _reference_loop(bank, bank_labels, queries, 200, 0.1, num_classes=10)
    assert scores.shape == (7, 10)
    np.testing.assert_allclose(scores.double().numpy(), ref, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_bank_is_clamped(backend):
    bank, queries = _features(30, 8, seed=18), _features(9, 8, seed=19)
    bank_labels = _labels(30, 3, seed=20)
    scores = knn_classify(bank, bank_labels, queries, k=200, temperature=0.2, backend=backend)
    # With every bank vector a neighbour, score_c is the sum of exp((s - s_max) / T) over c.
    sims = queries.double() @ bank.double().T
    weights = torch.exp((sims - sims.max(dim=1, keepdim=True).values) / 0.2)
    expected = weights @ torch.nn.functional.one_hot(bank_labels, 3).double()
    torch.testing.assert_close(scores.double(), expected, rtol=vote_rtol(8, 0.2), atol=0)


def test_num_classes_default_and_explicit():
    bank, queries = _features(40, 8, seed=21), _features(4, 8, seed=22)
    bank_labels = torch.tensor([0, 2] * 20)
    assert knn_classify(bank, bank_labels, queries, k=5).shape == (4, 3)
    scores = knn_classify(bank, bank_labels, queries, k=5, num_classes=6)
    assert scores.shape == (4, 6) and torch.all(scores[:, [1, 3, 4, 5]] == 0)


def test_auto_falls_back_to_torch_without_faiss(monkeypatch):
    bank, queries = _features(40, 8, seed=23), _features(4, 8, seed=24)
    bank_labels = _labels(40, 3, seed=25)
    expected = knn_classify(bank, bank_labels, queries, k=5, backend="torch")
    monkeypatch.setattr(knn_module, "_import_faiss", lambda: None)
    torch.testing.assert_close(knn_classify(bank, bank_labels, queries, k=5), expected)
    with pytest.raises(ConfigError, match="faiss is not installed"):
        knn_classify(bank, bank_labels, queries, k=5, backend="faiss")


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_cpu():
    bank, queries = _features(1000, 32, seed=26), _features(50, 32, seed=27)
    bank_labels = _labels(1000, 10, seed=28)
    cpu = knn_classify(bank, bank_labels, queries, k=50, backend="torch")
    gpu = knn_classify(bank.cuda(), bank_labels.cuda(), queries.cuda(), k=50)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=vote_rtol(32, 0.1), atol=0)


_BANK = _features(10, 4, seed=29)
_QUERIES = _features(3, 4, seed=30)
_LABELS = torch.arange(10) % 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 2.5}, "k must be"),
        ({"k": True}, "k must be"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"backend": "cuda"}, "backend"),
        ({"memory_mb": 0}, "memory_mb"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 1}, "num_classes=1"),
        ({"train_feats": _BANK[0]}, "train_feats must be a 2-D"),
        ({"test_feats": _QUERIES[:, :3]}, "feature dims differ"),
        ({"test_feats": torch.ones(3, 4, dtype=torch.int64)}, "floating point"),
        ({"train_feats": _BANK[:0], "train_labels": _LABELS[:0]}, "empty"),
        ({"train_labels": _LABELS[None]}, "1-D"),
        ({"train_labels": _LABELS.float()}, "integer"),
        ({"train_labels": _LABELS[:9]}, "9 train_labels for 10"),
        ({"train_labels": _LABELS - 1}, ">= 0"),
    ],
)
def test_bad_inputs_raise_config_error(kwargs, match):
    args = {"train_feats": _BANK, "train_labels": _LABELS, "test_feats": _QUERIES} | kwargs
    with pytest.raises(ConfigError, match=match):
        knn_classify(**args)


def test_knn_accuracy():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
            [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0],  # label 5: 5th place, top-5 hit
            [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0],  # label 6: miss
            [0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0],  # label 3: top-1 hit
        ]
    )
    acc = knn_accuracy(scores, torch.tensor([0, 5, 6, 3]))
    assert acc == pytest.approx({"top1": 50.0, "top5": 75.0})


def test_knn_accuracy_with_fewer_than_five_classes():
    scores = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    acc = knn_accuracy(scores, torch.tensor([1, 1, 0]))
    assert acc == pytest.approx({"top1": 100.0 / 3, "top5": 100.0})


def test_knn_accuracy_bad_inputs():
    with pytest.raises(ConfigError, match="2-D"):
        knn_accuracy(torch.zeros(3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ConfigError, match="labels must have shape"):
        knn_accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ConfigError, match="integer"):
        knn_accuracy(torch.zeros(3, 2), torch.zeros(3))

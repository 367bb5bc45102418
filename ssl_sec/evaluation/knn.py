"""Weighted k-nearest-neighbour classifier (InstDisc weighting, docs/methods.md section 5).

For each query ``q`` the bank neighbours are ranked by cosine similarity, the top ``k``
neighbours ``(s_i, y_i)`` vote with weight ``w_i = exp(s_i / T)`` and the class score is
``score_c = sum_i w_i [y_i == c]``. Defaults k=200, T=0.1 follow the MoCo CIFAR demo,
lightly and VISSL.

Cosine similarity is computed as a plain inner product: the features are assumed to be
L2-normalised already (normalise once, where the bank and the queries are extracted, not
on every call). Nothing here re-normalises them, so un-normalised input gives
inner-product kNN, not cosine kNN.

Two exact backends produce the same ``(similarities, indices)`` of the top-k neighbours and
share one voting helper, ``vote_scores``:

- ``"torch"``: matmul + topk over chunks of queries, on the CPU or on CUDA;
- ``"faiss"``: ``faiss.IndexFlatIP`` (exact inner product), on the CPU, or on the GPU when a
  GPU build of faiss is installed and the tensors live on CUDA.

Queries are processed in chunks whose size is derived from a memory budget (``memory_mb``),
never from a fixed number of chunks: a fixed count (DINO uses 100) breaks on small test sets
and blows the budget on large banks.
"""

from __future__ import annotations

import numbers
import sys
import warnings

import numpy as np
import torch

from ssl_sec.config import EvalConfig
from ssl_sec.errors import ConfigError

BACKENDS = ("auto", "torch", "faiss")

# faiss GPU indexes reject k above this (GPU k-selection limit); larger k uses the CPU index.
_FAISS_GPU_MAX_K = 2048

# Chunks are planned to fill this fraction of memory_mb; the rest covers what the byte count
# does not model: allocator rounding, BLAS and topk workspaces, and first-call costs such as
# thread stacks and library pages (15-20 MiB measured on CPU with torch 2.14).
_BUDGET_FRACTION = 0.9

_F32 = 4  # bytes in a float32
_I64 = 8  # bytes in an int64


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    backend: str = "auto",
    memory_mb: float = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores of ``test_feats`` against the bank ``train_feats``.

    Args:
        train_feats: bank features, shape ``(N, D)``, floating point, L2-normalised rows.
        train_labels: bank labels, shape ``(N,)``, integer dtype, values in ``[0, C)``.
        test_feats: query features, shape ``(Q, D)``, same device as the bank,
            L2-normalised rows.
        k: number of neighbours (>= 1); clamped to ``N`` when the bank is smaller.
        temperature: ``T`` in ``exp(s / T)`` (> 0). Each query's weights are computed as
            ``exp((s - s_max) / T)`` (the same ranking), so small ``T`` does not overflow.
        num_classes: ``C``; defaults to ``max(train_labels) + 1`` (a host sync on CUDA:
            pass it explicitly in a training-loop monitor).
        backend: ``"torch"``, ``"faiss"`` or ``"auto"`` (faiss for CPU tensors when faiss
            imports; torch on CUDA, where a torch matmul on the GPU is the fastest path, or
            when faiss is missing).
        memory_mb: working-memory budget in MiB for one chunk of queries: its similarity
            matrix (torch backend) plus the top-k and vote buffers are planned to fill 90% of
            it, leaving headroom for workspaces and first-call costs (a fixed 15-20 MiB on CPU,
            so budgets below ~150 MiB are not strict). At least one query is processed per
            chunk, even if a single row exceeds the budget (a warning says so).
            Not counted: the inputs, the float32 copy of non-float32 input, the (Q, C)
            output, and for faiss the index's own copy of the bank (``N * D * 4`` bytes) and
            its fixed internal block buffers (about 20 MiB at k=200).

    Returns:
        Class scores, shape ``(Q, C)``, float32, on the device of ``test_feats``.
        ``scores.argmax(1)`` is the top-1 prediction; see :func:`topk_accuracy`.

    Raises:
        ConfigError: on an invalid argument, a shape or dtype mismatch, a label out of range,
            or ``backend="faiss"`` without faiss installed.
    """
    _check_inputs(train_feats, train_labels, test_feats, k, temperature, backend, memory_mb)
    n_bank = train_feats.shape[0]
    train_labels = train_labels.to(device=train_feats.device, dtype=torch.int64)
    num_classes = _resolve_num_classes(train_labels, num_classes)
    k = min(int(k), n_bank)

    if backend == "auto":
        backend = "torch" if train_feats.is_cuda or _import_faiss() is None else "faiss"

    # Similarities are computed in float32 whatever the input dtype: bf16/fp16 similarities
    # (3 significant digits) reorder neighbours near the k-th boundary.
    train_feats = train_feats.float()
    test_feats = test_feats.float()
    if backend == "torch":
        bytes_per_query = _F32 * n_bank + _topk_vote_bytes(k, num_classes)
        chunk = _chunk_size(bytes_per_query, memory_mb)
        return _knn_torch(train_feats, train_labels, test_feats, k, temperature, num_classes, chunk)

    # faiss's exhaustive search never holds a query's full similarity row: it works through
    # fixed 4096-query x 1024-vector blocks (16 MiB of similarities plus top-k heaps or
    # reservoirs for at most 4096 queries), so only the top-k and vote buffers grow with the
    # chunk; that fixed working set is not counted against the budget.
    chunk = _chunk_size(_topk_vote_bytes(k, num_classes), memory_mb)
    return _knn_faiss(train_feats, train_labels, test_feats, k, temperature, num_classes, chunk)


def vote_scores(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float, num_classes: int
) -> torch.Tensor:
    """InstDisc vote: ``score[q, c] = sum_i exp((sims[q, i] - m_q) / T) [neighbour_labels[q, i]
    == c]`` with ``m_q`` the query's largest similarity: ``exp(s / T)``'s votes times one
    factor per query, so the same ranking, without overflow at small ``T``.

    Shared by both backends so that they differ only in how they find the neighbours.

    Args:
        sims: top-k similarities, shape ``(q, k)``.
        neighbour_labels: labels of those neighbours, shape ``(q, k)``, int64.
        temperature: ``T`` > 0.
        num_classes: ``C``.

    Returns:
        Scores, shape ``(q, C)``, float32.
    """
    # exp((s - s_max) / T): each query's weights scaled by one factor, so its class ranking
    # is exp(s / T)'s, without exp(1 / T) overflowing float32 for T below ~0.0113.
    sims = sims.float()
    weights = torch.exp((sims - sims.max(dim=1, keepdim=True).values) / temperature)
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32, device=sims.device)
    # scatter_add instead of lightly's one-hot (q*k, C) product: same sums, no q*k*C buffer.
    # (On CUDA it adds with atomics, so the last bit can vary between runs.)
    return scores.scatter_add_(1, neighbour_labels, weights)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent from class scores: the kNN vote's, the linear
    probe's logits, any classifier's.

    Args:
        scores: shape ``(Q, C)``, e.g. from :func:`knn_classify` or a linear head.
        labels: true labels, shape ``(Q,)``, integer dtype.

    Returns:
        ``{"top1": ..., "top5": ...}`` in percent. With fewer than 5 classes, top-5 uses
        ``min(5, C)`` classes, so it is 100.
    """
    if scores.ndim != 2:
        raise ConfigError(
            f"topk_accuracy: scores must be 2-D (Q, C), got shape {tuple(scores.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise ConfigError(
            f"topk_accuracy: labels must have shape ({scores.shape[0]},), got {tuple(labels.shape)}"
        )
    if not _is_int_tensor(labels):
        raise ConfigError(f"topk_accuracy: labels must be an integer tensor, got {labels.dtype}")
    if scores.shape[0] == 0:
        raise ConfigError("topk_accuracy: no queries (Q = 0)")
    labels = labels.to(scores.device)
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {
        "top1": hits[:, 0].float().mean().item() * 100.0,
        "top5": hits.any(dim=1).float().mean().item() * 100.0,
    }


# The name before it also scored the linear probe (ssl_sec 0.2); kept for callers.
knn_accuracy = topk_accuracy


# --- backends --------------------------------------------------------------------------------


def _knn_torch(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int,
) -> torch.Tensor:
    """Exact kNN by matmul + topk, ``chunk`` queries at a time. Shapes as in knn_classify."""
    out = torch.empty(queries.shape[0], num_classes, dtype=torch.float32, device=queries.device)
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.T  # (q, N): the chunk's budgeted buffer
        top_sims, top_idx = sim.topk(k, dim=1)
        del sim  # release the (q, N) buffer before the vote buffers are allocated
        out[start : start + chunk] = vote_scores(
            top_sims, bank_labels[top_idx], temperature, num_classes
        )
        # Loop variables outlive the iteration: without this, the next chunk's (q, N) buffer
        # would be allocated while this chunk's top-k buffers are still alive.
        del top_sims, top_idx
    return out


def _knn_faiss(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int,
) -> torch.Tensor:
    """Exact kNN with ``faiss.IndexFlatIP``, ``chunk`` queries per search call.

    Shapes as in knn_classify. The vote runs on the device of the inputs.
    """
    faiss = _import_faiss()
    if faiss is None:
        raise ConfigError(
            "backend='faiss' but faiss is not installed: pip install faiss-cpu "
            "(or faiss-gpu-cu12), or use backend='torch'"
        )
    device = queries.device
    dim = bank.shape[1]
    use_gpu = bank.is_cuda and k <= _FAISS_GPU_MAX_K and _faiss_num_gpus(faiss) > 0
    if use_gpu:
        # The plain faiss Python API takes numpy arrays; the GPU index copies the bank to the
        # GPU on add(). (faiss.contrib.torch_utils would avoid the host round trip, but it
        # monkey-patches every faiss index class process-wide.)
        res = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = (
            bank.device.index if bank.device.index is not None else torch.cuda.current_device()
        )
        index = faiss.GpuIndexFlatIP(res, dim, config)
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(_as_faiss_array(bank))

    out = torch.empty(queries.shape[0], num_classes, dtype=torch.float32, device=device)
    for start in range(0, queries.shape[0], chunk):
        sims, idx = index.search(_as_faiss_array(queries[start : start + chunk]), k)
        # Exact search over N >= k vectors always fills all k slots, so no -1 indices.
        sims_t = torch.from_numpy(sims).to(device)
        idx_t = torch.from_numpy(idx).to(device)
        out[start : start + chunk] = vote_scores(
            sims_t, bank_labels[idx_t], temperature, num_classes
        )
        del sims, idx, sims_t, idx_t  # free before the next search allocates its own
    return out


# --- helpers ---------------------------------------------------------------------------------


def _topk_vote_bytes(k: int, num_classes: int) -> int:
    """Bytes per query of the top-k buffers (values + int64 indices), the vote buffers
    (weights + int64 neighbour labels) and the query's score row."""
    return 2 * k * (_F32 + _I64) + num_classes * _F32


def _chunk_size(bytes_per_query: int, memory_mb: float) -> int:
    """Number of queries whose working buffers fit in ``memory_mb`` MiB (at least 1)."""
    chunk = int(_BUDGET_FRACTION * memory_mb * 2**20) // bytes_per_query
    if chunk < 1:
        warnings.warn(
            f"knn_classify: one query needs {bytes_per_query / 2**20:.1f} MiB, more than "
            f"memory_mb={memory_mb}; processing one query at a time",
            stacklevel=3,
        )
        return 1
    return chunk


def _as_faiss_array(x: torch.Tensor) -> np.ndarray:
    """C-contiguous float32 numpy view (a copy only when the tensor is on CUDA or strided)."""
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


def _import_faiss():
    """The faiss module, or None when it is not installed (imported lazily on purpose)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_num_gpus(faiss) -> int:
    # faiss-cpu builds have no get_num_gpus on some versions.
    get = getattr(faiss, "get_num_gpus", None)
    return get() if get is not None else 0


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int_tensor(x: torch.Tensor) -> bool:
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _resolve_num_classes(labels: torch.Tensor, num_classes: int | None) -> int:
    lo, hi = labels.min().item(), labels.max().item()
    if lo < 0:
        raise ConfigError(f"knn_classify: train_labels must be >= 0, found {lo}")
    if num_classes is None:
        return int(hi) + 1
    if not _is_int(num_classes) or num_classes < 1:
        raise ConfigError(f"knn_classify: num_classes must be a positive int, got {num_classes!r}")
    num_classes = int(num_classes)
    if hi >= num_classes:
        raise ConfigError(
            f"knn_classify: train_labels contain class {hi} but num_classes={num_classes}"
        )
    return num_classes


def _check_inputs(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    temperature: float,
    backend: str,
    memory_mb: float,
) -> None:
    if not _is_int(k) or k < 1:
        raise ConfigError(f"knn_classify: k must be an int >= 1, got {k!r}")
    if not _is_real(temperature) or not temperature > 0:
        raise ConfigError(f"knn_classify: temperature must be > 0, got {temperature!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"knn_classify: backend must be one of {BACKENDS}, got {backend!r}")
    if not _is_real(memory_mb) or not memory_mb > 0:
        raise ConfigError(f"knn_classify: memory_mb must be > 0, got {memory_mb!r}")
    for name, x in (("train_feats", train_feats), ("test_feats", test_feats)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ConfigError(
                f"knn_classify: {name} must be a 2-D tensor (n, D), got {_describe(x)}"
            )
        if not x.is_floating_point():
            raise ConfigError(f"knn_classify: {name} must be floating point, got {x.dtype}")
    if train_feats.shape[0] == 0:
        raise ConfigError("knn_classify: the bank train_feats is empty (N = 0)")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ConfigError(
            f"knn_classify: feature dims differ: train_feats D={train_feats.shape[1]}, "
            f"test_feats D={test_feats.shape[1]}"
        )
    if train_feats.device != test_feats.device:
        raise ConfigError(
            f"knn_classify: train_feats on {train_feats.device} but test_feats on {test_feats.device}"
        )
    if not isinstance(train_labels, torch.Tensor) or train_labels.ndim != 1:
        raise ConfigError(
            f"knn_classify: train_labels must be a 1-D tensor (N,), got {_describe(train_labels)}"
        )
    if not _is_int_tensor(train_labels):
        raise ConfigError(
            f"knn_classify: train_labels must be an integer tensor, got {train_labels.dtype}"
        )
    if train_labels.shape[0] != train_feats.shape[0]:
        raise ConfigError(
            f"knn_classify: {train_labels.shape[0]} train_labels for {train_feats.shape[0]} bank features"
        )


def knn_evaluate(train_feats: torch.Tensor, train_labels: torch.Tensor,
                 test_feats: torch.Tensor, test_labels: torch.Tensor,
                 eval_cfg: EvalConfig) -> dict[str, float]:
    """Top-1/top-5 of weighted kNN with the recipe's `eval.*` settings (k, T, backend,
    memory budget): the one routine behind the training monitor and `ssl-sec knn`. Also
    returns the `k` really used: eval.knn_k, or the bank size when the bank is smaller
    (said on stderr, as the result would otherwise claim a k it did not use).

    Shapes: train_feats (N, D), train_labels (N,), test_feats (Q, D), test_labels (Q,).
    """
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(eval_cfg.knn_k, len(train_labels))
    if k < eval_cfg.knn_k:
        print(f"note: eval.knn_k={eval_cfg.knn_k} is larger than the {len(train_labels)}-image "
              f"kNN bank; using k={k}", file=sys.stderr)
    scores = knn_classify(train_feats, train_labels, test_feats, k=k,
                          temperature=eval_cfg.knn_temperature, num_classes=num_classes,
                          backend=eval_cfg.knn_backend, memory_mb=eval_cfg.knn_memory_mb)
    return {**topk_accuracy(scores, test_labels), "k": k}

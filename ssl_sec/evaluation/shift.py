"""Class splits of increasing distribution shift, ooDML style (Milbich et al., "Characterizing
Generalization under Out-Of-Distribution Shifts in Deep Metric Learning", NeurIPS 2021):
`ssl-sec shift --checkpoint PATH`.

The classes of a dataset (CIFAR-100 by default) are split into a train set and a test set of
classes, and the split is made progressively harder; each split's difficulty is measured by
the FID between the two sets of class means, and the checkpoint's frozen features are scored
on each split's test classes. With a frozen backbone nothing is fitted on the train classes:
what changes along the trajectory is which classes form the test set, ever more distant from
the train classes and, the sets being of fixed size, ever more alike among themselves.

1. Features: the backbone (eval mode, plain eval view, L2-normalised) on the train and test
   images; class means (:func:`class_means`) from the train images.
2. :func:`pca` of the class means to ``--pca-dim`` dimensions (at most ``C - 1``), fitted on
   all class means, so that the covariances of ~C/2 points are not hopelessly rank-deficient.
3. :func:`shift_trajectory`: from a seeded random 50/50 split of the classes, each step swaps
   the train class that lies most on the test side, ``argmin_c ||m_c - mu_test|| - ||m_c -
   mu_train||`` over train classes ``c``, with the test class that lies most on the train
   side, ``argmin_c ||m_c - mu_train|| - ||m_c - mu_test||`` over test classes (``mu_*``: the
   mean of that set's class means, in PCA space; the relative form of ooDML's reference code).
   **Swap direction:** each set receives the class of the other set that resembles it most,
   so both sets become more homogeneous and their means move apart: the FID
   (:func:`frechet_distance`) *rises*. The opposite rule, handing each set the class least
   like it, mixes the sets and lowers the FID (ooDML's ``inverse=True``, for easier splits).
   A swap is kept only when it raises the FID: when the rule's first choice does not (rare
   before the maximum), the next candidates are tried; the trajectory ends when none of the
   first few does. So the recorded FIDs rise strictly, step by step.
4. :func:`pick_splits`: about ``--splits`` splits of increasing FID, at evenly spaced FID
   targets from the first split's to the maximum reached (first trajectory step at or above
   each target, up to the maximum; duplicates dropped), so the picked FIDs never decrease.
   On each: weighted kNN top-1 (:func:`ssl_sec.evaluation.knn.knn_evaluate`, the checkpoint's
   ``eval.knn_k`` / ``eval.knn_temperature``; bank = train images of the test classes, queries
   = test images of the test classes) and :func:`recall_at_1` (test images of the test
   classes, leave-one-out nearest neighbour).
5. `<stem>.shift.json` and `<stem>.shift.png` (accuracy against FID; needs matplotlib,
   ``pip install ssl_sec[plots]``; without it only the JSON is written) beside the checkpoint.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import MAX_SEED
from ..errors import UserError
from .knn import knn_evaluate
from .session import EvalSession

DEFAULT_DATASET = "cifar100"
SWAP_RULE = ("each step swaps the train class minimising ||m - mu_test|| - ||m - mu_train|| "
             "with the test class minimising ||m - mu_train|| - ||m - mu_test|| (class means m "
             "in PCA space; each set receives the other set's class most like itself, so the "
             "sets separate and the FID rises); a swap is kept only if it raises the FID (else "
             "the next-ranked pairs, of the first 5 per side, are tried), and the trajectory "
             "ends where none does")


# ----------------------------------------------------------------------------- pure math
def class_means(feats: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                classes: np.ndarray | list[int]) -> np.ndarray:
    """Mean feature of each class, in float64.

    Shapes: feats (N, D), labels (N,), classes (C,) -> (C, D); row i is the mean of the rows
    of ``feats`` whose label is ``classes[i]`` (every class must have at least one).
    """
    f = _np64(feats)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    out = np.empty((len(classes), f.shape[1]))
    for i, c in enumerate(classes):
        rows = f[y == c]
        if len(rows) == 0:
            raise UserError(f"class {c} has no image to take a mean of")
        out[i] = rows.mean(axis=0)
    return out


def pca(x: np.ndarray, dim: int) -> np.ndarray:
    """Project the rows of ``x`` on their first ``k = min(dim, n - 1, D)`` principal
    components (centred, float64, via SVD).

    Shapes: x (n, D) -> (n, k).
    """
    x = np.asarray(x, dtype=np.float64)
    k = max(1, min(int(dim), x.shape[0] - 1, x.shape[1]))
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:k].T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` and of ``b``:
    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` (unbiased covariances).

    Computed in float64 through the symmetric form ``Tr (S_a S_b)^{1/2} = Tr (S_a^{1/2} S_b
    S_a^{1/2})^{1/2}``, both roots by eigendecompositions of symmetric PSD matrices with the
    round-off eigenvalues (negative, or below ``d * eps`` times the largest) set to 0: a null
    direction would otherwise add the square root of round-off, ~1e-8 each. This is stable
    for singular covariances (fewer points than dimensions, as for ~C/2 class means in the
    PCA space), where a general ``sqrtm(S_a S_b)`` is not.

    Shapes: a (n_a, d), b (n_b, d), n_a, n_b >= 2 -> float >= 0.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: need (n_a, d) and (n_b, d) with n >= 2, got "
                         f"{a.shape} and {b.shape}")
    diff = a.mean(axis=0) - b.mean(axis=0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(_null_small(w))) @ v.T
    middle = root_a @ s_b @ root_a
    cross = np.sqrt(_null_small(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    return float(max(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * cross, 0.0))


@dataclass(frozen=True)
class ShiftStep:
    """One split on the trajectory: ``test`` holds the row indices (into the class-mean
    matrix) of the test classes, sorted; the rest are train classes. ``moved``: the
    (train -> test, test -> train) pair swapped to reach it and ``rank``: that pair's place
    among the candidates (0: the rule's first choice), both None for the random start."""

    test: tuple[int, ...]
    fid: float
    moved: tuple[int, int] | None = None
    rank: int | None = None


def shift_trajectory(means: np.ndarray, seed: int = 0, max_steps: int | None = None,
                     candidates: int = 5) -> list[ShiftStep]:
    """The ooDML swap trajectory (module docstring, step 3) from a seeded random 50/50 split.

    Each step ranks the train classes by ``||m - mu_test|| - ||m - mu_train||`` and the test
    classes by ``||m - mu_train|| - ||m - mu_test||`` (ascending: most on the other set's side
    first) and tries the pairs of the first ``candidates`` of each, in order of their summed
    rank, taking the first swap that raises the FID; the rule's first choice nearly always
    does. The trajectory ends at a split no such swap improves (or after ``max_steps``), so
    its FIDs rise strictly: there is no back-and-forth swap to forbid (ooDML keeps a tabu list
    of recently moved classes instead, and runs a fixed number of swaps, FID rising or not).

    Shapes: means (C, d), C >= 4 (class means, e.g. after :func:`pca`) -> at most
    ``max_steps + 1`` ShiftSteps (default ``max_steps = C``), the random start first. The test
    set holds ``C // 2`` classes throughout.
    """
    m = np.asarray(means, dtype=np.float64)
    n = m.shape[0]
    if n < 4:
        raise UserError(f"a shift trajectory needs at least 4 classes, got {n}")
    steps = n if max_steps is None else int(max_steps)
    in_test = np.zeros(n, dtype=bool)
    in_test[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    fid = frechet_distance(m[~in_test], m[in_test])
    out = [ShiftStep(tuple(np.flatnonzero(in_test).tolist()), fid)]
    for _ in range(steps):
        d_train = np.linalg.norm(m - m[~in_test].mean(axis=0), axis=1)
        d_test = np.linalg.norm(m - m[in_test].mean(axis=0), axis=1)
        # Train classes most on the test side first; test classes most on the train side.
        train_order = _ranked(d_test - d_train, ~in_test)[:candidates]
        test_order = _ranked(d_train - d_test, in_test)[:candidates]
        pairs = sorted((i + j, i, j) for i in range(len(train_order))
                       for j in range(len(test_order)))
        for rank, (_, i, j) in enumerate(pairs):
            to_test, to_train = train_order[i], test_order[j]
            trial = in_test.copy()
            trial[to_test], trial[to_train] = True, False
            new_fid = frechet_distance(m[~trial], m[trial])
            if new_fid > fid:
                in_test, fid = trial, new_fid
                out.append(ShiftStep(tuple(np.flatnonzero(in_test).tolist()), fid,
                                     (to_test, to_train), rank))
                break
        else:  # no candidate swap raises the FID: a (local) maximum
            break
    return out


def pick_splits(fids: list[float] | np.ndarray, n: int) -> list[int]:
    """About ``n`` trajectory indices of increasing FID: for ``n`` targets evenly spaced from
    ``fids[0]`` to ``max(fids)``, the first index (up to the first maximum) whose FID reaches
    the target; duplicates dropped. The first pick is 0, the last the maximum.

    Shapes: fids (S,) -> sorted list of at most ``n`` indices into it, whose FIDs are
    non-decreasing (an index picked for a larger target is never earlier, and every index
    before it is below that target).
    """
    f = np.asarray(fids, dtype=np.float64)
    top = int(np.argmax(f))
    head = f[: top + 1]
    picks: list[int] = []
    for target in np.linspace(f[0], f[top], max(int(n), 1)):
        i = top if target >= f[top] else int(np.flatnonzero(head >= target)[0])
        if not picks or i != picks[-1]:
            picks.append(i)
    return picks


def recall_at_1(feats: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> float:
    """Recall@1 in percent: the share of rows whose most similar *other* row (inner product,
    i.e. cosine for L2-normalised rows; leave-one-out) has the same label.

    Shapes: feats (N, D), N >= 2, labels (N,) -> float in [0, 100].
    """
    if feats.ndim != 2 or labels.shape != (feats.shape[0],) or feats.shape[0] < 2:
        raise ValueError(f"recall_at_1: need feats (N, D) with N >= 2 and labels (N,), got "
                         f"{tuple(feats.shape)} and {tuple(labels.shape)}")
    f = feats.float()
    labels = labels.to(f.device)
    hits = 0
    for start in range(0, f.shape[0], chunk):
        sim = f[start:start + chunk] @ f.T
        rows = torch.arange(sim.shape[0], device=f.device)
        sim[rows, rows + start] = -torch.inf  # leave the query itself out
        hits += int((labels[sim.argmax(dim=1)] == labels[start:start + chunk]).sum())
    return 100.0 * hits / f.shape[0]


# ----------------------------------------------------------------------------- per split
def evaluate_split(train_feats: torch.Tensor, train_labels: torch.Tensor,
                   test_feats: torch.Tensor, test_labels: torch.Tensor,
                   test_classes: list[int], eval_cfg) -> dict[str, float]:
    """kNN top-1 and Recall@1 on the test classes of one split.

    Shapes: train_feats (N, D), train_labels (N,), test_feats (Q, D), test_labels (Q,);
    test_classes: class ids. The kNN bank is the train images of ``test_classes``, its
    queries their test images; Recall@1 runs over those test images alone.
    """
    ids = torch.tensor(test_classes, device=train_labels.device)
    bank = torch.isin(train_labels, ids)
    query = torch.isin(test_labels, ids.to(test_labels.device))
    acc = knn_evaluate(train_feats[bank], train_labels[bank], test_feats[query],
                       test_labels[query], eval_cfg)
    return {"knn_top1": acc["top1"], "k": acc["k"],
            "recall_at_1": recall_at_1(test_feats[query], test_labels[query]),
            "n_bank": int(bank.sum()), "n_queries": int(query.sum())}


# ----------------------------------------------------------------------------- command
def shift_command(path: Path, overrides: list[str] | None = None, splits: int = 8,
                  pca_dim: int = 32, seed: int = 0, cache: bool = True) -> dict:
    """`ssl-sec shift`: the module docstring's steps 1-5 on the checkpoint's backbone;
    writes `<stem>.shift.json` (and `<stem>.shift.png`) beside the checkpoint."""
    if splits < 2:
        raise UserError(f"--splits {splits}: must be >= 2")
    if pca_dim < 1:
        raise UserError(f"--pca-dim {pca_dim}: must be >= 1")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed}: must be in [0, {MAX_SEED}]")
    path = Path(path)
    # CIFAR-100 by default, every class and every image (the pretraining run's class filter
    # and subsets were its own); overrides still apply on top.
    session = EvalSession(path, overrides, cache=cache,
                          data={"data": {"dataset": DEFAULT_DATASET, "classes": None,
                                         "train_subset": 0, "test_subset": 0}})
    cfg = session.cfg
    t0 = time.perf_counter()
    (train_f, train_y), (test_f, test_y) = session.features("train"), session.features("test")
    classes = sorted(set(train_y.unique().tolist()) & set(test_y.unique().tolist()))
    if len(classes) < 4:
        raise UserError(f"{cfg.data.dataset}: only {len(classes)} classes have both train and "
                        "test images; a shift split needs at least 4 (check data.classes and "
                        "data.*_subset)")
    projected = pca(class_means(train_f, train_y, classes), pca_dim)
    trajectory = shift_trajectory(projected, seed)
    fids = [s.fid for s in trajectory]
    rows = []
    for index in pick_splits(fids, splits):
        step = trajectory[index]
        test_classes = [classes[i] for i in step.test]
        scores = evaluate_split(train_f, train_y, test_f, test_y, test_classes, cfg.eval)
        rows.append({"index": index, "fid": step.fid,
                     "n_train_classes": len(classes) - len(test_classes),
                     "n_test_classes": len(test_classes), "test_classes": test_classes,
                     **scores})
    png_path = path.with_name(f"{path.stem}.shift.png")
    result = {
        "checkpoint": str(path), "dataset": cfg.data.dataset, "n_classes": len(classes),
        "pca_dim": int(projected.shape[1]), "pca_dim_requested": pca_dim, "seed": seed,
        "feature_layer": "backbone (pooled, L2-normalised)", "knn_T": cfg.eval.knn_temperature,
        "fid": "Frechet distance between Gaussians fitted to the train and the test class "
               "means (PCA space, float64)",
        "swap_rule": SWAP_RULE, "trajectory_fid": fids, "splits": rows, "png": None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    plt = _pyplot()
    if plt is None:
        print("note: the accuracy-vs-FID plot needs matplotlib: pip install ssl_sec[plots]; "
              "wrote the JSON only", file=sys.stderr)
    else:
        result["png"] = str(png_path)
        plot_shift(rows, png_path, plt,
                   title=f"{path} on {cfg.data.dataset} (seed {seed})")
    session.write("shift", result)
    return result


OVERRIDES = ("overrides of the checkpoint's config (data.dataset=cifar100 and every image by "
             "default), e.g. eval.knn_k=20 data.root=...")


def add_arguments(parser) -> None:
    parser.add_argument("--splits", type=int, default=8, metavar="N",
                        help="about N splits, evenly spaced in FID (default 8, >= 2)")
    parser.add_argument("--pca-dim", type=int, default=32, metavar="D",
                        help="PCA dimensions of the class means for the FID (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random 50/50 start")


def run(args) -> dict:
    return shift_command(Path(args.checkpoint), args.overrides, args.splits, args.pca_dim,
                         args.seed, cache=not args.no_cache)


def show(result: dict) -> str:
    """What the command prints: the splits as a table."""
    return format_table(result)


def format_table(result: dict) -> str:
    """The command's splits as a short text table."""
    lines = [f"{'split':>5} {'step':>4} {'FID':>10} {'test cls':>8} {'kNN top1':>9} "
             f"{'R@1':>7}"]
    for i, r in enumerate(result["splits"]):
        lines.append(f"{i:>5} {r['index']:>4} {r['fid']:>10.4g} {r['n_test_classes']:>8} "
                     f"{r['knn_top1']:>8.2f}% {r['recall_at_1']:>6.2f}%")
    ckpt = Path(result["checkpoint"])
    lines.append(f"wrote {ckpt.with_name(ckpt.stem + '.shift.json')}"
                 + (f" and {result['png']}" if result.get("png") else ""))
    return "\n".join(lines)


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_shift(rows: list[dict], out: Path, plt, title: str = "") -> None:
    """kNN top-1 and Recall@1 on the test classes against the split's FID, as a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    fid = [r["fid"] for r in rows]
    ax.plot(fid, [r["knn_top1"] for r in rows], "o-", label="kNN top-1")
    ax.plot(fid, [r["recall_at_1"] for r in rows], "s--", label="Recall@1")
    ax.set_xlabel("FID between train and test class means")
    ax.set_ylabel("accuracy on the test classes (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _null_small(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with round-off (negative, or below ``n * eps``
    times the largest) set to 0. Shape (n,) -> (n,)."""
    tol = len(w) * np.finfo(np.float64).eps * float(np.abs(w).max(initial=0.0))
    return np.where(w > tol, w, 0.0)


def _ranked(score: np.ndarray, allowed: np.ndarray) -> list[int]:
    """Indices where ``allowed``, by ascending ``score`` (ties by index)."""
    idx = np.flatnonzero(allowed)
    return idx[np.argsort(score[idx], kind="stable")].tolist()


def _np64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)

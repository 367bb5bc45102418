"""Few-shot transfer evaluation, the protocol of "Adapted Deep Embeddings" (Scott, Ridgeway,
Mozer, NeurIPS 2018; docs/methods.md section 8).

Classes are split into disjoint source and target sets (e.g. CIFAR-100 0-49 / 50-99). The
backbone is pretrained on source-class images only, which the pretraining recipe already
expresses: `ssl-sec pretrain recipes/cifar100/simclr.yaml "data.classes=[0,1,...,49]"`
(the checkpoint then records `data.classes`, and `ssl-sec kshot` defaults to the other classes).

For each k and each of R replications, k labelled images per target class are drawn as the
support set (seeded: `numpy.random.default_rng([seed, k, r])`), every other image of the target
classes is a query, and three classifiers on the frozen, L2-normalised backbone features are
scored by accuracy over all queries:

- nearest prototype: cosine similarity to the mean of each class's normalised support features;
- 1-NN: the label of the most cosine-similar support image;
- logistic regression: multinomial, L2-regularised like scikit-learn's default
  (`C * sum_i CE_i + ||W||^2 / 2`, intercept not penalised), fitted full-batch with torch's
  L-BFGS in float64 (scikit-learn is only a dev dependency; a test checks the two agree).

Each k reports the mean over replications and a 95% confidence interval
`1.96 * std / sqrt(R)` (sample std, ddof=1). A k is skipped, and the output says why, when some
target class has <= k images (no query would be left for it).
The images (all of them, unless `data.test_subset` / `data.train_subset` is overridden) come
from the **test** split by default (`--split`; the pretraining never saw any
test image, and for source-only pretraining no target-class image either); `all` pools train and
test when the test split has too few images per class.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MAX_SEED
from ..data import class_names
from ..errors import UserError
from .session import EvalSession

DEFAULT_SHOTS = (1, 5, 10, 50)
CLASSIFIERS = ("prototype", "nn1", "logistic")
SPLITS = ("test", "train", "all")


# ----------------------------------------------------------------------------- classifiers
def prototype_predict(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                      num_classes: int) -> torch.Tensor:
    """Nearest prototype by cosine similarity.

    Shape: support (S, D) L2-normalised, support_y (S,) in [0, C), query (Q, D) -> (Q,) labels.
    """
    protos = torch.zeros(num_classes, support.shape[1], dtype=support.dtype, device=support.device)
    protos.index_add_(0, support_y, support)
    # Cosine to the prototype: normalising the class mean removes the division by the count.
    return (query @ F.normalize(protos, dim=1).T).argmax(1)


def nn1_predict(support: torch.Tensor, support_y: torch.Tensor,
                query: torch.Tensor) -> torch.Tensor:
    """1-nearest neighbour by cosine similarity. Shape: (S, D), (S,), (Q, D) -> (Q,)."""
    return support_y[(query @ support.T).argmax(1)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float = 1.0,
                 max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, the minimiser of
    `C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2` (scikit-learn's objective, bias unpenalised).

    Solved full-batch in float64 with L-BFGS (strong Wolfe line search); the objective is
    divided by `C * n` for conditioning, which leaves the minimiser unchanged.
    Shape: x (n, D), y (n,) in [0, C) -> W (C, D), b (C,), float64.
    """
    x = x.double()
    n, dim = x.shape
    w = torch.zeros(num_classes, dim, dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + (w * w).sum() / (2.0 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad(), _one_cpu_thread(x.device):
        opt.step(closure)
    return w.detach(), b.detach()


def logistic_predict(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                     num_classes: int, c: float = 1.0) -> torch.Tensor:
    w, b = fit_logistic(support, support_y, num_classes, c)
    return (query.double() @ w.T + b).argmax(1)


# ----------------------------------------------------------------------------- protocol
@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The few-shot problems are tiny (at most a few thousand x D): on the CPU, intra-op
    threading only adds synchronisation, which costs 100x on a busy machine. Restored after."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the 95% half-width 1.96 * std / sqrt(R) (sample std); None when R < 2."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float(v.mean()), None
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def sample_support(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean support mask with k random images of every class present in `labels`."""
    mask = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        mask[rng.permutation(idx)[:k]] = True
    return mask


def kshot_evaluate(features: torch.Tensor, labels: torch.Tensor,
                   shots: Sequence[int] = DEFAULT_SHOTS, replications: int = 10, seed: int = 0,
                   logistic_c: float = 1.0) -> dict:
    """The few-shot protocol on fixed features.

    Args:
        features: (N, D) L2-normalised features of the target-class images.
        labels: (N,) integer class ids (any ids; only the target classes may appear).
        shots: the k values; replications: R >= 1; seed: base seed of the support draws.
    Returns:
        {"results": {k: {method: {"mean", "ci95", "values"}, "n_support", "n_query"}},
         "skipped": {k: reason}, "images_per_class": {"min", "max"}} with accuracies in percent.
    """
    if replications < 1:
        raise UserError(f"--replications {replications}: must be >= 1")
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise UserError(f"kshot: features (N, D) and labels (N,) expected, got "
                        f"{tuple(features.shape)} and {tuple(labels.shape)}")
    classes, y = torch.unique(labels.cpu(), return_inverse=True)
    num_classes = len(classes)
    y_np = y.numpy()
    counts = np.bincount(y_np, minlength=num_classes)
    y = y.to(features.device)
    results, skipped = {}, {}
    for k in shots:
        if k < 1:
            raise UserError(f"--shots {k}: every k must be >= 1")
        if counts.min() <= k:
            worst = int(classes[int(counts.argmin())])
            skipped[str(k)] = (f"class {worst} has only {int(counts.min())} images; k={k} needs "
                               f"> {k} per class (k support + at least one query)")
            continue
        values: dict[str, list[float]] = {m: [] for m in CLASSIFIERS}
        for r in range(replications):
            rng = np.random.default_rng([seed, k, r])
            mask = torch.from_numpy(sample_support(y_np, k, rng)).to(features.device)
            sx, sy, qx, qy = features[mask], y[mask], features[~mask], y[~mask]
            with _one_cpu_thread(features.device):
                preds = {"prototype": prototype_predict(sx, sy, qx, num_classes),
                         "nn1": nn1_predict(sx, sy, qx),
                         "logistic": logistic_predict(sx, sy, qx, num_classes, logistic_c)}
            for m, p in preds.items():
                values[m].append((p == qy).double().mean().item() * 100.0)
        entry: dict = {"n_support": int(k * num_classes),
                       "n_query": int(features.shape[0] - k * num_classes)}
        for m in CLASSIFIERS:
            mean, ci = mean_ci95(values[m])
            entry[m] = {"mean": mean, "ci95": ci, "values": values[m]}
        results[str(k)] = entry
    return {"results": results, "skipped": skipped,
            "images_per_class": {"min": int(counts.min()), "max": int(counts.max())}}


# ----------------------------------------------------------------------------- command
def parse_classes(tokens: Sequence[str]) -> list[int]:
    """`["50-99"]`, `["1,2,3"]`, `["1", "2"]` -> sorted unique class ids."""
    ids: set[int] = set()
    for token in tokens:
        for part in str(token).split(","):
            part = part.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise UserError(f"--target-classes: '{part}' is not a class id or a range "
                                "such as 50-99") from None
            if a < 0 or b < a:
                raise UserError(f"--target-classes: '{part}' is not a valid range (0 <= a <= b)")
            ids.update(range(a, b + 1))
    if not ids:
        raise UserError("--target-classes: no class ids given")
    return sorted(ids)


OVERRIDES = ("overrides of the checkpoint's config, e.g. data.root=... (all target-class "
             "images are used unless data.test_subset=N)")


def add_arguments(parser) -> None:
    parser.add_argument("--shots", type=int, nargs="+", default=list(DEFAULT_SHOTS),
                        metavar="K")
    parser.add_argument("--replications", type=int, default=10, metavar="R")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-classes", nargs="+", default=None, metavar="IDS",
                        help="e.g. 50-99 or 3 5 7 (default: the classes the checkpoint was "
                             "not pretrained on, else all)")
    parser.add_argument("--split", default="test", choices=SPLITS,
                        help="where the target images come from (default: test)")
    parser.add_argument("--logistic-c", type=float, default=1.0, metavar="C",
                        help="inverse L2 strength of the logistic probe (scikit-learn's C)")


def run(args) -> dict:
    return kshot_command(Path(args.checkpoint), args.shots, args.replications, args.seed,
                         args.target_classes, args.split, args.overrides,
                         cache=not args.no_cache, logistic_c=args.logistic_c)


def kshot_command(path: Path, shots: Sequence[int] = DEFAULT_SHOTS, replications: int = 10,
                  seed: int = 0, target_classes: Sequence[str] | None = None,
                  split: str = "test", overrides: list[str] | None = None,
                  cache: bool = True, logistic_c: float = 1.0) -> dict:
    """`ssl-sec kshot`: writes `<stem>.kshot.json` beside the checkpoint.

    Target classes default to the classes the checkpoint was *not* pretrained on (its
    `data.classes` complement), or to every class when it saw them all (then `disjoint` is
    false in the output: that is not a transfer evaluation).
    """
    if not logistic_c > 0:
        raise UserError(f"--logistic-c {logistic_c}: must be > 0")
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed}: must be in [0, {MAX_SEED}]")
    target = parse_classes(target_classes) if target_classes else None
    path = Path(path)
    source: list[int] | None = None

    def target_images(cfg) -> dict:
        # Every image of the target classes, whatever subset the pretraining run used; an
        # explicit data.train_subset / data.test_subset override still applies (first N
        # after the class filter).
        nonlocal target, source
        source = cfg.data.classes
        n_all = len(class_names(cfg.data))
        if target is None:
            target = [c for c in range(n_all) if source is None or c not in source]
            target = target or list(range(n_all))
        return {"data": {"classes": target, "train_subset": 0, "test_subset": 0}}

    session = EvalSession(path, overrides, data=target_images, cache=cache)
    cfg = session.cfg
    t0 = time.perf_counter()
    parts = [session.features(name) for name in ("train", "test") if split in (name, "all")]
    feats = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    missing = sorted(set(target) - set(labels.unique().tolist()))
    if missing:
        raise UserError(f"target classes {missing[:10]} have no images in the {split} split "
                        f"of {cfg.data.dataset}; check --target-classes and data.*_subset")
    out = kshot_evaluate(feats, labels, shots, replications, seed, logistic_c)
    result = {
        "protocol": ("few-shot transfer (Adapted Deep Embeddings): k support images per target "
                     "class, the rest queries; frozen backbone, L2-normalised pooled features; "
                     "accuracy over all queries, mean and 95% CI (1.96 std / sqrt(R)) over R "
                     "replications"),
        "checkpoint": str(path), "dataset": cfg.data.dataset, "split": split,
        "target_classes": target, "source_classes": source,
        "disjoint": source is not None and not set(source) & set(target),
        "n_images": int(labels.shape[0]), "shots": list(shots), "replications": replications,
        "seed": seed, "feature_layer": "backbone (pooled, L2-normalised)",
        "logistic": {"C": logistic_c, "solver": "torch L-BFGS, float64, multinomial"},
        **out, "seconds": round(time.perf_counter() - t0, 2),
    }
    session.write("kshot", result)
    return result

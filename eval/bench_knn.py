"""Benchmark ssl_sec's weighted kNN against lightly's knn_predict on the CPU.

    python eval/bench_knn.py [--bank 50000 --dim 512 --queries 10000 --k 200 \
        --memory-mb 1024 --out eval/results/knn_cpu.json]

Random features (standard normal, then L2-normalised; fixed seed) and 10 random labels; the
three methods run side by side in this process, each timed as the best of ``--repeats`` runs
after one warm-up, and their top-1 predictions are compared. Peak memory is measured
separately, one fresh subprocess per method (see ``_memory_worker``). Results go to a JSON
file with the machine, the library versions and the settings.

lightly's ``knn_predict`` materialises the full (Q x N) float32 similarity matrix
(10,000 x 50,000 = 1.9 GiB at the default size); ours works in query chunks sized by
``--memory-mb``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import faiss
import torch
from lightly.utils.benchmarking import knn_predict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402

from ssl_sec.evaluation.knn import knn_classify

METHODS = ("ours_faiss", "ours_torch", "lightly")
REPO = Path(__file__).resolve().parents[1]

# A float64 gap below this between the k-th and (k+1)-th similarity (or between the two best
# class scores, relative) is within float32 rounding of the inner products (|s| <= 1, D=512:
# errors of order 1e-7), so either answer is an exact tie in float32 arithmetic.
TIE_TOL = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bank", type=int, default=50_000, help="bank size N")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--queries", type=int, default=10_000, help="number of queries Q")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-mb", type=float, default=1024, help="budget of our kNN, MiB")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "knn_cpu.json")
    p.add_argument("--memory-worker", choices=METHODS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_data(args: argparse.Namespace):
    """Bank (N, D), bank labels (N,), queries (Q, D): unit-norm float32, fixed seed."""
    g = torch.Generator().manual_seed(args.seed)
    bank = torch.randn(args.bank, args.dim, generator=g)
    queries = torch.randn(args.queries, args.dim, generator=g)
    # In place, so that building the data leaves no freed temporaries larger than the data:
    # the memory worker takes the high-water mark after this point as its baseline.
    bank.div_(bank.norm(dim=1, keepdim=True))
    queries.div_(queries.norm(dim=1, keepdim=True))
    labels = torch.randint(0, args.classes, (args.bank,), generator=g)
    return bank, labels, queries


def predict(method: str, bank, labels, queries, args) -> torch.Tensor:
    """Top-1 predictions (Q,) of one method."""
    if method == "lightly":
        # lightly wants the bank as (D, N); the transposed view costs no copy (torch.mm
        # passes the transpose flag to BLAS).
        ranked = knn_predict(queries, bank.T, labels, args.classes, args.k, args.temperature)
        return ranked[:, 0]
    backend = method.removeprefix("ours_")
    scores = knn_classify(
        bank, labels, queries, k=args.k, temperature=args.temperature,
        num_classes=args.classes, backend=backend, memory_mb=args.memory_mb,
    )  # fmt: skip
    return scores.argmax(dim=1)


def time_method(method: str, bank, labels, queries, args) -> tuple[list[float], torch.Tensor]:
    predict(method, bank, labels, queries, args)  # warm-up: thread pools, BLAS, page faults
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        pred = predict(method, bank, labels, queries, args)
        seconds.append(time.perf_counter() - start)
    return seconds, pred


def _proc_status_mib(field: str) -> float:
    """A VmXXX field of /proc/self/status (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise OSError(f"{field} not in /proc/self/status")


def _memory_worker(args: argparse.Namespace) -> None:
    """Peak resident memory of one method, in a fresh process, printed as one JSON line.

    Why this way:
    - tracemalloc sees only Python-heap allocations, not torch's or faiss's native buffers,
      so the probe is the resident set size (RSS), which sees everything.
    - a process's peak RSS only grows, so each method gets a fresh process: in a shared one
      the largest method's peak would hide every later one.
    - getrusage's ru_maxrss is the wrong counter for that child: Linux carries the parent's
      high-water mark across fork + exec, so a child of this (large) process starts with the
      parent's peak. /proc/self/status VmHWM belongs to the child's own address space, and
      writing "5" to /proc/self/clear_refs (Linux >= 4.0) resets it to the current RSS once
      imports and data are in place, so VmHWM afterwards minus VmRSS at that point is the
      memory the call itself needed at its peak: its buffers, plus one-off costs such as
      thread-pool stacks and, for faiss, the index's copy of the bank. (Freed heap pages still
      resident from the data build would be reused unseen; make_data leaves none of size.)
    """
    bank, labels, queries = make_data(args)
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _proc_status_mib("VmRSS")
    predict(args.memory_worker, bank, labels, queries, args)
    peak = _proc_status_mib("VmHWM")
    print(
        json.dumps(
            {"baseline_rss_mib": baseline, "peak_rss_mib": peak, "peak_delta_mib": peak - baseline}
        )
    )


def measure_memory(method: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-worker", method]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def explain_mismatches(a, b, bank, labels, queries, args) -> dict:
    """Count top-1 differences between predictions ``a`` and ``b`` and say why they differ.

    For each differing query the float64 similarities are recomputed: a tie at the k-th
    neighbour (gap < TIE_TOL) means the two exact methods legitimately kept different
    neighbour sets; a tie between the two best class scores means either class is a correct
    argmax. Anything else is reported as unexplained.
    """
    idx = torch.nonzero(a != b).flatten()
    reasons = {"kth_neighbour_tie": 0, "class_score_tie": 0, "unexplained": 0}
    for q in idx.tolist():
        sims = bank.double() @ queries[q].double()
        top = sims.topk(min(args.k + 1, len(sims))).values
        if args.k < len(sims) and top[args.k - 1] - top[args.k] < TIE_TOL:
            reasons["kth_neighbour_tie"] += 1
            continue
        top_sims, top_idx = sims.topk(min(args.k, len(sims)))
        scores = torch.zeros(args.classes, dtype=torch.float64)
        scores.scatter_add_(0, labels[top_idx], torch.exp(top_sims / args.temperature))
        best2 = scores.topk(2).values
        if best2[0] - best2[1] < TIE_TOL * best2[0]:
            reasons["class_score_tie"] += 1
        else:
            reasons["unexplained"] += 1
    return {"differing_top1": len(idx), **reasons}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_worker:
        _memory_worker(args)
        return

    bank, labels, queries = make_data(args)
    timings, preds = {}, {}
    for method in METHODS:
        timings[method], preds[method] = time_method(method, bank, labels, queries, args)
        print(f"{method:11s} best {min(timings[method]):7.3f} s  runs {timings[method]}")

    mismatches = {
        f"{a}_vs_{b}": explain_mismatches(preds[a], preds[b], bank, labels, queries, args)
        for a, b in (
            ("ours_faiss", "lightly"),
            ("ours_torch", "lightly"),
            ("ours_faiss", "ours_torch"),
        )
    }
    memory = {}
    for method in METHODS:
        memory[method] = measure_memory(method, argv)
        print(
            f"{method:11s} peak memory above baseline {memory[method]['peak_delta_mib']:8.1f} MiB"
        )

    best = {m: min(timings[m]) for m in METHODS}
    result = {
        "benchmark": "weighted kNN (InstDisc), ssl_sec.evaluation.knn vs lightly knn_predict, CPU",
        **provenance(faiss=faiss.__version__),
        "settings": {
            "bank": args.bank,
            "dim": args.dim,
            "queries": args.queries,
            "k": args.k,
            "temperature": args.temperature,
            "classes": args.classes,
            "seed": args.seed,
            "memory_mb": args.memory_mb,
            "repeats": args.repeats,
            "warmup_runs": 1,
            "features": "standard normal, L2-normalised, float32; labels uniform random",
        },  # fmt: skip
        "seconds": {m: {"best": best[m], "runs": timings[m]} for m in METHODS},
        "speedup_vs_lightly": {m: best["lightly"] / best[m] for m in ("ours_faiss", "ours_torch")},
        "mismatches": mismatches,
        "memory": {
            m: {
                **memory[m],
                "within_budget": memory[m]["peak_delta_mib"] <= args.memory_mb,
            }
            for m in METHODS
        },
        "notes": [
            "seconds: wall clock (time.perf_counter) of one full classification of all "
            "queries, best of the repeats after one warm-up, all methods in one process.",
            "memory: peak RSS (VmHWM, reset via /proc/self/clear_refs after imports and data "
            "creation) of a fresh process per method, minus its RSS at that point; Linux only. "
            "Includes faiss's copy of the bank "
            f"({args.bank * args.dim * 4 / 2**20:.0f} MiB) for ours_faiss.",
            "within_budget compares that delta with memory_mb; lightly has no budget and "
            "materialises the full (Q x N) similarity matrix "
            f"({args.queries * args.bank * 4 / 2**20:.0f} MiB).",
            f"mismatch reasons use float64 recomputation; a tie is a gap < {TIE_TOL}.",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nN={args.bank} D={args.dim} Q={args.queries} k={args.k} T={args.temperature}")
    for m in METHODS:
        speed = f"  x{best['lightly'] / best[m]:.2f} vs lightly" if m != "lightly" else ""
        print(
            f"{m:11s} {best[m]:7.3f} s{speed}  peak +{memory[m]['peak_delta_mib']:.0f} MiB"
            f"  within {args.memory_mb:g} MiB: {result['memory'][m]['within_budget']}"
        )
    for pair, counts in mismatches.items():
        print(f"{pair}: {counts}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

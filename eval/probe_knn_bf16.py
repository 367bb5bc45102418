"""Why the exact CPU kNN stops at ~1.3x lightly: the cost of each stage of a bf16 search.

    python eval/probe_knn_bf16.py [--bank 50000 --dim 512 --queries 10000 --k 200]

Same data as eval/bench_knn.py (unit-norm random features, fixed seed). All 10,000 queries go
through in chunks of --chunk queries; each stage is timed over the whole query set:

- fp32_matmul: the (Q x N x D) float32 product that lightly and our exact backends both pay
  (torch's; fp32_matmul_openblas: the same through numpy's OpenBLAS, the fastest float32
  product found on this machine, about faiss's BLAS);
- bf16_matmul: the same product with bfloat16 inputs (AVX512-BF16 on this CPU);
- topk: torch.topk(k) over each query's N similarities;
- rerank_<c>: exact float32 re-scoring of c candidates per query (gather + batched dot),
  which a bf16 search needs before it can promise the same neighbours.

A bf16 similarity of unit vectors can be off by up to (2u + u^2) ~ 2^-7 (u = 2^-8, the
bf16 unit round-off; Cauchy-Schwarz over the rounding of both vectors), so an exact answer
must re-score every bank vector whose bf16 similarity is within twice that of the k-th:
`candidates_needed` counts them per query (median and 90th percentile over a sample).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_knn import make_data  # noqa: E402
from common import write_result  # noqa: E402

U_BF16 = 2.0**-8


def timed(fn, chunks) -> float:
    fn(chunks[0])  # warm-up
    start = time.perf_counter()
    for c in chunks:
        fn(c)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--out", default="eval/results/knn_bf16_probe_cpu.json")
    args = ap.parse_args()
    bank, _, queries = make_data(args)
    chunks = list(queries.split(args.chunk))
    bank_bf, bank_t = bank.bfloat16(), bank.T
    bank_np_t = bank.numpy().T
    seconds = {
        "fp32_matmul": timed(lambda q: q @ bank_t, chunks),
        "fp32_matmul_openblas": timed(lambda q: q.numpy() @ bank_np_t, chunks),
        "bf16_matmul": timed(lambda q: q.bfloat16() @ bank_bf.T, chunks),
    }
    sims = chunks[0] @ bank_t
    seconds["topk"] = timed(lambda q: sims.topk(args.k, dim=1), chunks)
    gen = torch.Generator().manual_seed(0)
    for c in (args.k + 56, 700):
        idx = torch.randint(0, args.bank, (args.chunk, c), generator=gen)

        def rerank(q, idx=idx):
            for s in range(0, q.shape[0], 64):
                torch.bmm(bank[idx[s:s + 64]], q[s:s + 64, :, None])

        seconds[f"rerank_{c}"] = timed(rerank, chunks)

    # How many candidates an exact bf16 search must re-score (sample of 200 queries).
    eps = 2 * U_BF16 + U_BF16**2
    sample = queries[:200]
    approx = (sample.bfloat16() @ bank_bf.T).float()
    kth = approx.topk(args.k, dim=1).values[:, -1:]
    needed = (approx >= kth - 2 * eps).sum(dim=1).float()
    flops = 2 * args.queries * args.bank * args.dim
    result = {
        "seconds_all_queries": seconds,
        "gflops_per_second": {k: flops / seconds[k] / 1e9 for k in seconds if "matmul" in k},
        "bf16_error_bound": eps,
        "candidates_needed": {"median": needed.median().item(),
                              "p90": needed.quantile(0.9).item()},
    }
    for name, sec in seconds.items():
        print(f"{name:14s} {sec:7.3f} s")
    print(f"candidates to re-score per query: median {statistics.median(needed.tolist()):.0f}")
    write_result(args.out, {"benchmark": "knn_bf16_probe", "settings": vars(args), **result})


if __name__ == "__main__":
    main()

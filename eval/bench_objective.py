"""Objective cost on the CPU: InfoNCE + SEC + Circle vs InfoNCE alone, forward + backward.

    python eval/bench_objective.py --n 512 --d 128 --repeats 10 --block 10

Both objectives run through `ssl_sec.losses.Objective` on the same (N, d) projections of two
views, interleaved in one process; figures are medians. Target (issue 3): at most 1.3x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from ssl_sec.config import LossConfig  # noqa: E402
from ssl_sec.losses import Objective, pairwise_similarities  # noqa: E402


def run(objective: Objective, z1: torch.Tensor, z2: torch.Tensor) -> None:
    a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    z = torch.cat([a, b])
    # diagnostics=False: the loop computes monitoring statistics only on logged steps.
    terms = objective(pairwise_similarities(a, b), z, z, 0.5, diagnostics=False)
    terms.losses["total"].backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--out", default="eval/results/objective_cpu.json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(args.n, args.d, generator=g), torch.randn(args.n, args.d, generator=g)
    variants = {
        "infonce": Objective(LossConfig(temperature=0.2)),
        "infonce+sec": Objective(LossConfig(temperature=0.2, sec_eta=0.01)),
        "infonce+circle": Objective(LossConfig(temperature=0.2, w_circle=1.0)),
        "infonce+sec+circle": Objective(LossConfig(temperature=0.2, sec_eta=0.01, w_circle=1.0)),
    }
    # Blocks of `--block` calls per variant, the variants rotated `--repeats` times: single
    # interleaved calls measured allocator and cache effects of the previous variant.
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, obj in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.block):
                run(obj, z1, z2)
            times[name].append((time.perf_counter() - t0) / args.block)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["infonce"] for k in med}
    for k in med:
        print(f"{k:22s} {med[k] * 1e3:8.2f} ms  {ratios[k]:.3f}x")
    write_result(args.out, {
        "benchmark": "objective_cost",
        "settings": {"n": args.n, "d": args.d, "anchors": 2 * args.n, "repeats": args.repeats,
                     "block": args.block,
                     "device": "cpu", "includes": "similarities, all terms, diagnostics, backward"},
        "milliseconds_median": {k: v * 1e3 for k, v in med.items()},
        "ratio_vs_infonce": ratios, "target": 1.3,
        "meets_target": ratios["infonce+sec+circle"] <= 1.3,
    })


if __name__ == "__main__":
    main()

"""Objective cost on the CPU: InfoNCE + SEC + Circle vs InfoNCE alone, forward + backward.

    python eval/bench_objective.py --n 512 --d 128 --repeats 30 --block 10

All four objectives run through `ssl_sec.objective.Objective` on the same (N, d) projections of
two views, in one process, timed in blocks of `--block` calls with the variants rotated
`--repeats` times; figures are medians, plus minor page faults per call. Target (issue 3):
at most 1.3x.

The process first applies the malloc settings the `ssl-sec` command applies at start-up
(`ssl_sec.cpu_memory`), because that is how the objective runs in training. The same
measurement is then repeated in a child process with glibc's default settings
(SSL_SEC_KEEP_FREED_MEMORY=0) and reported beside it: with the defaults most of the cost
of every extra (2N, 2N) temporary is page faults, not arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from ssl_sec.cpu_memory import ENV_VAR, keep_freed_memory  # noqa: E402
from ssl_sec.losses import pairwise_similarities  # noqa: E402
from ssl_sec.objective import Objective  # noqa: E402
from ssl_sec.recipe import from_dict  # noqa: E402

VARIANTS = {
    "infonce": {},
    "infonce+sec": {"sec": {"eta": 0.01}},
    "infonce+circle": {"circle": {"weight": 1.0}},
    "infonce+sec+circle": {"sec": {"eta": 0.01}, "circle": {"weight": 1.0}},
}


def run(objective: Objective, z1: torch.Tensor, z2: torch.Tensor) -> None:
    a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    z = torch.cat([a, b])
    # diagnostics=False: the loop computes monitoring statistics only on logged steps.
    terms = objective(pairwise_similarities(a, b), z, z, 0.5, diagnostics=False)
    terms.losses["total"].backward()


def measure(args: argparse.Namespace) -> dict:
    """Median milliseconds, ratios to InfoNCE and page faults per call, for each variant."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(args.n, args.d, generator=g), torch.randn(args.n, args.d, generator=g)
    objectives = {k: Objective(from_dict({"loss": {"infonce": {"temperature": 0.2}, **v}}).loss)
                  for k, v in VARIANTS.items()}
    for obj in objectives.values():  # warm-up: thread pools, first allocations
        run(obj, z1, z2)
    # Blocks of `--block` calls per variant, the variants rotated `--repeats` times: single
    # interleaved calls measured allocator and cache effects of the previous variant.
    times: dict[str, list[float]] = {k: [] for k in objectives}
    faults = dict.fromkeys(objectives, 0)
    for _ in range(args.repeats):
        for name, obj in objectives.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(args.block):
                run(obj, z1, z2)
            times[name].append((time.perf_counter() - t0) / args.block)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    calls = args.repeats * args.block
    return {
        "milliseconds_median": med,
        "ratio_vs_infonce": {k: med[k] / med["infonce"] for k in med},
        "page_faults_per_call": {k: v / calls for k, v in faults.items()},
    }


def report(title: str, res: dict) -> None:
    print(title)
    for k, ms in res["milliseconds_median"].items():
        print(f"  {k:22s} {ms:8.2f} ms  {res['ratio_vs_infonce'][k]:.3f}x"
              f"  {res['page_faults_per_call'][k]:8.1f} page faults/call")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--out", default="eval/results/objective_cpu.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    applied = keep_freed_memory()
    if args.child:  # the glibc-defaults run: print the figures for the parent
        print(json.dumps(measure(args)))
        return
    ssl_sec_setting = measure(args)
    cmd = [sys.executable, __file__, "--child", "--n", str(args.n), "--d", str(args.d),
           "--repeats", str(args.repeats), "--block", str(args.block)]
    out = subprocess.run(cmd, env={**os.environ, ENV_VAR: "0"}, check=True,
                         capture_output=True, text=True).stdout
    glibc_default = json.loads(out.strip().splitlines()[-1])
    report(f"malloc settings of the ssl-sec command (applied: {applied})", ssl_sec_setting)
    report("glibc default malloc settings", glibc_default)
    ratio = ssl_sec_setting["ratio_vs_infonce"]["infonce+sec+circle"]
    write_result(args.out, {
        "benchmark": "objective_cost",
        "settings": {"n": args.n, "d": args.d, "anchors": 2 * args.n, "repeats": args.repeats,
                     "block": args.block, "device": "cpu",
                     "includes": "similarities, all terms, backward (diagnostics off)"},
        "malloc_settings_applied": applied,
        **ssl_sec_setting,
        "glibc_default": glibc_default,
        "target": 1.3,
        "meets_target": ratio <= 1.3,
    })


if __name__ == "__main__":
    main()

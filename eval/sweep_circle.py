"""Circle-term sweep: margin m and scale gamma for SimCLR with InfoNCE + Circle on CIFAR-10.

    python eval/sweep_circle.py --margins 0.25 0.4 --gammas 4 8 16 32 64

CPU-sized protocol (eval/common.py CPU_SMALL): quick-start model, first 10,000 training
images, 2 epochs, kNN top-1 on the full test set; one seed per cell plus an InfoNCE-only
reference with the same seed. The recipes use the best cell.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CPU_SMALL, run_training, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--margins", type=float, nargs="+", default=[0.25, 0.4])
    ap.add_argument("--gammas", type=float, nargs="+", default=[4.0, 8.0, 16.0, 32.0, 64.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="eval/results/circle_sweep_cpu.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = run_training("recipes/quickstart.yaml", [*CPU_SMALL, f"seed={args.seed}"], tmp,
                            "infonce")
        rows.append({"margin": None, "gamma": None, "top1": base["top1"], "top5": base["top5"]})
        for m, g in itertools.product(args.margins, args.gammas):
            res = run_training("recipes/quickstart.yaml",
                               [*CPU_SMALL, f"seed={args.seed}", "loss.w_circle=1.0",
                                f"loss.circle_margin={m}", f"loss.circle_gamma={g}"],
                               tmp, f"circle_m{m}_g{g}")
            rows.append({"margin": m, "gamma": g, "top1": res["top1"], "top5": res["top5"]})
        seconds = time.perf_counter() - t0
    best = max((r for r in rows if r["margin"] is not None), key=lambda r: r["top1"])
    for r in rows:
        print(f"m={r['margin']} gamma={r['gamma']}: kNN top-1 {r['top1']:.2f}")
    print(f"best: m={best['margin']} gamma={best['gamma']} ({best['top1']:.2f}); "
          f"InfoNCE alone {rows[0]['top1']:.2f}")
    write_result(args.out, {
        "benchmark": "circle_sweep",
        "settings": {"recipe": "recipes/quickstart.yaml", "overrides": CPU_SMALL,
                     "objective": "InfoNCE (w=1) + Circle (w=1)", "seed": args.seed,
                     "knn": "k=200, T=0.1, bank = the 10,000 training images, full test set"},
        "rows": rows, "best": best, "seconds": seconds,
    })


if __name__ == "__main__":
    main()

"""Circle-term sweep: margin m and scale gamma for SimCLR with InfoNCE + Circle on CIFAR-10.

    python eval/sweep_circle.py --margins 0.25 0.4 --gammas 4 8 16 32 64 --confirm-top 2 \
        --confirm-seeds 1 2

CPU-sized protocol (eval/common.py CPU_SMALL): quick-start model, first 10,000 training
images, 2 epochs, kNN top-1 on the full test set. Stage 1: one seed per cell plus an
InfoNCE-only reference with the same seed. Stage 2: the `--confirm-top` best cells and the
reference run again with each of `--confirm-seeds`, because one seed cannot separate cells
closer than the seed-to-seed spread (about 1 point here). The recipes use the cell with the
best mean over all its seeds.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
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
    ap.add_argument("--confirm-top", type=int, default=2)
    ap.add_argument("--confirm-seeds", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--out", default="eval/results/circle_sweep_cpu.json")
    args = ap.parse_args()
    rows = []

    def train(name: str, seed: int, overrides: list[str], tmp: str) -> dict:
        return run_training("recipes/quickstart.yaml", [*CPU_SMALL, f"seed={seed}", *overrides],
                            tmp, f"{name}_s{seed}")

    def circle(m: float, g: float) -> list[str]:
        return ["loss.circle.weight=1.0", f"loss.circle.margin={m}", f"loss.circle.gamma={g}"]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = train("infonce", args.seed, [], tmp)
        rows.append({"margin": None, "gamma": None, "top1": base["top1"], "top5": base["top5"]})
        for m, g in itertools.product(args.margins, args.gammas):
            res = train(f"circle_m{m}_g{g}", args.seed, circle(m, g), tmp)
            rows.append({"margin": m, "gamma": g, "top1": res["top1"], "top5": res["top5"]})
        top = sorted((r for r in rows if r["margin"] is not None), key=lambda r: -r["top1"])
        confirm = []
        for r in [rows[0], *top[: args.confirm_top]]:
            over = [] if r["margin"] is None else circle(r["margin"], r["gamma"])
            top1 = [r["top1"]] + [train(f"confirm_m{r['margin']}_g{r['gamma']}", seed, over,
                                        tmp)["top1"] for seed in args.confirm_seeds]
            confirm.append({"margin": r["margin"], "gamma": r["gamma"],
                            "seeds": [args.seed, *args.confirm_seeds], "top1": top1,
                            "mean": statistics.mean(top1),
                            "std": statistics.stdev(top1) if len(top1) > 1 else 0.0})
        seconds = time.perf_counter() - t0
    best = max((c for c in confirm if c["margin"] is not None), key=lambda c: c["mean"])
    for r in rows:
        print(f"m={r['margin']} gamma={r['gamma']}: kNN top-1 {r['top1']:.2f}")
    for c in confirm:
        print(f"confirm m={c['margin']} gamma={c['gamma']}: {c['mean']:.2f} +- {c['std']:.2f}")
    print(f"best: m={best['margin']} gamma={best['gamma']} ({best['mean']:.2f} over "
          f"{len(best['seeds'])} seeds); InfoNCE alone {confirm[0]['mean']:.2f}")
    write_result(args.out, {
        "benchmark": "circle_sweep",
        "settings": {"recipe": "recipes/quickstart.yaml", "overrides": CPU_SMALL,
                     "objective": "InfoNCE (w=1) + Circle (w=1)", "seed": args.seed,
                     "confirm_top": args.confirm_top, "confirm_seeds": args.confirm_seeds,
                     "knn": "k=200, T=0.1, bank = the 10,000 training images, full test set"},
        "rows": rows, "confirm": confirm, "best": best, "seconds": seconds,
    })


if __name__ == "__main__":
    main()

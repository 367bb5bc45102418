"""MoCo vs SimCLR at equal budget, every objective combination, several seeds (CIFAR-10).

    python eval/compare_methods.py --seeds 0 1 2

CPU-sized protocol (eval/common.py CPU_SMALL): the quick-start recipe for both methods
(same model, augmentation, optimizer, batch 256, 2 epochs over the first 10,000 training
images), MoCo with a 4096-key queue, m = 0.99, symmetric loss and split-BN; kNN top-1 on
the full test set. Reports mean and sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CPU_SMALL, ROOT, run_training, write_result  # noqa: E402

OBJECTIVES = {
    "infonce": [],
    "infonce+sec": ["loss.sec.eta=0.01", "loss.sec.ramp=linear"],
    "infonce+circle": ["loss.circle.weight=1.0"],
    "infonce+sec+circle": ["loss.sec.eta=0.01", "loss.sec.ramp=linear", "loss.circle.weight=1.0"],
}
METHODS = {"simclr": [], "moco": ["method=moco", "moco.queue_size=4096", "moco.momentum=0.99"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--circle", default=None,
                    help="margin,gamma; default: the best cell of eval/results/circle_sweep_cpu.json")
    ap.add_argument("--out", default="eval/results/methods_cpu.json")
    args = ap.parse_args()
    if args.circle:
        margin, gamma = (float(x) for x in args.circle.split(","))
    else:
        best = json.loads((ROOT / "eval/results/circle_sweep_cpu.json").read_text())["best"]
        margin, gamma = best["margin"], best["gamma"]
    circle = [f"loss.circle.margin={margin}", f"loss.circle.gamma={gamma}"]
    runs, table = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for method, m_over in METHODS.items():
            for objective, o_over in OBJECTIVES.items():
                tops = []
                for seed in args.seeds:
                    res = run_training("recipes/quickstart.yaml",
                                       [*CPU_SMALL, *m_over, *o_over, *circle, f"seed={seed}"],
                                       tmp, f"{method}-{objective}-s{seed}")
                    tops.append(res["top1"])
                    runs.append({"method": method, "objective": objective, "seed": seed,
                                 "top1": res["top1"], "top5": res["top5"]})
                mean = statistics.mean(tops)
                std = statistics.stdev(tops) if len(tops) > 1 else 0.0
                table[f"{method}/{objective}"] = {"mean": mean, "std": std, "n": len(tops)}
                print(f"{method:7s} {objective:20s} kNN top-1 {mean:.2f} +- {std:.2f}", flush=True)
    write_result(args.out, {
        "benchmark": "methods_objectives",
        "settings": {"recipe": "recipes/quickstart.yaml", "overrides": CPU_SMALL,
                     "methods": METHODS, "objectives": OBJECTIVES, "circle": circle,
                     "seeds": args.seeds, "knn": "k=200, T=0.1, bank = training subset, "
                     "full 10,000-image test set, final epoch"},
        "table": table, "runs": runs, "seconds": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()

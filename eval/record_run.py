"""Turn a finished run's metrics.jsonl (and, optionally, the console log of the command that ran
it) into an eval/results JSON: the kNN curve, epoch times, the final result.

    python eval/record_run.py --metrics runs/NAME/metrics.jsonl --recipe recipes/quickstart_gpu.yaml \
        --ran "bash scripts/quickstart.sh" [--log quickstart.log] [--git REV] --out eval/results/X.json

For runs made on another machine (a lent GPU), where the files come back but the run directory
does not: `--ran` records the command that produced them, `--log` the wall-clock line
("... took N s") the command printed, and `--git` the revision the machine ran.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--ran", required=True, help="the command that made the run")
    ap.add_argument("--log", default=None, help="its console output")
    ap.add_argument("--git", default=None, help="the revision it ran (default: this checkout's)")
    ap.add_argument("--machine", default=None, help="where it ran, in words")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.metrics).read_text().splitlines()]
    epochs = [r["perf/epoch_seconds"] for r in rows if r["kind"] == "epoch"]
    knn = [{"step": r["step"], "top1": r["knn/top1"], "top5": r["knn/top5"],
            "seconds": r["perf/knn_seconds"]} for r in rows if r["kind"] == "knn"]
    steps_per_epoch = next(r["step"] for r in rows if r["kind"] == "epoch")
    for row in knn:
        row["epoch"] = row["step"] // steps_per_epoch
    out = {"ran": args.ran, "recipe": args.recipe, "epochs": len(epochs),
           "epoch_seconds_first": epochs[0], "epoch_seconds_median": statistics.median(epochs),
           "train_seconds_sum": sum(epochs), "knn_curve": knn, "final_knn": knn[-1] if knn else None}
    if args.log:
        text = Path(args.log).read_text()
        took = re.findall(r"took (\d+) s", text)
        if took:
            out["wall_seconds_end_to_end"] = int(took[-1])
        out["console_tail"] = text.strip().splitlines()[-4:]
    if args.machine:
        out["ran_on"] = args.machine
    path = write_result(args.out, out)
    if args.git:  # the revision the run used, not this checkout's
        data = json.loads(path.read_text())
        data["git"] = args.git
        path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Quick start on real CIFAR-10 (CPU): does the recipe learn within its time budget?

    python eval/bench_quickstart.py --linear
    python eval/bench_quickstart.py --linear --checkpoint runs/NAME/last.pt   # reuse a run

With --checkpoint (e.g. the run `bash scripts/quickstart.sh` made), pretraining is not
repeated: its time is read from that run's metrics.jsonl (sum of the epoch times).

Pretrains `recipes/quickstart.yaml` (timed), then scores on the full 10,000-image test set
with all 50,000 training images as the bank (weighted kNN, k=200, T=0.1):
  - the trained backbone,
  - the same backbone at random initialisation (same seed, same architecture),
  - raw pixels (L2-normalised, mean/std-normalised 3072-d vectors).
With --linear, also a linear probe (fast mode on cached features) of trained vs random.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

from ssl_sec.checkpoint import load_checkpoint  # noqa: E402
from ssl_sec.cpu_memory import keep_freed_memory  # noqa: E402
from ssl_sec.data import load_splits  # noqa: E402
from ssl_sec.engine import build_augment, build_model, knn_monitor, train  # noqa: E402
from ssl_sec.evaluation.knn import knn_evaluate  # noqa: E402
from ssl_sec.recipe import from_dict, load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--out", default="eval/results/quickstart_cpu.json")
    ap.add_argument("--linear", action="store_true", help="also run fast-mode linear probes")
    ap.add_argument("--checkpoint", default=None, help="score this quick-start run instead")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    keep_freed_memory()  # as the ssl-sec command does at start-up
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = Path(tmp) / "qs.pt"
            shutil.copy(args.checkpoint, ckpt)  # evaluation files land in tmp, not the run
            saved = load_checkpoint(ckpt)
            cfg = from_dict(saved["config"], args.overrides)
            result = saved["knn"]
            rows = [json.loads(x) for x in
                    (Path(args.checkpoint).parent / "metrics.jsonl").read_text().splitlines()]
            train_s = sum(r.get("perf/epoch_seconds", 0.0) + r.get("perf/knn_seconds", 0.0)
                          for r in rows)
        else:
            cfg = load_recipe(ROOT / args.recipe, [*args.overrides, f"out_dir={tmp}", "name=qs"])
            t0 = time.perf_counter()
            result = train(cfg, progress_bar=False)
            train_s = time.perf_counter() - t0
            ckpt = Path(tmp) / "qs" / "last.pt"
        device = torch.device("cpu")
        splits = load_splits(cfg.data)
        train_set, test_set = splits.bank, splits.test
        _, transform = build_augment(cfg, device)
        train_xy = (train_set.images, train_set.labels)
        test_xy = (test_set.images, test_set.labels)
        torch.manual_seed(cfg.seed)
        random_model = build_model(cfg, device)
        random_knn = knn_monitor(random_model.backbone, train_set, test_set, transform, cfg)
        pixels = knn_pixels(train_xy, test_xy, transform, cfg)
        linear = {}
        if args.linear:
            linear = linear_probes(ckpt, random_model, cfg)
    rows = {"trained": {"top1": result["top1"], "top5": result["top5"]},
            "random_init": random_knn, "raw_pixels": pixels}
    for name, r in rows.items():
        print(f"kNN {name:12s} top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}")
    print(f"pretraining took {train_s / 60:.1f} min")
    write_result(args.out, {
        "benchmark": "quickstart",
        "settings": {"recipe": args.recipe, "overrides": args.overrides,
                     "checkpoint": args.checkpoint,
                     "epochs": cfg.optim.epochs, "batch_size": cfg.optim.batch_size,
                     "n_train": len(train_set.labels), "n_test": len(test_set.labels),
                     "knn": f"k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}, "
                            "bank = all training images, no augmentation"},
        "pretrain_seconds": train_s, "knn": rows, "linear": linear,
    })


def knn_pixels(train_xy, test_xy, transform, cfg) -> dict:
    """Raw-pixel baseline: the eval transform's normalised pixels as features."""
    feats = [torch.nn.functional.normalize(transform(x).reshape(len(x), -1).float(), dim=1)
             for x in (train_xy[0], test_xy[0])]
    return knn_evaluate(feats[0], train_xy[1], feats[1], test_xy[1], cfg.eval)


def linear_probes(ckpt: Path, random_model, cfg) -> dict:
    from ssl_sec.checkpoint import atomic_save
    from ssl_sec.evaluation.linear import linear_command

    out = {"trained": linear_command(ckpt, None, ["mode=features"])}
    state = load_checkpoint(ckpt)
    state["model"] = random_model.state_dict()
    random_ckpt = ckpt.with_name("random.pt")
    atomic_save(state, random_ckpt, sealed=True)
    out["random_init"] = linear_command(random_ckpt, None, ["mode=features"])
    return out


if __name__ == "__main__":
    main()

"""Step overhead: a full SimCLR step (GPU-side augmentation of a uint8 batch + model step)
vs the model's forward + backward + optimizer step alone on ready-made views, same batch.

    python eval/bench_step.py --recipe recipes/cifar10/simclr.yaml --repeats 3
    python eval/bench_step.py --recipe recipes/quickstart.yaml --batch 512 --repeats 5

Both variants run interleaved in one process on the same model and batch; the figure is the
ratio of medians. Target (issue 2): at most 1.15x on the CPU.
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

from ssl_sec.cpu_memory import keep_freed_memory  # noqa: E402
from ssl_sec.data import load_cifar  # noqa: E402
from ssl_sec.engine import build_augment, build_model, make_views, optimize_step  # noqa: E402
from ssl_sec.optim import build_optimizer  # noqa: E402
from ssl_sec.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/cifar10/simclr.yaml")
    ap.add_argument("--batch", type=int, default=None, help="default: the recipe's batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    keep_freed_memory()  # as the ssl-sec command does at start-up
    cfg = load_recipe(args.recipe, ["device=cpu"] + ([f"optim.batch_size={args.batch}"]
                                                    if args.batch else []))
    device = torch.device("cpu")
    torch.manual_seed(0)
    images = load_cifar("cifar10", train=True).images[: cfg.optim.batch_size].to(device)
    augment, _ = build_augment(cfg, device)
    model = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ready = make_views(augment, images)

    def full() -> None:
        v1, v2 = make_views(augment, images)
        optimize_step(model, v1, v2, optimizer, scaler, cfg, 0.5)

    def model_only() -> None:
        optimize_step(model, *ready, optimizer, scaler, cfg, 0.5)

    def aug_only() -> None:
        make_views(augment, images)

    times: dict[str, list[float]] = {"full_step": [], "model_step": [], "augment_only": []}
    fns = {"full_step": full, "model_step": model_only, "augment_only": aug_only}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["full_step"] / med["model_step"]
    name = Path(args.recipe).stem if Path(args.recipe).parent.name == "recipes" else \
        f"{Path(args.recipe).parent.name}_{Path(args.recipe).stem}"
    print(f"{args.recipe}: batch {cfg.optim.batch_size}, full step {med['full_step']:.3f} s, "
          f"model step {med['model_step']:.3f} s, augmentation {med['augment_only']:.3f} s, "
          f"ratio {ratio:.3f} (target <= 1.15)")
    write_result(args.out or f"eval/results/step_overhead_cpu_{name}.json", {
        "benchmark": "step_overhead",
        "settings": {"recipe": args.recipe, "batch_size": cfg.optim.batch_size,
                     "arch": cfg.model.arch, "cifar_stem": cfg.model.cifar_stem,
                     "optimizer": cfg.optim.name, "repeats": args.repeats, "device": "cpu"},
        "seconds_median": med, "seconds_all": times,
        "ratio_full_over_model": ratio, "target": 1.15, "meets_target": ratio <= 1.15,
    })


if __name__ == "__main__":
    main()

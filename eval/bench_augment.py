"""Benchmark ssl_sec's batched SimCLR views against lightly's per-image SimCLRTransform on the CPU.

    python eval/bench_augment.py [--batch 512 --repeats 7 --warmup 2 \
        --data ../shared/data --out eval/results/augment_cpu.json]

One batch of real CIFAR-10 training images; two SimCLR views per image with the CIFAR settings
(RandomResizedCrop 32 scale (0.08, 1), flip 0.5, colour jitter 0.8 x (0.4, 0.4, 0.4, 0.1),
greyscale 0.2, no blur, CIFAR-10 normalisation), in the same process on the same machine:

* ours: ``ViewAugment`` on the uint8 batch (B, 3, 32, 32), called twice (``TwoViews``);
* lightly: ``SimCLRTransform`` on one PIL image at a time, as a Dataset's ``__getitem__`` does
  (``Image.fromarray`` of the HWC array, as torchvision's CIFAR10 does, then the transform), and the
  views stacked into two (B, 3, 32, 32) tensors as the default collate does.

Each is timed as the median of ``--repeats`` runs after ``--warmup`` runs, first with torch's
default thread count, then with ``torch.set_num_threads(1)`` (lightly's per-image work is single
threaded either way; a DataLoader would spread it over worker processes). Results go to a JSON file
with the machine, the library versions and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import PIL
import torch
from lightly.transforms import SimCLRTransform
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, provenance  # noqa: E402

from ssl_sec.augment import TwoViews, ViewAugment
from ssl_sec.data import NORMALIZATION, load_cifar

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "size": 32,
    "crop_scale": (0.08, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "hflip_p": 0.5,
    "jitter_p": 0.8,
    "brightness": 0.4,
    "contrast": 0.4,
    "saturation": 0.4,
    "hue": 0.1,
    "gray_p": 0.2,
    "blur_p": 0.0,
    "solarize_p": 0.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_data = os.environ.get("SSL_SEC_DATA") or str(REPO.parent / "shared" / "data")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, default=Path(default_data), help="folder with cifar-10-batches-py"
    )
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "augment_cpu.json")
    return p.parse_args(argv)


def lightly_transform(mean, std) -> SimCLRTransform:
    # cj_strength scales lightly's default strengths (0.8, 0.8, 0.8, 0.2) to (0.4, 0.4, 0.4, 0.1).
    return SimCLRTransform(
        input_size=SETTINGS["size"],
        cj_prob=SETTINGS["jitter_p"],
        cj_strength=0.5,
        min_scale=SETTINGS["crop_scale"][0],
        random_gray_scale=SETTINGS["gray_p"],
        gaussian_blur=SETTINGS["blur_p"],
        hf_prob=SETTINGS["hflip_p"],
        normalize={"mean": list(mean), "std": list(std)},
    )


def time_runs(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.seed)
    data = load_cifar("cifar10", args.data, train=True)
    images = data.images[: args.batch].contiguous()  # (B, 3, 32, 32) uint8
    hwc = images.permute(0, 2, 3, 1).numpy()  # what torchvision's CIFAR10 holds per item
    mean, std = NORMALIZATION["cifar10"]

    ours = ViewAugment(mean=mean, std=std, **SETTINGS)
    theirs = lightly_transform(mean, std)

    def run_ours():
        return TwoViews(ours)(images)

    def run_lightly():
        views = [theirs(Image.fromarray(a)) for a in hwc]
        return torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])

    default_threads = torch.get_num_threads()
    seconds: dict[str, list[float]] = {}
    for threads in (default_threads, 1):
        torch.set_num_threads(threads)
        tag = "default_threads" if threads == default_threads else "threads_1"
        seconds[f"ours_{tag}"] = time_runs(run_ours, args.repeats, args.warmup)
        seconds[f"lightly_{tag}"] = time_runs(run_lightly, args.repeats, args.warmup)
    torch.set_num_threads(default_threads)

    # Same settings should give views with similar statistics; a sanity check, not a test.
    stats = {}
    for name, fn in (("ours", run_ours), ("lightly", run_lightly)):
        v = torch.cat(fn())
        stats[name] = {
            "mean": [round(float(m), 4) for m in v.mean((0, 2, 3))],
            "std": [round(float(s), 4) for s in v.std((0, 2, 3))],
        }

    ips = {k: args.batch / statistics.median(v) for k, v in seconds.items()}
    ratios = {
        "ours_default_threads_over_lightly": ips["ours_default_threads"]
        / ips["lightly_default_threads"],
        "ours_threads_1_over_lightly": ips["ours_threads_1"] / ips["lightly_threads_1"],
    }
    result = {
        "benchmark": "two SimCLR views per image, ssl_sec ViewAugment (batched) vs "
        "lightly SimCLRTransform (per PIL image), CPU",
        **provenance(pillow=PIL.__version__),
        "settings": {
            **SETTINGS,
            "batch": args.batch,
            "views": 2,
            "images": f"first {args.batch} CIFAR-10 training images",
            "mean": mean,
            "std": std,
            "repeats": args.repeats,
            "warmup_runs": args.warmup,
            "statistic": "median seconds per batch of two views",
            "lightly_args": "SimCLRTransform(input_size=32, cj_prob=0.8, cj_strength=0.5, "
            "min_scale=0.08, random_gray_scale=0.2, gaussian_blur=0.0, hf_prob=0.5, normalize=cifar10)",
            "lightly_timed": "Image.fromarray + transform per image + torch.stack of each view",
            "ours_timed": "ViewAugment called twice on the uint8 batch",
            "seed": args.seed,
        },
        "seconds": {k: {"median": statistics.median(v), "runs": v} for k, v in seconds.items()},
        "images_per_second": ips,
        "ratio": ratios,
        "target_ratio": 3.0,
        "view_stats": stats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"batch {args.batch}, two views, CIFAR-10 on {cpu_model()}")
    for k in seconds:
        print(
            f"  {k:24s} {ips[k]:9.0f} images/s  (median {statistics.median(seconds[k]) * 1e3:7.1f} ms)"
        )
    for k, r in ratios.items():
        print(f"  {k:36s} {r:5.2f}x  (target >= 3x: {'met' if r >= 3 else 'NOT met'})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

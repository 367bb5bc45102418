"""ImageNet-style folders on this machine: the streaming loader against the pipeline a lightly
user writes, the time to the first training step, and the memory of a streamed epoch.

    python eval/bench_imagefolder.py [--images 1200] [--big 10000] [--workers 2] \
        [--out eval/results/imagefolder_cpu.json]

The shared sample (`../shared/data/imagefolder-sample`) is 300 Imagenette JPEGs already shrunk
to 224x224, while ImageNet photos are about 500x375. This benchmark therefore BUILDS its test
folders by re-encoding those photos at 500x375 (bicubic upscale, JPEG quality 90): `--images`
of them for the loader comparison, `--big` (plus a 100-image val/) for start-up and memory. A
file differs from the photo it came from by a horizontal shift (and a mirror for odd copies),
so no two files are the same bytes; it says so in its output and in the JSON. (The builder is
eval/jpeg_folder.py, shared with the tests and the GPU benchmark.)

1. Loader throughput, 2-view batches delivered to the training device (the CPU here), at 224
   and 128 px, the same worker count for both:
   - ours: `data.mode: stream` (CropStream + StreamLoader): two random-resized crops per image
     cut from the full-resolution photo, uint8; and end to end with the device-side ops
     (flip, jitter, greyscale, blur, solarize of recipes/imagenet100/simclr.yaml) on the CPU;
   - reference: torchvision `ImageFolder` + lightly `SimCLRTransform(input_size)` in
     DataLoader workers: finished float views.
2. Seconds from the command to the first training step, `ssl-sec pretrain` on the big folder,
   `data.mode=stream` vs `memory` (decoded at 224 px).
3. Peak resident memory of one streamed epoch (loader only) on the small and the big folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402
from jpeg_folder import NOTE, build_jpeg_folder  # noqa: E402


def _rate(batches, n_batches: int, warmup: int, batch_size: int) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - t0)


def loader_throughput(folder: Path, size: int, workers: int, batch: int, n_batches: int) -> dict:
    import torch
    from lightly.transforms import SimCLRTransform
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from ssl_sec.data.index import build_index
    from ssl_sec.data.stream import CropStream, StreamLoader
    from ssl_sec.engine import build_augment
    from ssl_sec.recipe import load_recipe

    torch.set_num_threads(1)
    cfg = load_recipe(ROOT / "recipes/imagenet100/simclr.yaml",
                      [f"augment.size={size}", "data.classes_file=null", "device=cpu"])
    index = build_index(folder / "train")
    views = [(cfg.augment.crop_scale, cfg.augment.crop_ratio)] * 2
    cpu = torch.device("cpu")
    ours = StreamLoader(CropStream(index, size, views, 0), batch, torch.Generator().manual_seed(0),
                        cpu, workers=workers)
    ours.set_epoch(0)
    crops = _rate(ours, n_batches, 2, batch)
    augment, _ = build_augment(cfg, cpu, crop=False)

    def finished():
        for v1, v2, _ in ours:
            yield augment(v1, v2)

    end_to_end = _rate(finished(), n_batches, 1, batch)
    reference = ImageFolder(str(folder / "train"), transform=SimCLRTransform(input_size=size))
    loader = DataLoader(reference, batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0)
    theirs = _rate(loader, n_batches, 2, batch)
    return {"size": size, "workers": workers, "batch": batch, "timed_batches": n_batches,
            "ours_uint8_crops_images_per_s": crops,
            "ours_with_device_ops_on_cpu_images_per_s": end_to_end,
            "lightly_reference_images_per_s": theirs,
            "ratio_crops_vs_reference": crops / theirs,
            "ratio_end_to_end_vs_reference": end_to_end / theirs}


def time_to_first_step(folder: Path, mode: str, workdir: Path, workers: int) -> dict:
    """Launch `ssl-sec pretrain` and stop it once it logged its first step."""
    name = f"start-{mode}"
    run = workdir / "runs" / name
    shutil.rmtree(run, ignore_errors=True)  # a fresh run (an old metrics file would be read)
    cmd = [sys.executable, "-m", "ssl_sec", "pretrain", "recipes/imagenet100/simclr.yaml",
           f"data.root={folder}", "data.classes_file=null", f"data.mode={mode}",
           f"data.workers={workers}", "data.image_size=224", "optim.batch_size=32",
           "device=cpu", f"out_dir={workdir / 'runs'}", f"name={name}"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = run / "metrics.jsonl"
    first = None
    while proc.poll() is None and first is None:
        time.sleep(0.2)
        if metrics.is_file():
            rows = [json.loads(r) for r in metrics.read_text().splitlines() if r.strip()]
            first = next((r for r in rows if r["kind"] == "start"), None)
    proc.kill()
    proc.wait()
    if first is None or first["perf/first_step_unix_time"] < t0:
        raise SystemExit(f"{mode} run ended before its first step: {proc.stderr.read()[-2000:]}")
    return {"mode": mode, "seconds_from_command": first["perf/first_step_unix_time"] - t0,
            "seconds_inside_train": first["perf/seconds_to_first_step"], "command": " ".join(cmd)}


def streamed_epoch_memory(folder: Path, workers: int, batch: int, epochs: int = 1) -> dict:
    """Peak RSS of this process and of its (worker) children over `epochs` loader epochs,
    measured in a fresh process so nothing else is counted."""
    code = f"""
import json, resource, torch
from pathlib import Path
from ssl_sec.data.index import build_index
from ssl_sec.data.stream import CropStream, StreamLoader
torch.set_num_threads(1)
index = build_index(Path({str(folder / 'train')!r}))
loader = StreamLoader(CropStream(index, 224, [((0.08, 1.0), (0.75, 4 / 3))] * 2, 0), {batch},
                      torch.Generator().manual_seed(0), torch.device("cpu"), workers={workers})
n = 0
for epoch in range({epochs}):
    loader.set_epoch(epoch)
    n += sum(1 for _ in loader)
del loader
print(json.dumps({{"images": len(index), "epochs": {epochs}, "batches": n,
    "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--big", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=10, help="timed batches per loader")
    ap.add_argument("--workdir", default=None, help="where the folders are built (reused)")
    ap.add_argument("--out", default="eval/results/imagefolder_cpu.json")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ssl_sec_imagefolder_"))
    print(f"bench_imagefolder: {NOTE}; in {work}", flush=True)
    t0 = time.perf_counter()
    small = build_jpeg_folder(work / "small", args.images)
    big = build_jpeg_folder(work / "big", args.big, val=100)
    print(f"  folders built in {time.perf_counter() - t0:.0f} s", flush=True)
    result: dict = {"note": NOTE, "settings": vars(args) | {"workdir": str(work)}}
    result["throughput"] = []
    for size in (224, 128):
        row = loader_throughput(small, size, args.workers, args.batch, args.batches)
        result["throughput"].append(row)
        print(f"  {size} px: ours {row['ours_uint8_crops_images_per_s']:.0f} img/s (uint8 crops), "
              f"{row['ours_with_device_ops_on_cpu_images_per_s']:.0f} with the device ops on "
              f"the CPU; lightly {row['lightly_reference_images_per_s']:.0f} img/s -> "
              f"{row['ratio_crops_vs_reference']:.2f}x / {row['ratio_end_to_end_vs_reference']:.2f}x",
              flush=True)
    result["first_step"] = [time_to_first_step(big, mode, work, args.workers)
                            for mode in ("stream", "memory")]
    for row in result["first_step"]:
        print(f"  first step, {row['mode']}: {row['seconds_from_command']:.1f} s from the "
              f"command ({args.big:,} images)", flush=True)
    # Like for like: the small folder is read for as many batches as one epoch of the big one
    # (a worker's peak drifts with the number of images it decoded, not with the folder).
    repeat = max(1, round(args.big / args.images))
    result["memory"] = [streamed_epoch_memory(small, args.workers, args.batch, 1),
                        streamed_epoch_memory(small, args.workers, args.batch, repeat),
                        streamed_epoch_memory(big, args.workers, args.batch, 1)]
    for row in result["memory"]:
        print(f"  streamed: {row['images']:,} images x {row['epochs']} epoch(s), "
              f"{row['batches']} batches: main {row['main_peak_mib']:.0f} MiB, largest worker "
              f"{row['worker_peak_mib']:.0f} MiB peak RSS", flush=True)
    decoded = (args.big + 100) * 3 * 224 * 224 / 2**20
    result["memory_mode_decoded_set_mib"] = decoded
    print(f"  (memory mode holds the decoded set: {decoded:,.0f} MiB at 224 px)", flush=True)
    result["gpu_decode"] = "not measured: no GPU time was left in the session that wrote this"
    result["max_rss_this_process_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_result(args.out, result)


if __name__ == "__main__":
    main()

"""ImageNet-size throughput on one GPU: ssl_sec streamed against lightly's pipeline.

    python eval/bench_imagenet_gpu.py [--images 12800] [--epochs 2] [--workers N] \
        [--workdir DIR] [--deadline S] [--out FILE]
    python eval/bench_imagenet_gpu.py --build-only --workdir DIR   # the folder alone
    python eval/bench_imagenet_gpu.py --smoke --device cpu         # a check of the script

Data: no ImageNet here. The folder is BUILT from the 300 shared Imagenette photos (224x224),
re-encoded at ImageNet's typical 500x375 (eval/jpeg_folder.py), `--images` training files and
a `--val` folder for the kNN pass that ends each run; the output and the JSON say so.

1. ssl_sec streamed: the user's command, `python -m ssl_sec pretrain` with
   recipes/imagenet100/simclr.yaml (ResNet-18, batch 256) and simclr_resnet50.yaml (ResNet-50,
   batch 512) at 224 px, `data.decode=cpu` and `gpu`, for `--epochs` whole epochs. Images/s:
   images of an epoch over its seconds (CUDA events, `perf/epoch_seconds`), median of the
   epochs after the first (which starts the workers, records the views and autotunes). Each
   epoch starts with empty worker queues, so no prefetched batch is counted for free. GPU
   utilisation: NVML (else nvidia-smi) read every 0.25 s during those epochs. The ResNet-18
   runs go to the recipe's end (kNN on val/): the ImageNet-100 recipe's acceptance run; the
   ResNet-50 runs stop after their epochs (--max-epochs).
2. The loader alone: the StreamLoader the engine builds for each decode, batches delivered
   on the device (GPU decoding included), whole epochs.
3. lightly: torchvision `ImageFolder` + lightly `SimCLRTransform(224)` (the recipe's jitter and
   blur) in the same number of workers, with the same ResNet-18 / ResNet-50 + projection
   head, bf16 autocast and channels_last, batch 256 (eval/bench_gpu.py's reference pieces);
   images/s after the batches its workers prefetched are drained, and its loader alone.
4. The ImageNet-100 epoch (126,689 training images) those images/s imply: EXTRAPOLATED.

Each measurement runs in its own process with a timeout (`--run-timeout`, and what is left
of `--deadline`): a crash or a hang is recorded in the JSON and the others still run. The
JSON (eval/results/imagenet_gpu_<gpu>.json) is rewritten after every measurement.
Targets (issue 15; H100/H200, 16 cores): ResNet-18 >= 8,000 img/s, ResNet-50 >= 3,000 img/s,
>= 3x the lightly pipeline with the same model on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, gpu_slug, usable_cores, write_result  # noqa: E402
from jpeg_folder import NOTE, build_jpeg_folder  # noqa: E402

IMAGENET100_TRAIN = 126_689
RECIPES = {"resnet18": "recipes/imagenet100/simclr.yaml",
           "resnet50": "recipes/imagenet100/simclr_resnet50.yaml"}
DECODES = ("cpu", "gpu")
TARGETS = {"resnet18_images_per_s": 8000, "resnet50_images_per_s": 3000,
           "ratio_vs_lightly": 3.0}
# --smoke: a tiny folder, small views and batches, one worker (a check of the script only).
# One torch thread per process: on a small shared CPU the main process, its worker and
# everything else oversubscribe the cores, and OpenMP's waiting threads then slow each step
# several times (measured here: a ResNet-50 step 4x slower with 2 threads than with 1).
SMOKE = {"images": 8, "val": 4, "epochs": 2, "workers": 1, "lightly_steps": 1,
         "lightly_warmup": 1, "overrides": ["augment.size=32", "optim.batch_size=8"],
         "env": {"OMP_NUM_THREADS": "1"}}
UTIL_PERIOD_S = 0.25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12_800, help="training JPEGs to build")
    ap.add_argument("--val", type=int, default=500, help="val/ JPEGs (the kNN pass at the end)")
    ap.add_argument("--epochs", type=int, default=2,
                    help="whole epochs per ssl_sec run; the first is not counted")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers of every pipeline (default: all usable cores)")
    ap.add_argument("--lightly-steps", type=int, default=20,
                    help="timed steps of the lightly reference after its warm-up")
    ap.add_argument("--archs", default="resnet18,resnet50", help="which recipes to run")
    ap.add_argument("--workdir", default=None, help="where the folder is built (and reused)")
    ap.add_argument("--run-timeout", type=float, default=120.0,
                    help="seconds each measurement may take before it is killed")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds for the whole benchmark (0: none); measurements that no "
                         "longer fit are recorded as skipped")
    ap.add_argument("--out", default=None,
                    help="default: eval/results/imagenet_gpu_<gpu>.json (--smoke: not saved)")
    ap.add_argument("--smoke", action="store_true",
                    help="check the script end to end in a minute or two on any device; its "
                         "figures mean nothing and are saved only with --out")
    ap.add_argument("--device", default="cuda", help="cuda (default) or, with --smoke, cpu")
    ap.add_argument("--build-only", action="store_true", help="build the folder and stop")
    ap.add_argument("--child", choices=("loader", "lightly"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- processes
_RUNNING: list[subprocess.Popen] = []  # the measurement in progress


def _stop_on_term(signum: int, _frame) -> None:
    """SIGTERM (gpu_check.sh's stage timeout): the measurement runs in its own session, out
    of reach of a signal sent to this process group, so end it here before going."""
    for proc in _RUNNING:
        os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(128 + signum)


def run_process(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run `cmd` in its own session (its DataLoader workers with it), output to `log`; on
    timeout kill the whole session. Returns status ok / failed / timeout and the log's tail."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), "PYTHONUNBUFFERED": "1",
        **(env or {})}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        _RUNNING.append(proc)
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, "timeout"
        finally:
            _RUNNING.remove(proc)
            # The whole session: a hung run, or workers a failed run left behind, must not
            # take the cores and the GPU from the next measurement.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    result = {"status": status, "exit_code": code, "wall_seconds": time.perf_counter() - t0,
              "log": str(log)}
    if status != "ok":
        result["log_tail"] = log.read_text(errors="replace").splitlines()[-15:]
    return result


def run_child(kind: str, spec: dict, log: Path, timeout: float) -> dict:
    """This script in a child process (`--child kind`): its JSON result plus how it ended."""
    result_file = log.with_suffix(".json")
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind,
           "--spec", json.dumps({**spec, "result": str(result_file)})]
    ended = run_process(cmd, log, timeout, spec.get("env"))
    out = json.loads(result_file.read_text()) if result_file.is_file() else {}
    return {**out, **ended}


# ----------------------------------------------------------------------------- GPU utilisation
def utilization_reader(device: str):
    """(read() -> percent, source) for the GPU the runs use, or (None, why not)."""
    if not device.startswith("cuda"):
        return None, "not a GPU run"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    index = int(visible) if visible.isdigit() else 0
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetUtilizationRates(handle)
        return (lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), "NVML"
    except Exception as err:  # no pynvml, or no NVML under this container: try the CLI
        nvml_error = f"{type(err).__name__}: {err}"
    query = ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu",
             "--format=csv,noheader,nounits"]

    def smi() -> int:
        return int(subprocess.run(query, capture_output=True, text=True, timeout=5,
                                  check=True).stdout.split()[0])

    try:
        smi()
        return smi, "nvidia-smi"
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as err:
        return None, f"not measured: NVML ({nvml_error}) and nvidia-smi ({err}) unavailable"


class UtilizationSampler(threading.Thread):
    """Reads the GPU utilisation every UTIL_PERIOD_S, each reading tagged with the last row
    of the run's metrics.jsonl, so that the readings can be cut to the steady epochs."""

    def __init__(self, read, metrics: Path):
        super().__init__(daemon=True)
        self.read, self.metrics = read, metrics
        self.samples: list[tuple[int, str, int]] = []  # (percent, row kind, row step)
        self.done = threading.Event()

    def last_row(self) -> tuple[str, int]:
        try:
            lines = self.metrics.read_text().splitlines()
            row = json.loads(lines[-1]) if lines else {}
        except (OSError, ValueError):  # not there yet, or a line being written
            return "", 0
        return row.get("kind", ""), row.get("step", 0)

    def run(self) -> None:
        while not self.done.wait(UTIL_PERIOD_S):
            try:
                self.samples.append((self.read(), *self.last_row()))
            except Exception:  # noqa: BLE001 - a failed reading is a missing sample
                continue

    def steady(self, steps_per_epoch: int) -> dict | None:
        """Readings from the second epoch's first logged step to the last epoch's end; the
        checkpoint written between epochs (after an "epoch" row) is left out."""
        values = [u for u, kind, step in self.samples
                  if kind == "train" and step > steps_per_epoch]
        if not values:
            return None
        return {"mean_percent": statistics.mean(values), "median_percent": statistics.median(values),
                "min_percent": min(values), "samples": len(values),
                "period_s": UTIL_PERIOD_S}


# ----------------------------------------------------------------------------- 1. ssl_sec
def ssl_sec_command(recipe: str, decode: str, ctx: dict, name: str, final_knn: bool
                    ) -> list[str]:
    """The user's command for one recipe and decode on the built folder. Without `final_knn`
    the run is one epoch longer and stopped by --max-epochs before its end-of-run kNN pass
    (seconds of feature extraction that measure nothing here)."""
    epochs = ctx["epochs"] if final_knn else ctx["epochs"] + 1
    stop = [] if final_knn else ["--max-epochs", str(ctx["epochs"])]
    return [sys.executable, "-m", "ssl_sec", "pretrain", recipe, f"data.root={ctx['folder']}",
            "data.classes_file=null", f"data.workers={ctx['workers']}", f"data.decode={decode}",
            f"optim.epochs={epochs}", "optim.warmup_epochs=1", "eval.knn_every=0",
            "log_every=5", f"device={ctx['device']}", f"out_dir={ctx['work'] / 'runs'}",
            f"name={name}", *ctx["overrides"], *stop]


def measure_ssl_sec(arch: str, decode: str, ctx: dict, timeout: float) -> dict:
    """One `ssl-sec pretrain` run: whole-epoch images/s, start-up, GPU utilisation."""
    from ssl_sec.recipe import load_recipe

    recipe = RECIPES[arch]
    cfg = load_recipe(ROOT / recipe, ctx["overrides"])
    name = f"{arch}-{decode}"
    run = ctx["work"] / "runs" / name
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: an old metrics file would be read
    # ResNet-18 runs the ImageNet-100 recipe to its end (the kNN pass on the streamed val/
    # too): they are also the acceptance run of the recipe on this machine.
    final_knn = arch == "resnet18"
    cmd = ssl_sec_command(recipe, decode, ctx, name, final_knn)
    steps = ctx["train_images"] // cfg.optim.batch_size
    out = {"arch": arch, "decode": decode, "recipe": recipe, "batch_size": cfg.optim.batch_size,
           "images_per_epoch": steps * cfg.optim.batch_size, "final_knn": final_knn,
           "command": " ".join(cmd[1:]).replace(str(ROOT) + "/", "")}
    sampler = None
    if ctx["util_read"] is not None:
        sampler = UtilizationSampler(ctx["util_read"], run / "metrics.jsonl")
        sampler.start()
    out |= run_process(cmd, ctx["work"] / "logs" / f"{name}.log", timeout, ctx["env"])
    if sampler is not None:
        sampler.done.set()
        sampler.join()
        out["gpu_utilization"] = sampler.steady(steps)
    rows = _rows(run / "metrics.jsonl")
    epoch_s = [r["perf/epoch_seconds"] for r in rows if r["kind"] == "epoch"]
    start = next((r for r in rows if r["kind"] == "start"), {})
    knn = [r for r in rows if r["kind"] == "knn"]
    out |= {"epoch_seconds": epoch_s, "seconds_to_first_step": start.get("perf/seconds_to_first_step"),
            "knn_top1_meaningless": knn[-1]["knn/top1"] if knn else None}
    if out["status"] == "ok" and epoch_s:
        steady = statistics.median(epoch_s[1:]) if len(epoch_s) > 1 else epoch_s[0]
        out |= {"steady_epoch_seconds": steady, "images_per_s": out["images_per_epoch"] / steady}
    return out


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- 2. loader alone
def child_loader(spec: dict) -> dict:
    """Whole epochs of the StreamLoader the engine builds (engine.data_pipeline's streaming
    branch), per decode; batches are on the device when counted."""
    import torch

    from ssl_sec.data import load_splits
    from ssl_sec.data.stream import BytesStream, CropStream, StreamLoader
    from ssl_sec.recipe import load_recipe

    device = torch.device(spec["device"])
    out = {}
    for decode in spec["decodes"]:
        cfg = load_recipe(ROOT / RECIPES["resnet18"],
                          [f"data.root={spec['folder']}", "data.classes_file=null",
                           f"data.workers={spec['workers']}", f"data.decode={decode}",
                           *spec["overrides"]])
        index = load_splits(cfg.data).pretrain.index
        second = cfg.augment2 or cfg.augment
        crops = [(cfg.augment.crop_scale, cfg.augment.crop_ratio),
                 (second.crop_scale, second.crop_ratio)]
        kind = BytesStream if decode == "gpu" else CropStream
        loader = StreamLoader(kind(index, cfg.augment.size, crops, cfg.seed), cfg.optim.batch_size,
                              torch.Generator().manual_seed(0), device, workers=spec["workers"])
        seconds = []
        for epoch in range(spec["epochs"]):
            loader.set_epoch(epoch)
            t0 = time.perf_counter()
            for _ in loader:
                pass
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
            print(f"loader decode={decode} epoch {epoch}: {seconds[-1]:.2f} s", flush=True)
        images = len(loader) * cfg.optim.batch_size
        out[decode] = {"batch_size": cfg.optim.batch_size, "images_per_epoch": images,
                       "epoch_seconds": seconds, "first_epoch_note": "starts the workers",
                       "images_per_s": images / statistics.median(seconds[1:] or seconds)}
        del loader  # its workers go before the next decode's start
    return out


# ----------------------------------------------------------------------------- 3. lightly
def child_lightly(spec: dict) -> dict:
    """lightly's ImageFolder pipeline in the same workers: its loader alone, then a training
    step with each recipe's model (eval/bench_gpu.py's reference pieces).

    One loader at ResNet-18's batch (256, also lightly's own ImageNet-100 benchmark batch)
    serves every phase, each re-drained before it is timed: the pipeline is bound by the
    host CPU's PIL work, and ResNet-50's 512 would double the warm-up's images for the same
    figure."""
    import bench_gpu
    import torch
    from torchvision.datasets import ImageFolder

    from ssl_sec.recipe import load_recipe
    from ssl_sec.runtime import backends

    device = bench_gpu.DEVICE = torch.device(spec["device"])
    workers, steps = spec["workers"], spec["steps"]
    warmup = spec.get("warmup") or bench_gpu.default_warmup(workers)
    cfg = load_recipe(ROOT / RECIPES["resnet18"], spec["overrides"])
    second = cfg.augment2 or cfg.augment
    # One transform for both views: the blur probability is the mean of the recipe's two.
    blur = (cfg.augment.blur_p + second.blur_p) / 2
    transform = bench_gpu.lightly_transform(cfg.augment, "imagefolder", blur)
    dataset = ImageFolder(str(Path(spec["folder"]) / "train"), transform=transform)
    batch = cfg.optim.batch_size
    loader = bench_gpu.lightly_loader(dataset, batch, workers, warmup + steps)
    out: dict = {
        "workers": workers, "batch_size": batch, "warmup_steps": warmup, "steps": steps,
        "transform": f"torchvision ImageFolder + lightly SimCLRTransform(input_size="
                     f"{cfg.augment.size}, cj_prob={cfg.augment.jitter_p}, cj 0.4/0.4/0.2/0.1, "
                     f"min_scale={cfg.augment.crop_scale[0]}, gray {cfg.augment.gray_p}, blur p "
                     f"{blur:g}, no solarize), PIL per image in workers",
        "model": "the recipe's torchvision backbone + lightly SimCLRProjectionHead, NTXentLoss, "
                 "lightly LARS, bf16 autocast, channels_last", "models": {}}
    with backends(device, deterministic=False):
        out["loader_only_images_per_s"] = bench_gpu.time_lightly(loader, batch, warmup, steps)
        print(f"lightly loader alone: {out['loader_only_images_per_s']:,.1f} img/s", flush=True)
        for arch in spec["archs"]:
            step = bench_gpu.lightly_step(load_recipe(ROOT / RECIPES[arch], spec["overrides"]),
                                          device)
            ips = bench_gpu.time_lightly(loader, batch, warmup, steps, step)
            out["models"][arch] = {"batch_size": batch, "images_per_s": ips}
            print(f"lightly {arch}: {ips:,.1f} img/s", flush=True)
            del step
    return out


# ----------------------------------------------------------------------------- report
def extrapolate(rows: list[dict]) -> dict:
    """The ImageNet-100 epoch each measured images/s implies (EXTRAPOLATED)."""
    return {"images": IMAGENET100_TRAIN,
            "note": f"extrapolated: {IMAGENET100_TRAIN:,} / the images/s measured on the built "
                    "folder (not a run on ImageNet-100)",
            "minutes": {f"{r['arch']}/{r['decode']}": IMAGENET100_TRAIN / r["images_per_s"] / 60
                        for r in rows if r.get("images_per_s")}}


def verdicts(result: dict) -> list[dict]:
    """One row per ssl_sec run: images/s, ratio to lightly with the same model, pass/fail."""
    lightly = (result.get("lightly") or {}).get("models", {})
    rows = []
    for r in result["ssl_sec"]:
        ips = r.get("images_per_s")
        ref = lightly.get(r["arch"], {}).get("images_per_s")
        target = TARGETS[f"{r['arch']}_images_per_s"]
        ratio = ips / ref if ips and ref else None
        rows.append({"arch": r["arch"], "decode": r["decode"], "status": r["status"],
                     "whole_epochs_trained": len(r.get("epoch_seconds", [])), "images_per_s": ips, "target_images_per_s": target,
                     "meets_images_per_s": bool(ips and ips >= target),
                     "lightly_images_per_s": ref, "ratio_vs_lightly": ratio,
                     "meets_ratio": bool(ratio and ratio >= TARGETS["ratio_vs_lightly"])})
    return rows


def table(result: dict) -> str:
    def num(x, fmt=",.0f", unit=""):
        return "-" if x is None else f"{x:{fmt}}{unit}"

    util = {(r["arch"], r["decode"]): r.get("gpu_utilization") for r in result["ssl_sec"]}
    minutes = result["imagenet100_epoch"]["minutes"]
    loader = result.get("loader_only") or {}
    rows = [("arch / decode", "status", "img/s", "target", "met", "loader alone", "GPU util",
             "lightly img/s", "ratio (>= 3x)", "met", "IN-100 epoch (extrap.)")]
    for v in result["verdicts"]:
        key = (v["arch"], v["decode"])
        u = util.get(key)
        rows.append((f"{v['arch']} / {v['decode']}", v["status"], num(v["images_per_s"]),
                     f">= {v['target_images_per_s']:,}", "yes" if v["meets_images_per_s"] else "NO",
                     num(loader.get(v["decode"], {}).get("images_per_s")),
                     "-" if not u else f"{u['mean_percent']:.0f}%",
                     num(v["lightly_images_per_s"]), num(v["ratio_vs_lightly"], ".2f", "x"),
                     "yes" if v["meets_ratio"] else "NO",
                     num(minutes.get(f"{v['arch']}/{v['decode']}"), ".1f", " min")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def gpu_info(device: str) -> dict | None:
    import torch

    if not device.startswith("cuda"):
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}


# ----------------------------------------------------------------------------- main
class Budget:
    """Each measurement's timeout: --run-timeout, cut to what is left of --deadline."""

    def __init__(self, run_timeout: float, deadline: float):
        self.run_timeout = run_timeout
        self.end = time.monotonic() + deadline if deadline > 0 else None

    def next(self) -> float | None:
        """Seconds for the next measurement, or None when too little is left to start one."""
        if self.end is None:
            return self.run_timeout
        left = self.end - time.monotonic() - 5  # 5 s to kill, read and write the result
        return min(self.run_timeout, left) if left >= 15 else None


def settings(args: argparse.Namespace, device: str) -> dict:
    if args.smoke:
        return {"images": SMOKE["images"], "val": SMOKE["val"], "epochs": SMOKE["epochs"],
                "workers": SMOKE["workers"], "lightly_steps": SMOKE["lightly_steps"],
                "lightly_warmup": SMOKE["lightly_warmup"], "overrides": SMOKE["overrides"],
                "env": SMOKE["env"], "device": device}
    return {"images": args.images, "val": args.val, "epochs": args.epochs,
            "workers": args.workers or usable_cores(), "lightly_steps": args.lightly_steps,
            "lightly_warmup": None, "overrides": [], "env": {}, "device": device}


def build(work: Path, s: dict) -> tuple[Path, float]:
    t0 = time.perf_counter()
    folder = build_jpeg_folder(work / "folder", s["images"], val=s["val"])
    return folder, time.perf_counter() - t0


def save(result: dict, args: argparse.Namespace) -> None:
    """Write the JSON (also after each measurement: a run stopped from outside keeps what it
    measured). --smoke writes only to an explicit --out."""
    if args.smoke and not args.out:
        return
    name = (result["gpu"] or {}).get("name", "cpu")
    path = args.out or f"eval/results/imagenet_gpu_{gpu_slug(name)}.json"
    result["verdicts"] = verdicts(result)
    result["imagenet100_epoch"] = extrapolate(result["ssl_sec"])
    write_result(path, result)


def measure(args: argparse.Namespace, s: dict, work: Path, folder: Path, built_s: float,
            budget: Budget) -> dict:
    device = s["device"]
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    decodes = [d for d in DECODES if d == "cpu" or device.startswith("cuda")]
    read, util_source = utilization_reader(device)
    ctx = {"folder": folder, "work": work, "device": device, "workers": s["workers"],
           "epochs": s["epochs"], "overrides": s["overrides"], "train_images": s["images"],
           "env": s["env"], "util_read": read}
    result: dict = {
        "note": f"{NOTE}; {s['images']:,} train + {s['val']:,} val JPEGs at 500x375, built on "
                "this machine from the shared sample (not ImageNet)",
        "data": {"folder": str(folder), "train_images": s["images"], "val_images": s["val"],
                 "size": "500x375", "build_seconds": built_s},
        "gpu": gpu_info(device), "gpu_utilization_source": util_source,
        "settings": {**s, "archs": archs, "decodes": decodes, "smoke": args.smoke,
                     "run_timeout_s": args.run_timeout, "deadline_s": args.deadline},
        "targets": TARGETS, "ssl_sec": [], "loader_only": None, "lightly": None,
        "skipped": [f"decode=gpu: needs CUDA (device {device})"] if "gpu" not in decodes else []}
    child = {"folder": str(folder), "device": device, "workers": s["workers"],
             "overrides": s["overrides"], "env": s["env"]}
    # What does not go through the training path first (a hang there, issue 15, must not cost
    # the reference figures); then ResNet-18, then ResNet-50.
    plan = [("loader_only", lambda t: run_child(
                "loader", {**child, "decodes": decodes, "epochs": 2},
                work / "logs" / "loader.log", t))]
    plan += [("lightly", lambda t: run_child(
                "lightly", {**child, "archs": archs, "steps": s["lightly_steps"],
                            "warmup": s["lightly_warmup"]}, work / "logs" / "lightly.log", t))]
    plan += [((a, d), lambda t, a=a, d=d: measure_ssl_sec(a, d, ctx, t)) for a in archs
             for d in decodes]
    for key, run in plan:
        timeout = budget.next()
        label = key if isinstance(key, str) else f"ssl_sec {key[0]} decode={key[1]}"
        if timeout is None:
            result["skipped"].append(f"{label}: out of time (--deadline {args.deadline:g} s)")
            print(f"bench_imagenet_gpu: {label} skipped: out of time", flush=True)
            continue
        print(f"bench_imagenet_gpu: {label} (timeout {timeout:.0f} s) ...", flush=True)
        row = run(timeout)
        if isinstance(key, str):
            result[key] = row
        else:
            result["ssl_sec"].append(row)
        print(f"bench_imagenet_gpu: {label}: {row['status']} in {row['wall_seconds']:.1f} s "
              f"{_headline(row)}", flush=True)
        save(result, args)
    result["verdicts"] = verdicts(result)
    result["imagenet100_epoch"] = extrapolate(result["ssl_sec"])
    return result


def _headline(row: dict) -> str:
    if row.get("images_per_s"):
        return f"{row['images_per_s']:,.0f} img/s"
    if row["status"] != "ok":
        return "| " + " | ".join(row.get("log_tail", [])[-3:])
    return json.dumps({k: v for k, v in row.items() if k not in ("log", "status")})[:200]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.spec)
        result = (child_loader if args.child == "loader" else child_lightly)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return
    device = args.device
    if not args.smoke and not args.build_only and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench_imagenet_gpu.py: no CUDA GPU visible; run it on a GPU machine "
                     "(scripts/gpu_check.sh), or check the script with --smoke --device cpu")
    elif not args.smoke and not args.build_only:
        sys.exit("bench_imagenet_gpu.py: measurements need --device cuda (or use --smoke)")
    signal.signal(signal.SIGTERM, _stop_on_term)
    budget = Budget(args.run_timeout, args.deadline)  # from the start: building counts too
    s = settings(args, device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ssl_sec_imagenet_gpu_")).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"bench_imagenet_gpu: building {s['images']:,} + {s['val']:,} JPEGs at 500x375 in "
          f"{work / 'folder'}: {NOTE}", flush=True)
    folder, built_s = build(work, s)
    print(f"bench_imagenet_gpu: folder ready in {built_s:.1f} s", flush=True)
    if args.build_only:
        return
    result = measure(args, s, work, folder, built_s, budget)
    save(result, args)
    name = (result["gpu"] or {}).get("name", device)
    print(f"\nImageNet-size throughput on {name}, {s['workers']} workers, folder of "
          f"{s['images']:,} built JPEGs (500x375)"
          + ("  [SMOKE RUN: figures mean nothing]" if args.smoke else ""))
    print(table(result))
    print(result["imagenet100_epoch"]["note"])
    for line in result["skipped"]:
        print(f"skipped: {line}")
    # A measurement that failed, hung or did not fit is an error of the run (the targets are
    # reported in the table, not here); gpu_check.sh counts the stage as failed.
    runs = [result["loader_only"], result["lightly"], *result["ssl_sec"]]
    broken = [r for r in runs if r is None or r["status"] != "ok"]
    if broken or any("out of time" in line for line in result["skipped"]):
        sys.exit(f"bench_imagenet_gpu.py: {len(broken)} measurement(s) failed or were not run; "
                 f"logs in {work / 'logs'}")


if __name__ == "__main__":
    main()

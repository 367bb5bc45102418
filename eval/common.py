"""Shared provenance for benchmark results: machine, versions, git revision."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def usable_cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100_80gb_hbm3': the <gpu> of eval/results/*_<gpu>.json."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_")


def provenance(**extra_versions: str) -> dict:
    """Machine, library versions (plus `extra_versions`), git revision and the command."""
    import kornia
    import lightly
    import numpy
    import torch
    import torchvision

    try:
        if os.environ.get("SSL_SEC_GIT_REV"):  # a copied tree without its own git metadata
            raise OSError
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "ssl_sec", "eval"],
                                    cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        rev, dirty = os.environ.get("SSL_SEC_GIT_REV", "unknown"), False
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": rev + ("+dirty" if dirty else ""),
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        # The host CPU is part of every GPU figure that a DataLoader feeds (the lightly
        # reference is bound by it), so both its model and the cores this run had are kept.
        "machine": {"platform": platform.platform(), "cpu_model": cpu_model(),
                    "cpu_count": os.cpu_count(), "cpu_cores_usable": usable_cores(),
                    "torch_threads": torch.get_num_threads(), "gpu": gpu},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "kornia": kornia.__version__,
                     "lightly": lightly.__version__, "numpy": numpy.__version__,
                     **extra_versions},
    }


def write_result(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    if not path.is_absolute():
        path = ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**provenance(), **payload}, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


# The CPU-sized protocol used by the ablations: the quick-start recipe (ResNet-18 with the
# ImageNet stem at 32x32) on the first 10,000 CIFAR-10 training images for 2 epochs; kNN
# (k=200, T=0.1) with those 10,000 images as the bank and the full 10,000-image test set.
CPU_SMALL = ["data.train_subset=10000", "optim.epochs=2", "eval.knn_every=0", "log_every=20"]


def run_training(recipe: str, overrides: list[str], out_dir: str | Path, name: str) -> dict:
    """Train one recipe in this process (quietly) and return its final kNN result."""
    import contextlib
    import io

    from ssl_sec.cpu_memory import keep_freed_memory
    from ssl_sec.engine import train
    from ssl_sec.recipe import load_recipe

    keep_freed_memory()  # as the ssl-sec command does at start-up

    cfg = load_recipe(ROOT / recipe, [*overrides, f"out_dir={out_dir}", f"name={name}"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = train(cfg, progress_bar=False)
    last = [line for line in buf.getvalue().splitlines() if line.startswith("epoch ")]
    print(f"  {name}: {last[-1] if last else ''}", flush=True)
    return result

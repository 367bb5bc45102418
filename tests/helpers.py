"""Settings shared by the test modules that train for real on a CIFAR-10 subset, and the
`ssl-sec` command as the tests run it."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import torch

from ssl_sec.recipe import Config, from_dict

# ResNet-18 with the ImageNet stem at 32x32, 4 steps of 32 images an epoch, keeps these runs
# to seconds on two cores.
SMALL = ["data.train_subset=128", "data.test_subset=200", "model.cifar_stem=false",
         "model.proj_hidden_dim=128", "model.proj_output_dim=32", "optim.batch_size=32",
         "optim.name=sgd", "optim.lr=0.1", "optim.warmup_epochs=0.5", "eval.knn_every=1",
         "eval.knn_k=20", "log_every=2", "ckpt_every=1"]


# Subprocesses are waited for until they end (or, in tests/test_faults.py, until the event a
# test needs); this deadline only has to catch a hang, and a loaded CI machine runs them many
# times slower than an idle one.
DEADLINE_S = 900


def small_cfg(tmp_path, *extra: str) -> Config:
    """A 2-epoch run of SMALL in tmp_path; `extra` are dotted overrides."""
    return from_dict({}, SMALL + [f"out_dir={tmp_path}", "optim.epochs=2", *extra])


@torch.no_grad()
def queue_keys(moco) -> torch.Tensor:
    """A MoCo queue's stored keys, oldest first. Shape (min(steps * B, K), d)."""
    n = int(moco.queue_len)
    if n < moco.queue.shape[0]:
        return moco.queue[:n].clone()
    return torch.roll(moco.queue, -int(moco.queue_ptr), dims=0)


# float32's machine epsilon, 2**-23 (about 1.19e-7): the relative size of one rounding.
EPS32 = torch.finfo(torch.float32).eps


def f32_rtol(terms: int = 1, ulps: float = 4.0) -> float:
    """A relative tolerance for float32 results that two computations may round differently
    (a fused against an unfused formula, another CPU's vector width or BLAS blocking):
    `ulps` roundings for each of the `terms` summed into a value."""
    return ulps * terms * EPS32


def f32_close(expected: torch.Tensor, terms: int = 1, ulps: float = 4.0) -> dict[str, float]:
    """rtol and atol for torch.testing.assert_close(actual, expected, **f32_close(expected, n)).

    rtol is f32_rtol(terms, ulps); atol is the same fraction of the largest magnitude in
    `expected`, for entries that cancel to near 0: such an entry still carries the rounding
    error of the large terms it was summed from, which a pure rtol would not allow."""
    rtol = f32_rtol(terms, ulps)
    return {"rtol": rtol, "atol": rtol * float(expected.detach().abs().max())}


ROOT = Path(__file__).resolve().parents[1]


def rewrite_checkpoint(path: Path, ckpt: dict) -> None:
    """Write `ckpt` (changed after `load_checkpoint`) back to `path`, sealed anew as a writer
    would: the change is then what the loader meets, not a broken seal."""
    from ssl_sec.checkpoint import atomic_save

    atomic_save(ckpt, path, sealed=True)


def run_cli(*args: str, process: bool = False, cwd: Path = ROOT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ssl-sec ARGS` run from `cwd`: in a new interpreter (`process=True`: what a user
    runs) or in this one. A new interpreter spends about 7 s of a 2-core CPU importing torch
    and torchvision, most of what an error-path test costs. So each command's error path runs
    once in a real process (no traceback and no stray line from anything the process
    imports), and its other cases here: the same code, exit code and printed lines."""
    if process:
        return subprocess.run([sys.executable, "-m", "ssl_sec", *args], cwd=cwd,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                              capture_output=True, text=True, timeout=DEADLINE_S)
    from ssl_sec import cli

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(args))
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck"]


def stl10_pixels(n: int, offset: int = 0):
    """uint8 (n, 3, 96, 96), rows first: pixel (i, c, row, col) = 37 (offset + i) + 80 c +
    row + 3 col (mod 256). Row and column count differently, so a reader that forgets the
    files' column-major channels gets other values."""
    import numpy as np

    i = (37 * (offset + np.arange(n)) % 256).astype(np.uint8).reshape(n, 1, 1, 1)
    c = (80 * np.arange(3) % 256).astype(np.uint8).reshape(1, 3, 1, 1)
    row = (np.arange(96) % 256).astype(np.uint8).reshape(1, 1, 96, 1)
    col = (3 * np.arange(96) % 256).astype(np.uint8).reshape(1, 1, 1, 96)
    return i + c + row + col  # uint8 arithmetic wraps: mod 256


def write_stl10(root: Path, train: int = 6, test: int = 4, unlabeled: int = 5) -> Path:
    """Tiny STL-10 in the official binary format in root/stl10_binary: images stl10_pixels
    (train from offset 0, test from 1000, unlabeled from 2000), each channel written
    column-major; labels 1..10 on disk (image i of a labelled split: i % 10 + 1)."""
    import numpy as np

    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", train, 0), ("test", test, 1000),
                             ("unlabeled", unlabeled, 2000)):
        pixels = stl10_pixels(n, offset)
        (folder / f"{split}_X.bin").write_bytes(pixels.transpose(0, 1, 3, 2).tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes((np.arange(n) % 10 + 1).astype(np.uint8)
                                                    .tobytes())
    (folder / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    return folder

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

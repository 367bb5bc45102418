"""A failure never hangs, and a speed optimisation never stops a run.

- An exception in a training process (a bug, a failed collective, a CUDA error) ends it with a
  non-zero exit code within seconds, even when something in the process would block an
  ordinary interpreter exit forever; its DataLoader workers are gone and no checkpoint is
  written after the failure.
- Out of memory is one line naming the batch size and the memory, with the fix, exit 2.
- A CUDA-graph recording of the views that fails is one warning line, then the views are made
  op by op with the same values (tested here by making the recording raise; the GPU suite
  records for real).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_sec import augment, cli, engine
from ssl_sec.augment import ViewAugment
from ssl_sec.checkpoint import load_checkpoint
from ssl_sec.data import NORMALIZATION

ROOT = Path(__file__).resolve().parents[1]
INJECT = ROOT / "tests" / "tools" / "fault_inject.py"
# The bound: a failed process is gone this many seconds after its failure.
EXIT_WITHIN_S = 10.0


def streamed_run(out: Path, sample: Path, device: str = "cpu") -> list[str]:
    """A streamed image folder read by 2 DataLoader workers, a checkpoint after every step."""
    return ["pretrain", "recipes/quickstart.yaml", f"device={device}",
            "data.dataset=imagefolder", f"data.root={sample}", "data.mode=stream",
            "data.workers=2", "augment.size=32", "data.test_subset=60", "optim.batch_size=32",
            "model.proj_hidden_dim=64", "model.proj_output_dim=16", "optim.epochs=1",
            "eval.knn_every=0", "eval.knn_k=10", "log_every=1", "ckpt_every_steps=1",
            "ckpt_every_minutes=0", f"out_dir={out}", "name=run"]


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def fail_a_streamed_run(tmp_path: Path, sample: Path, fault: str, device: str = "cpu"
                        ) -> tuple[subprocess.CompletedProcess, dict]:
    """Step 3 of a streamed run fails (`fault`, tests/tools/fault_inject.py); at that moment a
    thread starts that would block an ordinary interpreter exit forever. Checks what every
    failure must give: exit code 1 within EXIT_WITHIN_S of the failure, the workers that were
    reading gone, last.pt from step 2 (nothing saved after the failure). Returns the process
    and the failure's record."""
    record = tmp_path / "failure.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "FAULT_RECORD": str(record)}
    cmd = [sys.executable, str(INJECT), fault, "3", "--",
           *streamed_run(tmp_path, sample, device)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    ended = time.time()
    assert proc.returncode == 1, proc.stderr[-3000:]
    failure = json.loads(record.read_text())
    assert ended - failure["time"] < EXIT_WITHIN_S, ended - failure["time"]
    assert len(failure["workers"]) == 2  # the failure came while both workers were reading
    deadline = time.time() + 5  # a killed process may take a moment to be reaped
    while any(map(_alive, failure["workers"])) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, failure["workers"])), failure["workers"]
    assert load_checkpoint(tmp_path / "run" / "last.pt", training=True)["step"] == 2
    assert os.path.getmtime(tmp_path / "run" / "last.pt") < failure["time"]
    return proc, failure


@pytest.fixture
def sample(tmp_path, data_root) -> Path:
    # A copy: streaming writes its index cache beside the data.
    return Path(shutil.copytree(data_root / "imagefolder-sample", tmp_path / "sample"))


def test_an_error_mid_epoch_ends_a_streamed_run_at_once(tmp_path, sample):
    """A RuntimeError at step 3, with a thread that would block an ordinary exit forever: the
    process still ends at once (fail_a_streamed_run), with the traceback and one closing line.
    (Without `cli.run`'s immediate exit the same process hangs until it is killed.)"""
    proc, _ = fail_a_streamed_run(tmp_path, sample, "raise-at-step")
    assert "RuntimeError: injected failure at step 3" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "ssl-sec: error: the command failed with RuntimeError")


def test_out_of_memory_is_one_line_with_the_batch_size(tmp_path, data_root, monkeypatch,
                                                      capsys):
    real, calls = engine.optimize_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "optimize_step", step)
    code = cli.main(["pretrain", "recipes/quickstart.yaml", "data.train_subset=256",
                     "data.test_subset=60", "optim.batch_size=64", "model.proj_hidden_dim=64",
                     "model.proj_output_dim=16", "eval.knn_every=0", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "out of memory at optim.batch_size=64" in err[0]
    assert "GiB of RAM" in err[0] and "optim.batch_size=32" in err[0]  # the memory, the fix
    assert not (tmp_path / "quickstart" / "last.pt").exists()


def _views(**kwargs) -> ViewAugment:
    mean, std = NORMALIZATION["imagefolder"]
    return ViewAugment(size=24, mean=mean, std=std, blur_p=0.5, solarize_p=0.2, **kwargs)


@torch.no_grad()
def test_a_failed_graph_recording_falls_back_to_the_same_views(monkeypatch, capsys):
    """Recording is made to raise (as cudaErrorStreamCaptureInvalidated would): one warning
    line naming the reason, then the op-by-op views, drawn from the same random stream as
    a view that was never meant to be recorded; no second attempt, no second warning."""
    def broken(fn, example):
        raise RuntimeError("CUDA error: operation failed due to a previous error during "
                           "capture")

    monkeypatch.setattr(augment, "_GraphedView", broken)
    monkeypatch.setattr(ViewAugment, "_records", lambda self, images: self.cuda_graph)
    monkeypatch.setattr(augment, "_FAILED_RECORDINGS", set())
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    views, reference = _views(), _views(cuda_graph=False)
    torch.manual_seed(3)
    got = [views(images), views(images)]
    torch.manual_seed(3)
    want = [reference(images), reference(images)]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be recorded as a CUDA graph" in err[0], err
    assert "operation failed due to a previous error during capture" in err[0]
    assert not views.cuda_graph
    # A second module failing for the same reason (the other view) stays silent.
    second = _views()
    second(images)
    assert capsys.readouterr().err == "" and not second.cuda_graph


def test_a_released_run_directory_is_free_while_forked_workers_live(tmp_path):
    """The run's lock is not kept by children forked while it was held (persistent DataLoader
    workers): once the run releases it, a new run may take the directory."""
    from ssl_sec.run_dir import open_run

    run = open_run(str(tmp_path), "run", None)
    started, ready = os.pipe()
    child = os.fork()
    if child == 0:  # a worker that outlives the run's release (its fork hooks have run)
        os.write(ready, b"1")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"1"  # the child is past its start, as a worker is
        run.release()
        open_run(str(tmp_path), "run", None).release()  # not "in use by a running ssl-sec"
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(started)
        os.close(ready)

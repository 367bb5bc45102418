"""The fault suite on a GPU: what tests/test_faults.py checks on the CPU, where CUDA adds its
own ways to fail. Out of memory mid-run is one line with exit 2 and leaves the checkpoints as
they were; NaN under bf16 stops with exit 2 and the last good checkpoint intact; SIGTERM
mid-epoch with the views recorded as a CUDA graph exits 75 and the resume equals an
uninterrupted run bit for bit under `deterministic: true`. (A CUDA error ending the process
within seconds: tests/test_gpu_views.py.)"""

from __future__ import annotations

import signal

import pytest
from test_faults import (
    _last_line,
    _run,
    _start,
    _wait_for_step,
    assert_same_training,
)

from ssl_sec.checkpoint import load_checkpoint

pytestmark = pytest.mark.gpu

CUDA = ["device=cuda", "deterministic=true"]


def test_cuda_out_of_memory_mid_run_keeps_the_checkpoints(tmp_path, data_root):
    """A real allocation no GPU holds at step 3, checkpoints after every step: one line
    naming the batch size and the GPU's memory, exit 2; last.pt (step 2) and prev.pt (step 1)
    are the ones written before it."""
    proc = _run(tmp_path, "oom", *CUDA, "ckpt_every_steps=1", inject=["oom-at-step", "3"])
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert "out of memory at optim.batch_size=32" in err[0] and "GiB" in err[0]
    run = tmp_path / "oom"
    assert load_checkpoint(run / "last.pt")["step"] == 2
    assert load_checkpoint(run / "prev.pt")["step"] == 1


def test_nan_under_bf16_keeps_the_last_good_checkpoint(tmp_path, data_root):
    proc = _run(tmp_path, "n", *CUDA, "precision=bf16", "--max-epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "n" / "last.pt"
    good = last.read_bytes()
    proc = _run(tmp_path, "n", *CUDA, "precision=bf16", "--resume", "optim.lr=1e30")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _last_line(proc.stderr)
    assert "NaN/inf" in line and str(last) in line and "untouched" in line
    assert last.read_bytes() == good
    assert not (tmp_path / "n" / "changes.jsonl").exists()  # no checkpoint holds lr=1e30


def test_sigterm_with_recorded_views_resumes_exactly(tmp_path, data_root):
    """Under `deterministic: true` a CUDA run is reproducible; stopped by SIGTERM at step 2
    or later and resumed, it ends with the weights, optimizer state and RNG states of the
    uninterrupted run."""
    ref = _run(tmp_path, "ref", *CUDA)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "made op by op" not in ref.stderr  # the views were recorded, not the fallback
    proc = _start(tmp_path, "cut", *CUDA)
    _wait_for_step(tmp_path / "cut", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by SIGTERM at step" in _last_line(err)
    again = _run(tmp_path, "cut", *CUDA, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_training(tmp_path / "ref" / "last.pt", tmp_path / "cut" / "last.pt")

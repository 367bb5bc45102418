"""Fault injection on real training processes: kill -9 at random steps and during a
checkpoint write, SIGTERM / SIGUSR1 / SIGINT, a corrupt last.pt, a full disk, a second
run in the same directory, NaN. Every interrupted run is resumed and must end with the
weights, optimizer state and RNG-driven state of a run that was never interrupted, bit
for bit (CPU). The tests wait for events (a logged step, a process's exit), never for a
fixed time, each under one generous deadline (helpers.DEADLINE_S): they hold on a loaded
machine."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DEADLINE_S

from ssl_sec.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
INJECT = ROOT / "tests" / "tools" / "fault_inject.py"
# 2 epochs x 4 steps of a small ResNet-18 run; every step logged; no time-based checkpoints
# (the tests choose when checkpoints happen). Batches of 32: the faults are about processes and
# files, and a process's start (imports, data) already costs more than its steps.
BASE = ["pretrain", "recipes/quickstart.yaml", "data.train_subset=128", "data.test_subset=100",
        "model.proj_hidden_dim=64", "model.proj_output_dim=16", "optim.batch_size=32",
        "optim.epochs=2", "optim.warmup_epochs=0.5", "eval.knn_every=0", "eval.knn_k=10",
        "log_every=1", "ckpt_every=0", "ckpt_every_minutes=0", "loss.sec.eta=0.05",
        "loss.sec.mu=ema"]
STEPS = 8


def _env():
    # torchrun kills its workers 30 s (its default) after passing a SIGTERM on to them; the
    # step in flight, the ranks' agreement and the checkpoint can take longer on a loaded
    # machine, and a SIGKILLed worker would fail the test for the load, not for a bug.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(DEADLINE_S)}


def _cmd(out, name, *extra, inject=None):
    args = [*BASE, f"out_dir={out}", f"name={name}", *extra]
    if inject is None:
        return [sys.executable, "-m", "ssl_sec", *args]
    return [sys.executable, str(INJECT), *inject, "--", *args]


def _run(out, name, *extra, inject=None, **kw):
    return subprocess.run(_cmd(out, name, *extra, inject=inject), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=DEADLINE_S, **kw)


def _start(out, name, *extra):
    return subprocess.Popen(_cmd(out, name, *extra), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_step(metrics: Path) -> int:
    """The last train step in metrics.jsonl (0 before any); a line being written is skipped."""
    last = 0
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("kind") == "train":
                last = max(last, row["step"])
    return last


def _wait_for_step(run_dir: Path, step: int, proc) -> None:
    """Until metrics.jsonl has a train row of `step` (the process is then somewhere after
    that step: logging, checkpointing or in the next step). The file is read before the
    process is polled: a run that logged the step and then ended has still reached it."""
    end = time.monotonic() + DEADLINE_S
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < end:
        ended = proc.poll() is not None
        if _logged_step(metrics) >= step:
            return
        if ended:
            raise AssertionError(f"the run ended before step {step}: "
                                 f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {DEADLINE_S} s")


def _last_line(stderr: str) -> str:
    """The message a failed or stopped run ends with (no traceback anywhere)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


def assert_same_training(a: Path, b: Path) -> None:
    """Two checkpoints hold the same training state, bit for bit."""
    ca, cb = load_checkpoint(a, training=True), load_checkpoint(b, training=True)
    assert ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(),
                      strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert torch.equal(ca["loader_rng"], cb["loader_rng"])
    assert torch.equal(ca["rng"][0]["torch"], cb["rng"][0]["torch"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """The uninterrupted run every fault is compared with."""
    out = tmp_path_factory.mktemp("reference")
    proc = _run(out, "ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "ref" / "last.pt"
    assert load_checkpoint(ckpt)["step"] == STEPS
    return ckpt


def _metrics_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def test_kill_9_at_random_steps_resumes_exactly(tmp_path, reference):
    """Three kill -9s at random steps (seeded), each followed by --auto-resume (what a
    requeued job runs: it also restarts a run killed before its first checkpoint);
    checkpoints every step, so each kill loses at most the step in flight."""
    rng = random.Random(1234)
    kills = sorted(rng.sample(range(1, STEPS), 3))
    run_dir = tmp_path / "k"
    proc = _start(tmp_path, "k", "ckpt_every_steps=1")
    resumed_at = []
    for n, step in enumerate(kills):
        _wait_for_step(run_dir, step, proc)
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere in the step, the log or the write
        proc.kill()
        proc.wait()
        last = run_dir / "last.pt"
        saved = load_checkpoint(last)["step"] if last.is_file() else 0
        assert saved >= step - 1  # at most the step in flight is lost
        resumed_at.append(saved)
        proc = _start(tmp_path, "k", "ckpt_every_steps=1", "--auto-resume")
        if n + 1 < len(kills) and kills[n + 1] <= saved:
            kills[n + 1] = saved + 1
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, err[-3000:]
    assert_same_training(reference, run_dir / "last.pt")
    # Each step is logged once, whatever was replayed.
    assert _metrics_steps(run_dir) == list(range(1, STEPS + 1))
    assert not list(run_dir.glob(".*.tmp"))


def test_kill_during_a_checkpoint_write(tmp_path, reference):
    """The process dies half way through writing its 3rd checkpoint: last.pt is the 2nd,
    the temp file is removed by the next start, and the resume is exact."""
    run_dir = tmp_path / "w"
    proc = _run(tmp_path, "w", "ckpt_every_steps=1", inject=["kill-in-save", "3"])
    assert proc.returncode == -signal.SIGKILL
    assert list(run_dir.glob(".last.pt.*.tmp"))  # the half-written file
    assert load_checkpoint(run_dir / "last.pt")["step"] == 2
    assert load_checkpoint(run_dir / "prev.pt")["step"] == 1
    proc = _run(tmp_path, "w", "ckpt_every_steps=1", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "interrupted checkpoint write" in proc.stdout
    assert not list(run_dir.glob(".*.tmp"))
    assert_same_training(reference, run_dir / "last.pt")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_stop_signal_checkpoints_mid_epoch_and_resumes_exactly(tmp_path, reference, sig):
    """No periodic checkpoints at all: the signal alone makes the process finish its step,
    write last.pt mid-epoch and exit 75. The three signals take the same path from there;
    SIGTERM's run is resumed and compared with the uninterrupted one."""
    run_dir = tmp_path / "s"
    proc = _start(tmp_path, "s")
    _wait_for_step(run_dir, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 75, err[-3000:]
    line = _last_line(err)
    assert f"stopped by {sig.name} at step" in line and "--resume" in line
    stopped = int(line.split(" at step ")[1].split()[0])
    # Counted as the progress lines count ("epoch 2/2"): from 1.
    assert (f"(epoch {stopped // 4 + 1}/2, batch {stopped % 4}/4)" if stopped % 4
            else f"(end of epoch {stopped // 4}/2)") in line, line
    ckpt = load_checkpoint(run_dir / "last.pt", training=True)
    assert ckpt["step"] == stopped >= 2
    if stopped % 4:
        assert ckpt["batch_in_epoch"] == stopped % 4  # a mid-epoch checkpoint
    if sig != signal.SIGTERM:
        return
    proc = _run(tmp_path, "s", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step {stopped}" in proc.stdout
    assert_same_training(reference, run_dir / "last.pt")


def test_corrupt_last_pt_names_prev_pt_which_resumes(tmp_path, reference):
    run_dir = tmp_path / "c"
    proc = _run(tmp_path, "c", "ckpt_every_steps=2", "--max-epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last, prev = run_dir / "last.pt", run_dir / "prev.pt"
    assert load_checkpoint(prev)["step"] == 2 and load_checkpoint(last)["step"] == 4
    good_prev = prev.read_bytes()
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    proc = _run(tmp_path, "c", "--resume")
    assert proc.returncode == 2
    line = _last_line(proc.stderr)
    assert str(last) in line and "prev.pt" in line and "--resume-from" in line
    assert prev.read_bytes() == good_prev
    proc = _run(tmp_path, "c", "--resume-from", str(prev))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(reference, last)
    assert list(run_dir.glob("last.replaced-*.pt"))  # the damaged file is kept, not deleted


def test_second_run_in_the_same_directory_is_refused(tmp_path, data_root):
    run_dir = tmp_path / "busy"
    first = _start(tmp_path, "busy", "optim.epochs=50")
    _wait_for_step(run_dir, 1, first)
    config = (run_dir / "config.yaml").read_text()
    second = _run(tmp_path, "busy", "optim.epochs=50", "optim.lr=0.1")
    assert second.returncode == 2
    line = _last_line(second.stderr)
    assert "in use by a running ssl-sec" in line and str(first.pid) in line
    also = _run(tmp_path, "busy", "optim.epochs=50", "--resume")
    assert also.returncode == 2 and "in use" in _last_line(also.stderr)
    # Only the first run's files: one config (its own), one event file, one start row.
    # (.tmp: a checkpoint the first run is writing at that moment)
    assert {p.name for p in run_dir.iterdir() if not p.name.endswith(".tmp")} <= {
        ".ssl_sec.lock", "config.yaml", "tb", "metrics.jsonl", "last.pt", "prev.pt"}
    assert (run_dir / "config.yaml").read_text() == config
    assert len(list((run_dir / "tb").iterdir())) == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "start" for r in rows) == 1
    # A run killed with -9 leaves no stuck lock: the OS drops it with the process.
    _wait_for_step(run_dir, 2, first)
    first.kill()
    first.wait()
    proc = _run(tmp_path, "busy", "optim.epochs=50", "--resume", "--max-epochs", "1",
                "ckpt_every_steps=100")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_nan_stops_with_exit_2_and_keeps_the_checkpoint(tmp_path, data_root):
    run_dir = tmp_path / "n"
    proc = _run(tmp_path, "n", "--max-epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    good = (run_dir / "last.pt").read_bytes()
    # The NaN message's advice, the other way round: a resume may change optim.lr.
    proc = _run(tmp_path, "n", "--resume", "optim.lr=1e30")
    assert proc.returncode == 2
    line = _last_line(proc.stderr)
    assert "NaN/inf" in line and str(run_dir / "last.pt") in line and "untouched" in line
    assert (run_dir / "last.pt").read_bytes() == good
    assert not (run_dir / "changes.jsonl").exists()  # lr=1e30 reached no checkpoint
    # Before any checkpoint: the message says so, and the directory can be started again.
    proc = _run(tmp_path, "m", "optim.lr=1e30")
    assert proc.returncode == 2
    line = _last_line(proc.stderr)
    assert "before the first checkpoint" in line and "last.pt" not in line
    proc = _run(tmp_path, "m", "--max-epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "m" / "attempts" / "1" / "metrics.jsonl").is_file()


def _small_files():
    # Files above 20 MB cannot be written (the checkpoints are ~90 MB); SIGXFSZ ignored so
    # the write fails with EFBIG instead of killing the process: a full disk, in effect.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, 20_000_000))


def test_full_disk_while_writing_a_checkpoint(tmp_path, data_root):
    run_dir = tmp_path / "d"
    proc = _run(tmp_path, "d", "--max-epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    good = (run_dir / "last.pt").read_bytes()
    proc = _run(tmp_path, "d", "--resume", preexec_fn=_small_files)
    assert proc.returncode == 2
    line = _last_line(proc.stderr)
    assert "could not write checkpoint" in line and "previous checkpoint is kept" in line
    assert (run_dir / "last.pt").read_bytes() == good
    assert not list(run_dir.glob(".*.tmp"))


# ----------------------------------------------------------------------------- multi-node
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_nodes(out, name, *extra):
    """Two torchrun agents, one process each, meeting through a c10d rendezvous on this
    machine: 2 "nodes" x 1 process, as the SLURM script launches across machines."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    port, run_id = _free_port(), f"{name}{time.time_ns()}"
    cmd = [torchrun, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id={run_id}", "-m", "ssl_sec",
           *BASE, f"out_dir={out}", f"name={name}", *extra]
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]


def _finish(procs) -> list[tuple[int, str]]:
    errs = [p.communicate(timeout=DEADLINE_S)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]


def test_two_nodes_sigterm_and_exact_resume_same_world_size_only(tmp_path, data_root):
    ref = _finish(_two_nodes(tmp_path, "ref"))
    assert all(rc == 0 for rc, _ in ref), ref[0][1][-3000:]
    ref_ckpt = load_checkpoint(tmp_path / "ref" / "last.pt", training=True)
    assert ref_ckpt["step"] == STEPS and ref_ckpt["world_size"] == 2, ref[0][1][-2000:]

    # SLURM preemption: SIGTERM to every task; torchrun passes it to its worker, the ranks
    # agree on a step, write one checkpoint and stop.
    procs = _two_nodes(tmp_path, "cut")
    _wait_for_step(tmp_path / "cut", 2, procs[0])
    for p in procs:
        p.send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=DEADLINE_S)[1] for p in procs]
    assert "ssl-sec: stopped by SIGTERM at step" in errs[0] + errs[1], errs[0][-2000:]
    cut = load_checkpoint(tmp_path / "cut" / "last.pt", training=True)
    # (The ranks agree every 10 steps and at epoch ends: here at the end of epoch 1, or of
    # epoch 2 if the signal came late.)
    assert cut["step"] >= 2 and len(cut["rng"]) == 2

    # Another world size is refused by name; the same one continues exactly.
    one = _run(tmp_path, "cut", "--resume")
    assert one.returncode == 2
    assert "written by 2 process(es), this run has 1" in _last_line(one.stderr)
    results = _finish(_two_nodes(tmp_path, "cut", "--resume"))
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:]
    assert_same_training(tmp_path / "ref" / "last.pt", tmp_path / "cut" / "last.pt")
    for a, b in zip(ref_ckpt["rng"], load_checkpoint(tmp_path / "cut" / "last.pt")["rng"],
                    strict=True):
        assert torch.equal(a["torch"], b["torch"])


# ----------------------------------------------------------------------------- SLURM script
def test_slurm_script_requeues_on_the_time_limit_signal_and_resumes(tmp_path, reference):
    """scripts/slurm/pretrain.sbatch under stand-ins for `srun` (runs its command) and
    `scontrol` (records requeues): SIGUSR1, as `--signal=B:USR1@300` sends before the time
    limit, gives a checkpoint and a requeue; the requeued job finishes the run exactly."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'exec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [[ $1 == show ]]; then echo localhost; '
                                      'else echo "$@" >> "$SCONTROL_LOG"; fi\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    log = tmp_path / "scontrol.log"
    env = {**_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node1", "SSL_SEC_PYTHON": sys.executable,
           "SSL_SEC_PORT": str(_free_port()), "SCONTROL_LOG": str(log)}
    cmd = ["bash", str(ROOT / "scripts" / "slurm" / "pretrain.sbatch"), *BASE[1:],
           f"out_dir={tmp_path}", "name=job"]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path / "job", 2, job)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=DEADLINE_S)
    assert job.returncode == 0, err[-3000:]
    assert log.read_text().split() == ["requeue", "42"]
    assert "ssl-sec: stopped by SIGTERM at step" in err
    stopped = load_checkpoint(tmp_path / "job" / "last.pt")["step"]
    assert 2 <= stopped < STEPS
    # The requeued job: the same script, the same arguments.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=DEADLINE_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed {tmp_path / 'job' / 'last.pt'} at epoch" in again.stdout
    assert log.read_text().split() == ["requeue", "42"]  # finished: no second requeue
    assert_same_training(reference, tmp_path / "job" / "last.pt")


# ----------------------------------------------------------------------------- streaming
def test_streamed_run_sigterm_to_every_process_resumes_exactly(tmp_path, data_root):
    """An image folder streamed by 2 DataLoader workers; SIGTERM to the whole process group
    (as SLURM signals every process of a job step): the workers ignore it, the main process
    checkpoints mid-epoch (the loader position included) and the resume is exact."""
    import shutil

    sample = Path(shutil.copytree(data_root / "imagefolder-sample", tmp_path / "sample"))
    stream = ["data.dataset=imagefolder", f"data.root={sample}", "data.mode=stream",
              "data.workers=2", "augment.size=32", "data.test_subset=60"]
    ref = _run(tmp_path, "ref", *stream)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = subprocess.Popen(_cmd(tmp_path, "cut", *stream), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_step(tmp_path / "cut", 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by SIGTERM" in _last_line(err) and "DataLoader worker" not in err
    cut = load_checkpoint(tmp_path / "cut" / "last.pt", training=True)
    assert 2 <= cut["step"] < 8  # 128 of the sample's images // 32 = 4 steps an epoch
    assert cut["batch_in_epoch"] == cut["step"] % 4
    again = _run(tmp_path, "cut", *stream, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_training(tmp_path / "ref" / "last.pt", tmp_path / "cut" / "last.pt")

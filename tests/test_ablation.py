"""eval/ablation.py, the SEC ablation campaign (issue 18), without a GPU: the smoke campaign
(every arm, 1 epoch, a subset, on the CPU) once per module, a second `run` that skips it all,
a run cut by --max-epochs and resumed, the window planner on fake epoch times, and the report
(tables, PNGs, the refusal to mix smoke and real runs)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import ablation  # noqa: E402

CAMPAIGN = ablation.load_campaign()


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "eval/ablation.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_root):
    """`run --smoke --device cpu` into a temporary directory, timed."""
    base = tmp_path_factory.mktemp("ablation_smoke")
    results, work = base / "results", base / "work"
    t0 = time.perf_counter()
    run = _cli("run", "--smoke", "--device", "cpu", "--results", str(results), "--work",
               str(work))
    seconds = time.perf_counter() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"results": results, "work": work, "seconds": seconds, "stdout": run.stdout}


def test_smoke_writes_one_finished_json_per_planned_run(smoke):
    specs = ablation.plan_runs(CAMPAIGN, smoke=True, device="cpu")
    arms = {s.arm for s in specs}
    assert arms == set(CAMPAIGN["arms"])  # every arm, the reproduction-only one included
    assert {s.seed for s in specs if s.arm == "simclr_base"} == set(CAMPAIGN["smoke"]["seeds"])
    files = sorted(p.name for p in smoke["results"].glob("*_e*_s*.json"))
    assert files == sorted(f"{s.run_id}.json" for s in specs)
    for s in specs:
        d = json.loads((smoke["results"] / f"{s.run_id}.json").read_text())
        assert all(k in d for k in ablation.REQUIRED_KEYS), s.run_id
        assert d["smoke"] is True and d["device"] == "cpu" and d["gpu"] is None
        assert (d["arm"], d["seed"], d["epochs"]) == (s.arm, s.seed, 1)
        numbers = [d["knn"]["top1"], d["knn"]["top5"], d["linear_fast"]["top1"],
                   d["timing"]["epoch_seconds_median"], d["timing"]["pretrain_wall_s"]]
        for layer in ("z", "h"):
            numbers += [d["norms"][layer][k] for k in ("mean", "std", "cv", "p05", "p95")]
            assert sum(d["norms"][layer]["hist"]["counts"]) == d["norms"]["n_images"]
        assert all(isinstance(x, float | int) and math.isfinite(x) for x in numbers), s.run_id
        assert [p["epoch"] for p in d["knn"]["curve"]] == [1]
        assert d["linear_fast"]["mode"] == "features" and "FAST MODE" in d["linear_fast"]["protocol"]
        assert d["command"].startswith("eval/ablation.py run --smoke")
        assert d["versions"]["torch"] and d["git"]
    # The overrides of the arms reached the runs (a recipe-key rename would fail loudly).
    sec = json.loads((smoke["results"] / "simclr_sec_eta0.1_e1_s0.json").read_text())
    assert "loss.sec.eta=0.1" in sec["overrides"] and sec["base"] == "simclr_base"
    cfg = (smoke["work"] / "simclr_sec_eta0.1_e1_s0" / "train" / "config.yaml").read_text()
    saved = yaml.safe_load(cfg)["loss"]["sec"]
    assert saved["eta"] == 0.1 and saved["ramp"] == "linear"
    print(f"smoke campaign: {len(specs)} runs in {smoke['seconds']:.1f} s")


def test_a_second_run_skips_every_finished_run(smoke):
    t0 = time.perf_counter()
    again = _cli("run", "--smoke", "--device", "cpu", "--results", str(smoke["results"]),
                 "--work", str(smoke["work"]))
    assert again.returncode == 0, again.stderr[-2000:]
    assert time.perf_counter() - t0 < 20
    n = len(ablation.plan_runs(CAMPAIGN, smoke=True, device="cpu"))
    assert f"{n} finished (skipped), 0 missing; 0 planned" in again.stdout
    assert "start" not in again.stdout


def test_a_cut_run_resumes_from_its_checkpoint(tmp_path, data_root, capsys):
    """A run stopped after epoch 1 of 2 (as --max-epochs or the end of a GPU window stops
    it) continues from its checkpoint: epoch 2 only, no second epoch 1, one JSON."""
    spec = ablation.plan_runs(CAMPAIGN, smoke=True, device="cpu", seeds=[0],
                              arms=["simclr_sec_eta0.1"])[0]
    spec = ablation.RunSpec(**{**ablation.asdict(spec), "epochs": 2,
                               "overrides": (*spec.overrides, "eval.knn_every=1")})
    results, work = tmp_path / "results", tmp_path / "work"
    assert ablation.execute_run(spec, results, work, max_epochs=1) == "partial"
    assert not (results / f"{spec.run_id}.json").exists()
    assert ablation.epochs_done(work, spec.run_id) == 1
    # The planner sees the started run first, with its remaining epoch.
    pending = ablation.pending_runs([spec], results, work)
    assert pending == [(spec, 1)]
    capsys.readouterr()
    assert ablation.execute_run(spec, results, work) == "done"
    out = capsys.readouterr().out
    assert "resumed" in out and "at epoch 1" in out and "epoch 1/2" not in out
    tries = ablation.attempts(work, spec.run_id)
    assert [(a["epochs_before"], a["epochs_after"]) for a in tries] == [(0, 1), (1, 2)]
    d = json.loads((results / f"{spec.run_id}.json").read_text())
    assert d["timing"]["resumed"] and d["timing"]["attempts"] == 2
    assert [p["epoch"] for p in d["knn"]["curve"]] == [1, 2]
    assert d["timing"]["epochs_timed"] == 2
    # Finished: nothing pending, no temporary file left.
    assert ablation.pending_runs([spec], results, work) == []
    assert not list(results.glob(".*.tmp"))


def _timing(per_epoch=None, slowdown=None):
    return ablation.Timing(per_epoch=per_epoch or {}, slowdown=slowdown or {},
                           defaults={"simclr": 6.0, "moco": 20.0}, overhead=60.0)


def test_the_planner_takes_only_runs_that_fit():
    specs = ablation.plan_runs(CAMPAIGN)  # the real campaign: 100-epoch runs
    assert specs[0].run_id == "simclr_base_e100_s0" and specs[0].epochs == 100
    assert specs[-1].run_id == "moco_base_q8192_e200_s0"
    pending = [(s, 0) for s in specs]
    # Measured on this GPU: SimCLR 2 s per epoch -> 260 s a run; MoCo unmeasured: 2 x 20/6.
    t = _timing({("h200", "simclr", 1): [2.0, 2.0, 2.2]})
    assert t.estimate(specs[0], 0, "h200", 1) == pytest.approx(100 * 2.0 + 60)
    moco = next(s for s in specs if s.method == "moco")
    assert t.epoch_seconds("h200", "moco", 1) == pytest.approx(2.0 * 20 / 6)
    plan = ablation.schedule(pending, t, "h200", minutes=14, fill=False)
    assert [p.spec.run_id for p in plan] == ["simclr_base_e100_s0", "simclr_sec_eta0.01_e100_s0",
                                             "simclr_sec_eta0.1_e100_s0"]
    assert sum(p.seconds for p in plan) <= 14 * 60
    # Another GPU knows nothing: the conservative default (6 s per epoch) fits one run.
    plan = ablation.schedule(pending, t, "a100", minutes=14, fill=False)
    assert [p.spec.run_id for p in plan] == ["simclr_base_e100_s0"]
    # A started run comes first and needs only its remaining epochs.
    pending2 = [(s, 90 if s is moco else 0) for s in specs]
    plan = ablation.schedule(pending2, t, "h200", minutes=14, fill=False)
    assert plan[0].spec is moco and plan[0].seconds == pytest.approx(10 * 2.0 * 20 / 6 + 60)
    # Nothing fits a 2-minute window; --fill trains part of the first run.
    assert ablation.schedule(pending, t, "h200", minutes=2, fill=False) == []
    (part,) = ablation.schedule(pending, t, "h200", minutes=2, fill=True)
    assert part.spec.run_id == "simclr_base_e100_s0" and part.max_epochs == (120 - 60) // 2
    # Two at once with a measured slowdown of 1.5: each run 1.5x longer, two slots.
    t2 = _timing({("h200", "simclr", 1): [2.0]}, {("h200", 2): 1.5})
    plan = ablation.schedule(pending, t2, "h200", minutes=14, parallel=2, fill=False)
    assert len(plan) == 4 and all(p.seconds == pytest.approx(360) for p in plan)
    # Unmeasured parallel level: assumed no gain (n times longer).
    assert _timing({("h200", "simclr", 1): [2.0]}).epoch_seconds("h200", "simclr", 3) == 6.0


def test_report_tables_and_figures_from_the_smoke(smoke, tmp_path):
    run = _cli("report", "--smoke", "--results", str(smoke["results"]), "--work",
               str(smoke["work"]))
    assert run.returncode == 0, run.stderr[-2000:]
    md = (smoke["results"] / "REPORT.md").read_text()
    assert md.startswith(ablation.BEGIN) and md.rstrip().endswith(ablation.END)
    assert "SMOKE RUNS" in md
    assert "| simclr_base | 2 | 0, 1 |" in md and "±" in md
    assert "| simclr_sec_eta0.1 | simclr_base | 2 |" in md  # a paired difference, both seeds
    assert "| moco_sec | moco_base | 2 |" in md
    assert "moco_base_q8192_e1_s0" in md and "84.7" in md  # the reproduction table
    for png in ("knn_curves.png", "norm_distributions.png"):
        assert (smoke["results"] / png).read_bytes()[:4] == b"\x89PNG"
    assert "TODO" not in md and "TBD" not in md
    # A rerun replaces the section instead of appending a second one.
    assert _cli("report", "--smoke", "--results", str(smoke["results"])).returncode == 0
    assert (smoke["results"] / "REPORT.md").read_text().count(ablation.BEGIN) == 1


def test_report_refuses_smoke_and_real_runs_together(smoke, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(smoke["results"], mixed)
    p = mixed / "simclr_base_e1_s0.json"
    d = json.loads(p.read_text())
    p.write_text(json.dumps({**d, "smoke": False, "gpu": "NVIDIA H200"}))
    for args in (["report", "--smoke"], ["report"]):
        run = _cli(*args, "--results", str(mixed))
        assert run.returncode != 0 and "mixes smoke and real runs" in run.stderr
    # Smoke runs alone never reach eval/RESULTS.md, nor do smoke runs go to the real folder.
    before = (ROOT / "eval" / "RESULTS.md").read_text()
    run = _cli("report", "--results", str(smoke["results"]))
    assert run.returncode != 0 and "holds smoke runs" in run.stderr
    assert (ROOT / "eval" / "RESULTS.md").read_text() == before
    run = _cli("run", "--smoke", "--device", "cpu", "--results", "eval/results/ablation")
    assert run.returncode != 0 and "never go to the real results" in run.stderr
    # A real run needs a GPU: on this machine `run` refuses before training anything.
    run = _cli("run", "--minutes", "1", "--results", str(tmp_path / "r"), "--work",
               str(tmp_path / "w"))
    assert run.returncode != 0 and "no CUDA GPU" in run.stderr

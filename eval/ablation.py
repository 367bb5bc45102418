"""Does SEC help? A resumable ablation campaign on CIFAR-10, run GPU window by GPU window (issue 18).

    python eval/ablation.py plan   [--minutes M] [--parallel N]    # what `run` would do
    python eval/ablation.py run    --minutes M [--parallel N|auto]  # on a GPU machine
    python eval/ablation.py report                                  # eval/RESULTS.md section
    python eval/ablation.py measure-parallel [--levels 1 2 3]       # runs/minute at N at once
    python eval/ablation.py run --smoke --device cpu                # the machinery, tiny, CPU
    python eval/ablation.py report --smoke

The campaign (eval/campaigns/sec_cifar10.yaml) lists arms (a recipe plus `key=value`
overrides), seeds, epochs and the reproduction runs. A run is `<arm>_e<epochs>_s<seed>`; it
is finished when `<results_dir>/<run>.json` exists (written last, atomically), so a second
`run` skips it. A run is trained in its own worker process (`_worker`, which calls
ssl_sec's `train` with resume="auto", as `ssl-sec pretrain --auto-resume`), then probed
(`ssl-sec linear` with recipes/linear/fast.yaml) and measured (the `ssl-sec norms`
statistics, plus histograms), all in that process: one process start per run, not three.
`--parallel N` is a pool of N such workers. At the end of the window (`--minutes`) the
workers get SIGTERM, which makes ssl_sec write a checkpoint and stop (exit 75); the next
`run` continues them from it.

Planning: each missing run's time is its remaining epochs times the seconds per epoch
measured on this GPU by earlier runs of the same method (every attempt is recorded in
`<work_dir>/<run>/attempts.jsonl`), else the campaign's conservative default, plus an
overhead; runs are taken in campaign order (unfinished ones first) while they fit. With
`--fill` (default) a slot's leftover time trains the next run that does not fit for the
epochs that do (`--max-epochs`), to be continued in the next window.

Real runs need CUDA (their JSON names the GPU); `--smoke` runs every arm for 1 epoch on a
subset, into a separate directory, marked smoke, and `report` refuses to mix smoke and real.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, gpu_slug  # noqa: E402

if str(ROOT) not in sys.path[:2]:  # this tree's ssl_sec, also in a worker process
    sys.path.insert(1, str(ROOT))

CAMPAIGN = ROOT / "eval" / "campaigns" / "sec_cifar10.yaml"
RESULTS_MD = ROOT / "eval" / "RESULTS.md"
BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"
RUN_JSON = re.compile(r"^(?P<arm>.+)_e(?P<epochs>\d+)_s(?P<seed>\d+)\.json$")
PARALLEL_JSON = "parallel_{gpu}.json"
PREEMPTED_EXIT = 75  # ssl_sec.preemption.PREEMPTED_EXIT (not imported: no torch here)
REQUIRED_KEYS = ("arm", "seed", "epochs", "smoke", "knn", "linear_fast", "norms", "timing",
                 "gpu", "host", "versions", "git")


# ----------------------------------------------------------------------------- campaign
@dataclass(frozen=True)
class RunSpec:
    """One training run of the campaign and everything its worker needs."""

    arm: str
    seed: int
    epochs: int
    recipe: str
    method: str
    overrides: tuple[str, ...]
    linear_recipe: str
    linear_overrides: tuple[str, ...]
    smoke: bool = False
    device: str = "auto"
    base: str | None = None
    reference: dict | None = field(default=None, hash=False, compare=False)

    @property
    def run_id(self) -> str:
        return f"{self.arm}_e{self.epochs}_s{self.seed}"

    def train_overrides(self, work_dir: Path) -> list[str]:
        extra = [] if self.device == "auto" else [f"device={self.device}"]
        return [*self.overrides, f"seed={self.seed}", f"optim.epochs={self.epochs}", *extra,
                f"out_dir={work_dir / self.run_id}", "name=train"]


def load_campaign(path: str | Path = CAMPAIGN) -> dict:
    c = yaml.safe_load(Path(path).read_text())
    for name, arm in c["arms"].items():
        if not isinstance(arm.get("overrides", []), list):
            raise SystemExit(f"campaign: arm {name}: overrides must be a list of key=value")
        if arm.get("base") and arm["base"] not in c["arms"]:
            raise SystemExit(f"campaign: arm {name}: base {arm['base']} is not an arm")
    for r in c.get("reproduction", []):
        if r["arm"] not in c["arms"]:
            raise SystemExit(f"campaign: reproduction arm {r['arm']} is not an arm")
    return c


def _method(recipe: str, overrides: list[str]) -> str:
    method = (yaml.safe_load((ROOT / recipe).read_text()) or {}).get("method", "simclr")
    for o in overrides:
        if o.startswith("method="):
            method = o.split("=", 1)[1]
    return method


def plan_runs(c: dict, smoke: bool = False, device: str = "auto",
              seeds: list[int] | None = None, arms: list[str] | None = None) -> list[RunSpec]:
    """Every run of the campaign in priority order: the ablation seed by seed (so paired
    differences appear early), then the reproduction runs. A run id appears once."""
    s = c.get("smoke", {}) if smoke else {}
    epochs = s.get("epochs", c["epochs"]) if smoke else c["epochs"]
    extra = [*c.get("common", []), *(s.get("overrides", []) if smoke else [])]
    lin = c.get("linear", {})
    lin_over = tuple(lin.get("overrides", [])) + tuple(s.get("linear_overrides", []))
    if device != "auto":
        lin_over += (f"device={device}",)
    seeds = seeds if seeds is not None else (s.get("seeds", c["seeds"]) if smoke else c["seeds"])

    def spec(arm: str, seed: int, ep: int, reference: dict | None = None) -> RunSpec:
        a = c["arms"][arm]
        over = [*a.get("overrides", []), *extra]
        return RunSpec(arm=arm, seed=seed, epochs=ep, recipe=a["recipe"],
                       method=_method(a["recipe"], over), overrides=tuple(over),
                       linear_recipe=lin.get("recipe", "recipes/linear/fast.yaml"),
                       linear_overrides=lin_over, smoke=smoke, device=device,
                       base=a.get("base"), reference=reference)

    out: dict[str, RunSpec] = {}
    ablation_arms = [a for a, v in c["arms"].items() if v.get("ablation", True)]
    for seed in seeds:
        for arm in ablation_arms:
            if arms is None or arm in arms:
                out.setdefault(spec(arm, seed, epochs).run_id, spec(arm, seed, epochs))
    for r in c.get("reproduction", []):
        ep = epochs if smoke else r["epochs"]
        for seed in (r.get("seeds", [0]) if not smoke else r.get("seeds", [0])[:1]):
            if arms is None or r["arm"] in arms:
                sp = spec(r["arm"], seed, ep, r.get("reference"))
                out.setdefault(sp.run_id, sp)
    return list(out.values())


def dirs(c: dict, smoke: bool, results: str | None = None, work: str | None = None
         ) -> tuple[Path, Path]:
    s = c.get("smoke", {}) if smoke else c
    r = Path(results or s.get("results_dir", "eval/runs/ablation-smoke/results"))
    w = Path(work or s.get("work_dir", "eval/runs/ablation-smoke/work"))
    r, w = (p if p.is_absolute() else ROOT / p for p in (r, w))
    if smoke and r.resolve() == (ROOT / c["results_dir"]).resolve():
        raise SystemExit("ablation: smoke runs never go to the real results directory "
                         f"{c['results_dir']}; pass another --results")
    return r, w


# ----------------------------------------------------------------------------- state
def epochs_done(work_dir: Path, run_id: str) -> int:
    """Epochs the run's metrics.jsonl records (a resume drops the rows it replays)."""
    path = work_dir / run_id / "train" / "metrics.jsonl"
    if not path.is_file():
        return 0
    n = 0
    for line in path.read_text().splitlines():
        try:
            n += json.loads(line).get("kind") == "epoch"
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return n


def attempts(work_dir: Path, run_id: str | None = None) -> list[dict]:
    paths = ([work_dir / run_id / "attempts.jsonl"] if run_id else
             sorted(work_dir.glob("*/attempts.jsonl")))
    out = []
    for p in paths:
        if p.is_file():
            out += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return out


def this_gpu(device: str = "auto") -> str:
    """The planning key of this machine: the GPU's slug, or 'cpu'."""
    if device == "cpu":
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        name = out.stdout.strip().splitlines()[0] if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired, IndexError):
        name = ""
    return gpu_slug(name) if name else "cpu"


# ----------------------------------------------------------------------------- planning
@dataclass
class Timing:
    """What the planner knows: seconds per epoch per (gpu, method, parallel level), the
    measured slowdown of N runs at once, and the campaign's defaults."""

    per_epoch: dict[tuple[str, str, int], list[float]]
    slowdown: dict[tuple[str, int], float]
    defaults: dict[str, float]
    overhead: float

    @classmethod
    def collect(cls, c: dict, results: Path, work: Path) -> Timing:
        per: dict[tuple[str, str, int], list[float]] = {}
        for a in attempts(work):
            trained = a.get("epochs_after", 0) - a.get("epochs_before", 0)
            if trained >= 1 and a.get("gpu_slug"):
                key = (a["gpu_slug"], a["method"], a.get("parallel", 1))
                per.setdefault(key, []).append(a["pretrain_wall_s"] / trained)
        slow = {}
        for p in results.glob(PARALLEL_JSON.format(gpu="*")):
            d = json.loads(p.read_text())
            for lvl in d.get("levels", []):
                slow[(d["gpu_slug"], lvl["parallel"])] = lvl["slowdown"]
        return cls(per, slow, dict(c.get("default_epoch_seconds", {"simclr": 6.0})),
                   float(c.get("default_overhead_seconds", 180)))

    def slow(self, gpu: str, n: int) -> float:
        """How much longer one run takes with n at once: measured, else n (no gain)."""
        return 1.0 if n == 1 else self.slowdown.get((gpu, n), float(n))

    def epoch_seconds(self, gpu: str, method: str, parallel: int) -> float:
        def single(m: str) -> float | None:
            got = self.per_epoch.get((gpu, m, parallel))
            if got:
                return statistics.median(got) / self.slow(gpu, parallel)
            for (g, mm, p), vals in self.per_epoch.items():
                if g == gpu and mm == m:  # measured at another level: back to one at a time
                    return statistics.median(vals) / (self.slowdown.get((g, p), 1.0)
                                                      if p > 1 else 1.0)
            return None

        default = self.defaults.get(method, max(self.defaults.values()))
        t = single(method)
        if t is None:  # another method on this GPU, scaled by the defaults' ratio
            for m, d in self.defaults.items():
                if (other := single(m)) is not None:
                    t = other * default / d
                    break
        return (default if t is None else t) * self.slow(gpu, parallel)

    def estimate(self, spec: RunSpec, done: int, gpu: str, parallel: int) -> float:
        return (spec.epochs - done) * self.epoch_seconds(gpu, spec.method, parallel) \
            + self.overhead


@dataclass
class Planned:
    spec: RunSpec
    seconds: float
    max_epochs: int | None = None  # a partial run (--fill): this many epochs this window


def schedule(pending: list[tuple[RunSpec, int]], timing: Timing, gpu: str, minutes: float,
             parallel: int = 1, fill: bool = True) -> list[Planned]:
    """The runs to start in a window of `minutes` with `parallel` slots: greedy in the given
    order (unfinished runs first), a run taken when it fits in its earliest-free slot; with
    `fill`, each slot's leftover time then trains the next run that did not fit for the
    epochs that fit (at least one)."""
    budget = minutes * 60.0
    slots = [0.0] * parallel
    chosen: list[Planned] = []
    left: list[tuple[RunSpec, int]] = []
    order = sorted(pending, key=lambda p: p[1] == 0)  # started runs first, order kept
    for spec, done in order:
        est = timing.estimate(spec, done, gpu, parallel)
        i = min(range(parallel), key=slots.__getitem__)
        if slots[i] + est <= budget:
            slots[i] += est
            chosen.append(Planned(spec, est))
        else:
            left.append((spec, done))
    if fill:
        for i in sorted(range(parallel), key=slots.__getitem__):
            if not left:
                break
            spec, done = left[0]
            per = timing.epoch_seconds(gpu, spec.method, parallel)
            k = int((budget - slots[i] - timing.overhead) // per)
            if k >= 1:
                k = min(k, spec.epochs - done)
                slots[i] += k * per + timing.overhead
                chosen.append(Planned(spec, k * per + timing.overhead, max_epochs=k))
                left.pop(0)
    return chosen


def pending_runs(specs: list[RunSpec], results: Path, work: Path) -> list[tuple[RunSpec, int]]:
    return [(s, epochs_done(work, s.run_id)) for s in specs
            if not (results / f"{s.run_id}.json").is_file()]


def best_parallel(results: Path, gpu: str) -> int:
    p = results / PARALLEL_JSON.format(gpu=gpu)
    return json.loads(p.read_text())["best_parallel"] if p.is_file() else 1


# ----------------------------------------------------------------------------- the pool
def _command() -> str:
    return " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def _worker_cmd(spec_files: list[Path]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_worker", *map(str, spec_files)]


def _write_spec(p: Planned, results: Path, work: Path, parallel: int) -> Path:
    d = work / p.spec.run_id
    d.mkdir(parents=True, exist_ok=True)
    path = d / "spec.json"
    path.write_text(json.dumps({"spec": asdict(p.spec), "results": str(results),
                                "work": str(work), "max_epochs": p.max_epochs,
                                "parallel": parallel, "estimate_s": p.seconds,
                                "command": _command()}, indent=2))
    return path


def run_pool(plan: list[Planned], results: Path, work: Path, parallel: int,
             minutes: float | None, one_process: bool = False) -> dict[str, int]:
    """Start the planned runs, `parallel` worker processes at a time; at the deadline the
    workers get SIGTERM (ssl_sec checkpoints and exits 75) and, 120 s later, SIGKILL.
    Returns each run's exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    if not env["OMP_NUM_THREADS"]:
        env.pop("OMP_NUM_THREADS")
    specs = [_write_spec(p, results, work, parallel) for p in plan]
    if one_process:  # the smoke: every run in one worker (process starts cost seconds)
        jobs = [(",".join(p.spec.run_id for p in plan), specs)]
    else:
        jobs = [(p.spec.run_id, [s]) for p, s in zip(plan, specs, strict=True)]
    t0 = time.monotonic()
    deadline = None if minutes is None else t0 + minutes * 60.0
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    codes: dict[str, int] = {}
    stopping = False
    while jobs or running:
        while jobs and len(running) < parallel and not stopping:
            name, files = jobs.pop(0)
            log = open(files[0].parent / "worker.log", "a")  # noqa: SIM115 - closed below
            print(f"[{time.monotonic() - t0:7.0f} s] start {name}", flush=True)
            running[name] = (subprocess.Popen(_worker_cmd(files), stdout=log,
                                              stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                              start_new_session=True), log)
        time.sleep(0.2)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                del running[name]
                what = {0: "done", PREEMPTED_EXIT: "stopped (checkpoint kept, resumes next time)"}
                print(f"[{time.monotonic() - t0:7.0f} s] {name}: "
                      f"{what.get(proc.returncode, f'FAILED (exit {proc.returncode}, see its worker.log)')}",
                      flush=True)
        if deadline is not None and not stopping and time.monotonic() >= deadline:
            stopping = True
            jobs.clear()
            for name, (proc, _) in running.items():
                print(f"window over: stopping {name}", flush=True)
                proc.send_signal(signal.SIGTERM)
        if stopping and deadline is not None and time.monotonic() >= deadline + 120:
            for proc, _ in running.values():
                proc.kill()
    return codes


# ----------------------------------------------------------------------------- the worker
def _atomic_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(payload, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _metrics(train_dir: Path) -> tuple[list[dict], list[float]]:
    """The kNN curve (epoch, top1, top5) and the seconds of each epoch, from metrics.jsonl."""
    rows = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines()
            if x.strip()]
    epoch_at = {}
    seconds = []
    for r in rows:
        if r["kind"] == "epoch":
            seconds.append(r["perf/epoch_seconds"])
            epoch_at[r["step"]] = len(seconds)
    curve = [{"epoch": epoch_at.get(r["step"]), "step": r["step"], "top1": r["knn/top1"],
              "top5": r["knn/top5"]} for r in rows if r["kind"] == "knn"]
    return curve, seconds


def norm_measure(checkpoint: Path, test_subset: int | None = 0, bins: int = 50) -> dict:
    """`ssl-sec norms`'s statistics of ||h|| and ||z|| (test set, eval mode, before any L2
    normalisation; ssl_sec.evaluation.norms), plus histograms for the report's figure (the
    command keeps its histograms in a PNG only)."""
    import torch

    from ssl_sec.evaluation.norms import embed_norms, norm_statistics
    from ssl_sec.evaluation.session import EvalSession

    extra = None if test_subset is None else {"data": {"test_subset": test_subset}}
    session = EvalSession(checkpoint, data=extra, cache=False, projector=True)
    cfg, device = session.cfg, session.device
    batches = (x for x, _ in session.splits.test.eval_batches(device, cfg.augment.size,
                                                              cfg.data.eval_resize))
    h, z = embed_norms(session.model, batches, session.transform, device,
                       precision=session.precision)
    out = {"split": "test", "n_images": len(h),
           "layers": {"h": "backbone pooled features", "z": "projector output (online)"}}
    for name, x in (("h", h), ("z", z)):
        hi = float(x.max()) * 1.0001 + 1e-12
        counts = torch.histc(x.double(), bins=bins, min=0.0, max=hi)
        out[name] = {**norm_statistics(x), "hist": {"lo": 0.0, "hi": hi,
                                                    "counts": [int(v) for v in counts]}}
    return out


def execute_run(spec: RunSpec, results: Path, work: Path, max_epochs: int | None = None,
                parallel: int = 1, command: str | None = None) -> str:
    """Train (resuming what is there), probe, measure, write the JSON. Returns "done",
    "partial" (stopped by max_epochs) or raises Preempted (a stop signal; checkpointed)."""
    import torch
    from common import provenance

    from ssl_sec.cpu_memory import keep_freed_memory
    from ssl_sec.engine import train
    from ssl_sec.evaluation.linear import linear_command
    from ssl_sec.preemption import Preempted
    from ssl_sec.recipe import load_recipe

    keep_freed_memory()
    cuda = torch.cuda.is_available() and spec.device in ("auto", "cuda")
    if not spec.smoke and not cuda:
        raise SystemExit("ablation: a real run needs a CUDA GPU (its JSON names it); "
                         "without one use --smoke --device cpu")
    gpu = torch.cuda.get_device_name(0) if cuda else None
    run_dir = work / spec.run_id
    train_dir = run_dir / "train"
    cfg = load_recipe(ROOT / spec.recipe, spec.train_overrides(work))
    before = epochs_done(work, spec.run_id)
    attempt = {"start": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gpu": gpu,
               "gpu_slug": gpu_slug(gpu) if gpu else "cpu", "host": platform.node(),
               "method": spec.method, "parallel": parallel, "epochs_before": before,
               "max_epochs": max_epochs}
    t0 = time.perf_counter()
    stopped = None
    try:
        summary = train(cfg, resume="auto", max_epochs=max_epochs, progress_bar=False)
    except Preempted as stop:
        stopped = stop
    after = epochs_done(work, spec.run_id)
    attempt.update(epochs_after=after, pretrain_wall_s=round(time.perf_counter() - t0, 2),
                   outcome="stopped" if stopped else ("partial" if after < spec.epochs
                                                      else "trained"))
    with open(run_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps(attempt) + "\n")
    if stopped is not None:
        raise stopped
    if after < spec.epochs:
        return "partial"

    t1 = time.perf_counter()
    ckpt = train_dir / "last.pt"
    lin = linear_command(ckpt, ROOT / spec.linear_recipe, list(spec.linear_overrides),
                         verbose=False)
    norms = norm_measure(ckpt, test_subset=None if spec.smoke else 0)
    eval_s = time.perf_counter() - t1
    curve, seconds = _metrics(train_dir)
    tries = attempts(work, spec.run_id)
    steady = seconds[1:] or seconds
    payload = {
        "benchmark": "sec_ablation", "campaign": "sec_cifar10", "smoke": spec.smoke,
        "run": spec.run_id, "arm": spec.arm, "seed": spec.seed, "epochs": spec.epochs,
        "method": spec.method, "recipe": spec.recipe, "overrides": list(spec.overrides),
        "base": spec.base, "reference": spec.reference,
        "knn": {"k": summary["knn_k"], "T": summary["knn_temperature"],
                "epoch": summary.get("epoch"), "top1": summary["top1"],
                "top5": summary["top5"], "curve": curve},
        "linear_fast": {k: lin[k] for k in ("top1", "top5", "epochs", "mode", "protocol",
                                            "n_train", "n_test", "seconds")},
        "norms": norms,
        "timing": {"epoch_seconds_median": statistics.median(steady),
                   "epoch_seconds_first": seconds[0], "epochs_timed": len(seconds),
                   "pretrain_wall_s": round(sum(a["pretrain_wall_s"] for a in tries), 2),
                   "eval_wall_s": round(eval_s, 2), "attempts": len(tries),
                   "resumed": any(a["epochs_before"] > 0 for a in tries),
                   "parallel": sorted({a["parallel"] for a in tries})},
        "gpu": gpu, "device": "cuda" if cuda else "cpu", "host": platform.node(),
        "run_dir": os.path.relpath(train_dir, ROOT),
        **provenance(),
    }
    payload["command"] = command or _command()  # the runner's, not the worker's
    _atomic_json(results / f"{spec.run_id}.json", payload)
    print(f"wrote {results / f'{spec.run_id}.json'}", flush=True)
    return "done"


def worker_main(spec_files: list[str]) -> int:
    from ssl_sec.preemption import Preempted

    code = 0
    for f in spec_files:
        d = json.loads(Path(f).read_text())
        s = d["spec"]
        spec = RunSpec(**{**s, "overrides": tuple(s["overrides"]),
                          "linear_overrides": tuple(s["linear_overrides"])})
        try:
            print(f"== {spec.run_id}: {execute_run(spec, Path(d['results']), Path(d['work']), d['max_epochs'], d['parallel'], d.get('command'))}",
                  flush=True)
        except Preempted as stop:
            print(f"== {spec.run_id}: stopped: {stop}", flush=True)
            return PREEMPTED_EXIT
        except Exception:  # one run's failure is reported; the others still run
            import traceback

            traceback.print_exc()
            code = 1
    return code


# ----------------------------------------------------------------------------- commands
def cmd_run(args, c: dict) -> int:
    results, work = dirs(c, args.smoke, args.results, args.work)
    if not args.smoke and args.device == "cpu":
        raise SystemExit("ablation: real runs are GPU runs; --device cpu needs --smoke")
    specs = plan_runs(c, args.smoke, args.device, args.seeds, args.arms)
    pending = pending_runs(specs, results, work)
    skipped = len(specs) - len(pending)
    gpu = this_gpu(args.device)
    if not args.smoke and gpu == "cpu" and args.command != "plan":
        raise SystemExit("ablation: no CUDA GPU here (nvidia-smi found none); real runs name "
                         "their GPU. Use --smoke --device cpu to exercise the machinery.")
    parallel = (best_parallel(results, gpu) if args.parallel == "auto" else int(args.parallel))
    timing = Timing.collect(c, results, work)
    if args.minutes is None:
        plan = [Planned(s, timing.estimate(s, d, gpu, parallel)) for s, d in pending]
    else:
        plan = schedule(pending, timing, gpu, args.minutes, parallel, fill=args.fill)
    print(f"{len(specs)} runs in the campaign, {skipped} finished (skipped), {len(pending)} "
          f"missing; {len(plan)} planned ({gpu}, {parallel} at a time"
          + ("" if args.minutes is None else f", {args.minutes:g} min window") + ")", flush=True)
    for p in plan:
        part = f", {p.max_epochs} epochs this window" if p.max_epochs else ""
        print(f"  {p.spec.run_id}: {epochs_done(work, p.spec.run_id)}/{p.spec.epochs} epochs "
              f"done, ~{p.seconds / 60:.1f} min{part}", flush=True)
    if args.command == "plan" or not plan:
        return 0
    t0 = time.perf_counter()
    codes = run_pool(plan, results, work, parallel, args.minutes, one_process=args.smoke)
    print(f"ran {len(plan)} runs in {time.perf_counter() - t0:.1f} s", flush=True)
    bad = {k: v for k, v in codes.items() if v not in (0, PREEMPTED_EXIT)}
    return 1 if bad else 0


def cmd_measure_parallel(args, c: dict) -> int:
    """Time `levels` runs at once (each the same short run, the campaign's first arm at
    --epochs) and record runs per minute per level; `run --parallel auto` uses the best."""
    results, work = dirs(c, args.smoke, args.results, args.work)
    gpu = this_gpu(args.device)
    if not args.smoke and gpu == "cpu":
        raise SystemExit("ablation: measure-parallel times GPU runs; no CUDA GPU here "
                         "(use --smoke --device cpu to exercise it)")
    base = plan_runs(c, args.smoke, args.device, [0], [args.arm])[0]
    scratch = work / "_parallel"
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)  # finished scratch runs would not retrain
    levels = []
    for n in args.levels:
        plan = []
        for i in range(n):
            s = RunSpec(**{**asdict(base), "arm": f"_par{n}_{i}", "epochs": args.epochs,
                           "overrides": (*base.overrides, "eval.knn_every=0")})
            plan.append(Planned(s, 0.0))
        t0 = time.perf_counter()
        codes = run_pool(plan, scratch / "results", scratch / "work", n, None)
        wall = time.perf_counter() - t0
        if any(codes.values()):
            raise SystemExit(f"measure-parallel: a run failed at {n} at once: {codes}")
        levels.append({"parallel": n, "runs": n, "wall_s": round(wall, 2),
                       "runs_per_minute": round(60.0 * n / wall, 4)})
        print(f"{n} at once: {wall:.1f} s for {n} runs, {60 * n / wall:.3f} runs/min", flush=True)
    one = next((lvl["wall_s"] for lvl in levels if lvl["parallel"] == 1), None)
    for lvl in levels:  # how much longer one run takes when n share the GPU
        lvl["slowdown"] = round(lvl["wall_s"] / one, 4) if one else None
    best = max(levels, key=lambda lvl: lvl["runs_per_minute"])["parallel"]
    from common import provenance

    _atomic_json(results / PARALLEL_JSON.format(gpu=gpu), {
        "benchmark": "sec_ablation_parallel", "smoke": args.smoke, "gpu_slug": gpu,
        "settings": {"arm": args.arm, "epochs": args.epochs, "levels": args.levels,
                     "run": "a full run each: process start, training without kNN passes, "
                            "fast linear probe and norms"},
        "levels": [lvl for lvl in levels if lvl["slowdown"] is not None] or levels,
        "best_parallel": best, **provenance()})
    print(f"best: {best} at once; wrote {results / PARALLEL_JSON.format(gpu=gpu)}")
    return 0


# ----------------------------------------------------------------------------- report
def load_results(results: Path) -> list[dict]:
    runs = []
    for p in sorted(results.glob("*.json")):
        if RUN_JSON.match(p.name) and not p.name.startswith("parallel_"):
            d = json.loads(p.read_text())
            if d.get("benchmark") == "sec_ablation":
                runs.append(d)
    kinds = {bool(d.get("smoke")) for d in runs}
    if len(kinds) > 1:
        smoke = sorted(d["run"] for d in runs if d.get("smoke"))
        raise SystemExit(f"ablation report: {results} mixes smoke and real runs (smoke: "
                         f"{', '.join(smoke[:5])}{' ...' if len(smoke) > 5 else ''}); "
                         "smoke runs belong in their own directory")
    for d in runs:
        if not d.get("smoke") and not d.get("gpu"):
            raise SystemExit(f"ablation report: {d['run']} is not a smoke run but names no "
                             "GPU; real runs are written by the runner on a GPU")
    return runs


def _ms(xs: list[float], digits: int = 2) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    sd_s = f"{sd:.{digits}f}" if math.isfinite(sd) else "n/a"
    return f"{statistics.mean(xs):.{digits}f} ± {sd_s}"


def report(c: dict, runs: list[dict], out_dir: Path, smoke: bool) -> str:
    """The markdown section (and the two PNGs in out_dir)."""
    ep = c.get("smoke", {}).get("epochs", c["epochs"]) if smoke else c["epochs"]
    lines = ["## Does SEC help? CIFAR-10 ablation (issue 18)", ""]
    if smoke:
        lines += ["**SMOKE RUNS: tiny settings on the CPU; these numbers measure nothing "
                  "about SEC.**", ""]
    lines += [
        "Campaign `eval/campaigns/sec_cifar10.yaml` (arms = a recipe plus `key=value` "
        f"overrides), run by `python eval/ablation.py run --minutes M` in GPU windows; "
        f"ResNet-18 (CIFAR stem), batch 512, the recipes' schedules, {c['epochs']} epochs, "
        f"seeds {', '.join(map(str, c['seeds']))}. kNN: k=200, T=0.1 on the backbone "
        "features, bank = the training set; linear: `recipes/linear/fast.yaml` (FAST MODE, "
        "cached un-augmented features); norms: `ssl-sec norms` statistics on the test set "
        "(eval mode, before L2 normalisation). One JSON per run in "
        f"`{os.path.relpath(out_dir, ROOT)}/`; this section is written by "
        "`python eval/ablation.py report`.", ""]
    lines += [
        "Procedure, one GPU window at a time (each command picks up where the last stopped):",
        "", "```",
        "python eval/ablation.py measure-parallel        # once per GPU model: 1, 2, 3 runs at once",
        "python eval/ablation.py plan --minutes M        # what fits in the window",
        "python eval/ablation.py run --minutes M         # runs it; --parallel auto = the winner",
        "python eval/ablation.py report                  # this section and the two PNGs",
        "```", "",
        "A finished run's JSON is written last (atomically) and skipped by the next `run`; at "
        "the end of the window the running trainings get SIGTERM, write a checkpoint and are "
        "resumed (`resume=auto`, as `ssl-sec pretrain --auto-resume`) by the next `run`. "
        "Run times are planned from the epoch times measured by earlier runs on the same GPU "
        "(`<work_dir>/<run>/attempts.jsonl`), else from the campaign's conservative defaults. "
        "`python eval/ablation.py run --smoke --device cpu` runs the machinery (every arm, "
        "1 epoch, 64 images, 8 px) into `eval/runs/ablation-smoke/`, and "
        "`report --smoke` writes its report there; smoke and real runs are never mixed.", ""]
    abl = [d for d in runs if d["epochs"] == ep]
    if not runs:
        lines += ["No run of this campaign has finished yet: the GPU runs have not been made, "
                  "so there is no result here.", ""]
        return "\n".join(lines)
    arms = [a for a in c["arms"] if any(d["arm"] == a for d in abl)]
    by = {a: sorted((d for d in abl if d["arm"] == a), key=lambda d: d["seed"]) for a in arms}
    gpus = sorted({d.get("gpu") or "CPU" for d in runs})
    gits = sorted({d.get("git", "?") for d in runs})
    lines += [f"Runs: {len(runs)} on {', '.join(gpus)}; git {', '.join(gits)}; "
              f"{min(d['date'] for d in runs)} to {max(d['date'] for d in runs)}.", "",
              f"### Per arm at {ep} epoch{'s' if ep != 1 else ''} (mean ± sample std over seeds)", "",
              "| arm | n | seeds | kNN top-1 | kNN top-5 | linear (fast) top-1 | ‖z‖ mean | "
              "‖z‖ CV | ‖h‖ mean | ‖h‖ CV | s/epoch |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in arms:
        rs = by[a]

        def col(f, digits=2, rs=rs):
            return _ms([f(d) for d in rs], digits)

        lines.append(
            f"| {a} | {len(rs)} | {', '.join(str(d['seed']) for d in rs)} | "
            f"{col(lambda d: d['knn']['top1'])} | {col(lambda d: d['knn']['top5'])} | "
            f"{col(lambda d: d['linear_fast']['top1'])} | "
            f"{col(lambda d: d['norms']['z']['mean'], 3)} | "
            f"{col(lambda d: d['norms']['z']['cv'], 3)} | "
            f"{col(lambda d: d['norms']['h']['mean'], 3)} | "
            f"{col(lambda d: d['norms']['h']['cv'], 3)} | "
            f"{col(lambda d: d['timing']['epoch_seconds_median'], 2)} |")
    lines += ["", "### Paired differences against the method's base (arm − base, same seed)", "",
              "| arm | base | seeds paired | Δ kNN top-1 per seed | Δ kNN top-1 | "
              "Δ linear top-1 | Δ ‖z‖ CV | arm higher on kNN |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    paired_rows = 0
    for a in arms:
        base = c["arms"][a].get("base")
        if not base or base not in by:
            continue
        bs = {d["seed"]: d for d in by[base]}
        pairs = [(d, bs[d["seed"]]) for d in by[a] if d["seed"] in bs]
        if not pairs:
            continue
        paired_rows += 1
        dk = [x["knn"]["top1"] - b["knn"]["top1"] for x, b in pairs]
        dl = [x["linear_fast"]["top1"] - b["linear_fast"]["top1"] for x, b in pairs]
        dz = [x["norms"]["z"]["cv"] - b["norms"]["z"]["cv"] for x, b in pairs]
        lines.append(f"| {a} | {base} | {len(pairs)} | "
                     f"{', '.join(f'{v:+.2f}' for v in dk)} | {_ms(dk)} | {_ms(dl)} | "
                     f"{_ms(dz, 3)} | {sum(v > 0 for v in dk)} of {len(dk)} seeds |")
    if not paired_rows:
        lines.append("| (no arm has a finished base run with the same seed yet) | | | | | | | |")
    repro = []
    for r in c.get("reproduction", []):
        r_ep = ep if smoke else r["epochs"]
        for d in runs:
            if d["arm"] == r["arm"] and d["epochs"] == r_ep and d["seed"] in r.get("seeds", [0]):
                repro.append((r, d))
    if repro:
        lines += ["", "### Reproduction against lightly's published CIFAR-10 kNN", "",
                  "| run | kNN top-1 | kNN top-5 | reference top-1 | difference | reference |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r, d in repro:
            ref = r["reference"]["knn_top1"]
            lines.append(f"| {d['run']} | {d['knn']['top1']:.2f} | {d['knn']['top5']:.2f} | "
                         f"{ref:.1f} | {d['knn']['top1'] - ref:+.2f} | {r['reference']['source']} |")
    knn_png, norms_png = plot(runs, arms, by, out_dir)
    rel = os.path.relpath(out_dir, RESULTS_MD.parent if not smoke else out_dir)
    lines += ["", f"kNN top-1 against epoch per arm (mean over seeds): "
              f"![kNN curves]({rel}/{knn_png.name}); distributions of ‖z‖ and ‖h‖ on the "
              f"test set per arm (seeds pooled): ![norms]({rel}/{norms_png.name}).", ""]
    return "\n".join(lines)


def plot(runs: list[dict], arms: list[str], by: dict, out_dir: Path) -> tuple[Path, Path]:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("ablation report: the figures need matplotlib: "
                         "pip install ssl_sec[plots]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for a in arms:
        per_epoch: dict[int, list[float]] = {}
        for d in by[a]:
            for pt in d["knn"]["curve"]:
                per_epoch.setdefault(pt["epoch"], []).append(pt["top1"])
        xs = sorted(per_epoch)
        ax.plot(xs, [statistics.mean(per_epoch[x]) for x in xs], marker="o", ms=3,
                label=f"{a} (n={len(by[a])})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.legend(fontsize=7)
    knn_png = out_dir / "knn_curves.png"
    fig.savefig(knn_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for ax, layer, label in ((axes[0], "z", "‖z‖ (projector output)"),
                             (axes[1], "h", "‖h‖ (backbone, pooled)")):
        for a in arms:
            for i, d in enumerate(by[a]):
                hst = d["norms"][layer]["hist"]
                n = len(hst["counts"])
                w = (hst["hi"] - hst["lo"]) / n
                mids = [hst["lo"] + (k + 0.5) * w for k in range(n)]
                total = max(sum(hst["counts"]), 1)
                ax.plot(mids, [v / total / w for v in hst["counts"]], lw=1,
                        color=f"C{arms.index(a)}", label=a if i == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel("density")
    axes[0].legend(fontsize=7)
    norms_png = out_dir / "norm_distributions.png"
    fig.savefig(norms_png, dpi=110)
    plt.close(fig)
    return knn_png, norms_png


def write_section(md: Path, section: str) -> None:
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    text = md.read_text() if md.is_file() else ""
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: block, text) if pattern.search(text) else \
        text.rstrip("\n") + ("\n\n" if text else "") + block
    md.write_text(new.rstrip("\n") + "\n")


def cmd_report(args, c: dict) -> int:
    results, _ = dirs(c, args.smoke, args.results, args.work)
    runs = load_results(results)
    smoke = args.smoke or any(d.get("smoke") for d in runs)
    if smoke and not args.smoke:
        raise SystemExit(f"ablation report: {results} holds smoke runs; pass --smoke (the "
                         "smoke report never goes to eval/RESULTS.md)")
    if args.smoke and runs and not all(d.get("smoke") for d in runs):
        raise SystemExit(f"ablation report --smoke: {results} holds real runs")
    section = report(c, runs, results, smoke)
    md = results / "REPORT.md" if smoke else RESULTS_MD
    write_section(md, section)
    print(f"wrote {md} ({len(runs)} runs)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return worker_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:8]))
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--campaign", default=str(CAMPAIGN))
    common.add_argument("--smoke", action="store_true",
                        help="tiny settings (the campaign's smoke section), separate directory")
    common.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    common.add_argument("--results", default=None, help="override the results directory")
    common.add_argument("--work", default=None, help="override the work directory")
    for name in ("run", "plan"):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("--minutes", type=float, default=None,
                       help="the GPU window less a margin (a stop takes up to a minute): "
                            "plan the runs that fit, SIGTERM the rest after M minutes")
        p.add_argument("--parallel", default="auto",
                       help="runs at once on the GPU (auto: the best of measure-parallel, else 1)")
        p.add_argument("--no-fill", dest="fill", action="store_false",
                       help="do not spend a window's leftover on part of a run that does not fit")
        p.add_argument("--seeds", type=int, nargs="+", default=None)
        p.add_argument("--arms", nargs="+", default=None)
    mp = sub.add_parser("measure-parallel", parents=[common])
    mp.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    mp.add_argument("--epochs", type=int, default=5)
    mp.add_argument("--arm", default="simclr_base")
    sub.add_parser("report", parents=[common])
    args = ap.parse_args(argv)
    c = load_campaign(args.campaign)
    if args.command in ("run", "plan"):
        return cmd_run(args, c)
    if args.command == "measure-parallel":
        return cmd_measure_parallel(args, c)
    return cmd_report(args, c)


if __name__ == "__main__":
    sys.exit(main())

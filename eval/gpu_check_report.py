"""The summary of one `scripts/gpu_check.sh` run: a per-stage time table and one JSON.

    python eval/gpu_check_report.py --stages FILE [--junit FILE] [--budget S] \
        [--results FILE ...] [--out FILE]

--stages is the tab-separated file gpu_check.sh writes, one line per stage: name, timeout
seconds, seconds taken, result (pass, fail, timeout or skipped), exit code, command.
Writes eval/results/gpu_check_<gpu>.json: the stages, pass/fail counts, the total time against
the budget, pytest's counts, the headline figures of each benchmark JSON named by --results
(and the file names), and the machine: GPU, host CPU model and core count, versions, git.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_model, gpu_slug, usable_cores, write_result  # noqa: E402

RESULTS = ("pass", "fail", "timeout", "skipped")


def read_stages(path: Path) -> list[dict]:
    stages = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, limit, seconds, result, code, command = (line.split("\t") + [""] * 6)[:6]
        stages.append({"stage": name, "timeout_s": int(limit), "seconds": int(seconds),
                       "result": result, "exit_code": int(code) if code.lstrip("-").isdigit()
                       else None, "command": command})
    return stages


def counts(stages: list[dict]) -> dict:
    return {r: sum(s["result"] == r for s in stages) for r in RESULTS}


def stage_table(stages: list[dict], budget: int) -> str:
    rows = [("stage", "result", "seconds", "timeout")]
    rows += [(s["stage"], s["result"], str(s["seconds"]), str(s["timeout_s"])) for s in stages]
    total = sum(s["seconds"] for s in stages)
    rows.append(("total", f"{counts(stages)['pass']}/{len(stages)} passed", str(total),
                 f"budget {budget}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def headline(path: Path) -> dict:
    """The few figures of a benchmark JSON that say where things stand."""
    d = json.loads(path.read_text())
    out: dict = {"file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)}
    if "pretrain" in d:  # eval/bench_gpu.py
        sim = d["pretrain"]["simclr"]
        out |= {"simclr_images_per_s": sim["images_per_s"],
                "simclr_train_images": sim.get("train_images"),
                "ratio_vs_lightly": d.get("ratio_vs_lightly")}
    if "verdicts" in d:  # eval/bench_imagenet_gpu.py
        out["imagenet"] = [{k: v[k] for k in ("arch", "decode", "status", "images_per_s",
                                              "meets_images_per_s", "ratio_vs_lightly",
                                              "meets_ratio")} for v in d["verdicts"]]
        out["skipped"] = d.get("skipped", [])
    return out


def junit_counts(path: str | None) -> dict | None:
    if not path or not Path(path).is_file() or not Path(path).stat().st_size:
        return None
    from bench_gpu import junit_summary

    return junit_summary(path)


def machine() -> dict:
    """GPU and host CPU, also when the stage that installs kornia/lightly failed (then
    common.provenance, which imports them, cannot run)."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"platform": platform.platform(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "cpu_cores_usable": usable_cores(), "gpu": gpu}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", required=True)
    ap.add_argument("--junit", default=None, help="pytest's JUnit XML of the GPU tests")
    ap.add_argument("--budget", type=int, default=480, help="seconds the whole check may take")
    ap.add_argument("--results", nargs="*", default=[], help="benchmark JSONs this run wrote")
    ap.add_argument("--out", default=None, help="default: eval/results/gpu_check_<gpu>.json")
    args = ap.parse_args(argv)
    stages = read_stages(Path(args.stages))
    host = machine()
    total = sum(s["seconds"] for s in stages)
    summary = {"stages": stages, "counts": counts(stages), "seconds_total": total,
               "budget_seconds": args.budget, "within_budget": total <= args.budget,
               "tests": junit_counts(args.junit),
               "benchmarks": [headline(Path(p)) for p in args.results if Path(p).is_file()],
               "host": host}
    print(stage_table(stages, args.budget))
    print(f"GPU {host['gpu'] or 'none'}; host CPU {host['cpu_model'] or 'not recorded'}, "
          f"{host['cpu_cores_usable']} usable of {host['cpu_count']} cores")
    out = args.out or f"eval/results/gpu_check_{gpu_slug(host['gpu'] or 'cpu')}.json"
    try:
        write_result(out, summary)
    except ImportError as err:  # no kornia/lightly: keep the summary without their versions
        path = Path(out) if Path(out).is_absolute() else ROOT / out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": host, "provenance_error": str(err), **summary},
                                   indent=2) + "\n")
        print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()

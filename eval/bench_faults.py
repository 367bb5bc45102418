"""Cluster safety, measured: the fault-injection and hostile-input suites, and what a
checkpoint costs.

    python eval/bench_faults.py [--out eval/results/faults_cpu.json] [--checkpoint-only]

1. Runs tests/test_faults.py and tests/test_hostile.py (real training processes, real
   signals, real data) and records every case with its outcome and seconds.
2. Times `save_rotated` / `load_checkpoint` of the CIFAR recipe's model (ResNet-18, CIFAR
   stem, LARS state; recipes/cifar10/simclr.yaml) in a temp folder on this machine, and the
   share of training time the default `ckpt_every_minutes: 10` spends writing; what the
   sha256 seal adds to a write and to a load; and a corruption campaign on that checkpoint:
   one bit flipped at each of ~500 offsets (every zip header byte of its first entry, its
   pickled state, tensor data throughout, the end of the file), counted as caught when
   `load_checkpoint` refuses the file.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

# What each fault test injects, and the most training it may lose (asserted by the test).
FAULTS = {
    "test_kill_9_at_random_steps_resumes_exactly": ("3 x kill -9 at seeded random steps "
                                                    "(ckpt_every_steps=1)", "1 step"),
    "test_kill_during_a_checkpoint_write": ("kill -9 half way through a checkpoint write",
                                            "1 step"),
    "test_stop_signal_checkpoints_mid_epoch_and_resumes_exactly": ("SIGTERM / SIGUSR1 / "
                                                                   "SIGINT mid-epoch", "0 steps"),
    "test_corrupt_last_pt_names_prev_pt_which_resumes": ("truncated last.pt, resume from "
                                                         "prev.pt", "ckpt_every_steps (2)"),
    "test_second_run_in_the_same_directory_is_refused": ("second run in the same directory, "
                                                         "then kill -9 of the first", "-"),
    "test_nan_stops_with_exit_2_and_keeps_the_checkpoint": ("NaN after and before the first "
                                                            "checkpoint", "-"),
    "test_full_disk_while_writing_a_checkpoint": ("file-size limit (EFBIG) while writing",
                                                  "-"),
    "test_two_nodes_sigterm_and_exact_resume_same_world_size_only": (
        "SIGTERM to both agents of a 2-node c10d run; resume with 1 and 2 processes", "0 steps"),
    "test_slurm_script_requeues_on_the_time_limit_signal_and_resumes": (
        "SIGUSR1 to the SLURM job script (srun/scontrol stand-ins)", "0 steps"),
    "test_streamed_run_sigterm_to_every_process_resumes_exactly": (
        "SIGTERM to a streaming run's whole process group", "0 steps"),
}


def run_suites() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_faults.py",
                        "tests/test_hostile.py", f"--junitxml={xml}"], cwd=ROOT, check=False)
        cases = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            cases.append({"module": case.get("classname"), "name": case.get("name"),
                          "seconds": round(float(case.get("time")), 2),
                          "outcome": "failed" if failed else "skipped" if skipped else "passed"})
        return cases


def checkpoint_costs() -> dict:
    import torch

    from ssl_sec.checkpoint import FORMAT_VERSION, atomic_save, load_checkpoint, save_rotated
    from ssl_sec.config import to_dict
    from ssl_sec.digest import check_seal
    from ssl_sec.engine import build_model
    from ssl_sec.errors import CheckpointError
    from ssl_sec.optim import build_optimizer
    from ssl_sec.recipe import load_recipe

    cfg = load_recipe(ROOT / "recipes" / "cifar10" / "simclr.yaml", ["device=cpu"])
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optim)
    model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), 0.0, False).losses[
        "total"].backward()
    optimizer.step()  # momentum buffers exist, as in a real checkpoint
    state = {"format": "ssl_sec", "format_version": FORMAT_VERSION, "config": to_dict(cfg),
             "step": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    times: dict[str, list[float]] = {"write": [], "write_unsealed": [], "read": [],
                                     "seal_check": []}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        last, prev = Path(tmp) / "last.pt", Path(tmp) / "prev.pt"
        plain = Path(tmp) / "plain.pt"
        for _ in range(5):  # interleaved, so that both see the same disk and cache
            timed("write", lambda: save_rotated(state, last, prev))
            timed("write_unsealed", lambda: atomic_save(state, plain))
            timed("read", lambda: load_checkpoint(last))
            timed("seal_check", lambda: check_seal(last))
        size = last.stat().st_size
        campaign = corruption_campaign(last, load_checkpoint, CheckpointError)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": "recipes/cifar10/simclr.yaml (ResNet-18, CIFAR stem, LARS momentum)",
            "folder": "a temp folder in the checkout (this machine's disk)",
            "size_mb": round(size / 1e6, 1),
            "write_seconds_median_of_5": round(med["write"], 3),
            "write_unsealed_seconds_median_of_5": round(med["write_unsealed"], 3),
            "seal_share_of_write": round((med["write"] - med["write_unsealed"]) / med["write"], 3),
            "read_seconds_median_of_5": round(med["read"], 3),
            "seal_check_seconds_median_of_5": round(med["seal_check"], 3),
            "seal_check_share_of_read": round(med["seal_check"] / med["read"], 3),
            "share_of_time_writing_at_ckpt_every_minutes_10": round(med["write"] / 600, 5),
            "corruption": campaign}


def corruption_campaign(path: Path, load, error) -> dict:
    """Flip one bit at each offset of several parts of the file; a flip is caught when
    `load` raises `error`. The file is restored after each try."""
    import struct
    import zipfile

    good = path.read_bytes()
    n = len(good)
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    first = infos[0]
    pickled = next(i for i in infos if i.filename.endswith("data.pkl"))
    names, extra = struct.unpack("<HH", good[pickled.header_offset + 26:pickled.header_offset + 30])
    pkl_start = pickled.header_offset + 30 + names + extra
    parts = {
        "zip header of the first entry": list(range(first.header_offset,
                                                    first.header_offset + 30 + names)),
        "pickled state": list(range(pkl_start, pkl_start + pickled.compress_size,
                                    max(1, pickled.compress_size // 100))),
        "tensor data": list(range(pkl_start + pickled.compress_size, n - 4096, n // 300)),
        "end (directory, seal)": list(range(n - 256, n)),
    }
    out = {}
    try:
        for part, offsets in parts.items():
            caught = 0
            for offset in offsets:
                damaged = bytearray(good)
                damaged[offset] ^= 0x08
                path.write_bytes(bytes(damaged))
                try:
                    load(path)
                except error:
                    caught += 1
            out[part] = {"tried": len(offsets), "caught": caught}
    finally:
        path.write_bytes(good)
    out["total"] = {"tried": sum(v["tried"] for v in out.values()),
                    "caught": sum(v["caught"] for v in out.values())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval/results/faults_cpu.json")
    ap.add_argument("--checkpoint-only", action="store_true",
                    help="only the checkpoint costs and the corruption campaign (seconds, not "
                         "the suites' minutes); writes eval/results/checkpoint_seal_cpu.json "
                         "unless --out is given")
    args = ap.parse_args()
    if args.checkpoint_only:
        out = args.out if args.out != ap.get_default("out") else \
            "eval/results/checkpoint_seal_cpu.json"
        write_result(out, {"checkpoint": checkpoint_costs()})
        return
    cases = run_suites()
    faults = [c for c in cases if c["module"].endswith("test_faults")]
    hostile = [c for c in cases if c["module"].endswith("test_hostile")]
    injected = []
    for c in faults:
        base = c["name"].split("[")[0]
        what, lost = FAULTS.get(base, (base, "?"))
        injected.append({**c, "fault": what + (f" [{c['name'].split('[')[1]}"
                                               if "[" in c["name"] else ""),
                         "lost_at_most": lost})
    table = [c for c in hostile if c["name"].startswith("test_hostile_input_is_one_line_exit_2")]
    out = {
        "faults": {"tests": len(faults), "passed": sum(c["outcome"] == "passed" for c in faults),
                   "cases": injected},
        "hostile": {"table_cases": len(table),
                    "table_passed": sum(c["outcome"] == "passed" for c in table),
                    "subprocess_cases": sum(c["name"].startswith("test_subprocess")
                                            for c in hostile),
                    "tests": len(hostile),
                    "passed": sum(c["outcome"] == "passed" for c in hostile),
                    "failed": [c["name"] for c in hostile if c["outcome"] != "passed"]},
        "checkpoint": checkpoint_costs(),
    }
    write_result(args.out, out)


if __name__ == "__main__":
    main()

"""The GPU check's pieces that run without a GPU: the ImageNet-size benchmark's smoke run, the
data pack's round trip, the check's stage report, the README's generated GPU block and
gpu_check.sh's --help (on a GPU machine they run for real in scripts/gpu_check.sh)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))


def test_imagenet_benchmark_smoke_runs_on_the_cpu(tmp_path):
    """`--smoke --device cpu`: every stage of the script (folder, loader alone, both recipes
    through `ssl-sec pretrain`, lightly's pipeline, the report) runs tiny; GPU decoding is
    reported as skipped, not silently dropped."""
    out = tmp_path / "imagenet_smoke.json"
    run = subprocess.run([sys.executable, "eval/bench_imagenet_gpu.py", "--smoke", "--device",
                          "cpu", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    d = json.loads(out.read_text())
    assert "500x375" in d["note"] and "built" in d["note"]
    assert {(r["arch"], r["decode"], r["status"]) for r in d["ssl_sec"]} == {
        ("resnet18", "cpu", "ok"), ("resnet50", "cpu", "ok")}
    assert all(r["images_per_s"] > 0 and len(r["epoch_seconds"]) == 2 for r in d["ssl_sec"])
    # ResNet-18 runs the recipe to its end (its kNN pass); ResNet-50 stops after its epochs.
    assert [r["final_knn"] for r in d["ssl_sec"]] == [True, False]
    assert d["ssl_sec"][0]["knn_top1_meaningless"] is not None
    assert d["loader_only"]["status"] == "ok" and d["loader_only"]["cpu"]["images_per_s"] > 0
    assert d["lightly"]["status"] == "ok"
    assert set(d["lightly"]["models"]) == {"resnet18", "resnet50"}
    assert any("decode=gpu" in s for s in d["skipped"])
    assert "extrapolated" in d["imagenet100_epoch"]["note"]
    assert {"cpu_model", "cpu_count", "cpu_cores_usable"} <= set(d["machine"])
    assert [v["arch"] for v in d["verdicts"]] == ["resnet18", "resnet50"]
    assert "SMOKE RUN" in run.stdout
    import summarize  # the README / RESULTS.md table of such a JSON

    assert len(summarize.imagenet_rows(d)) == 2 + len(d["verdicts"])


def test_gpu_utilisation_is_cut_to_the_steady_epochs(tmp_path):
    """Readings count from the second epoch's first logged step to the last epoch's end;
    the checkpoint written after an epoch row is left out."""
    from bench_imagenet_gpu import Budget, UtilizationSampler, utilization_reader

    assert utilization_reader("cpu") == (None, "not a GPU run")
    sampler = UtilizationSampler(lambda: 0, tmp_path / "metrics.jsonl")
    assert sampler.last_row() == ("", 0)  # no file yet
    (tmp_path / "metrics.jsonl").write_text('{"kind": "start", "step": 1}\n'
                                            '{"kind": "train", "step": 12}\n')
    assert sampler.last_row() == ("train", 12)
    sampler.samples = [(10, "start", 1), (20, "train", 5), (30, "epoch", 10), (90, "train", 15),
                       (70, "train", 20), (5, "epoch", 20)]
    steady = sampler.steady(steps_per_epoch=10)
    assert steady["samples"] == 2 and steady["mean_percent"] == 80 and steady["min_percent"] == 70
    assert sampler.steady(steps_per_epoch=100) is None
    assert Budget(30, 0).next() == 30
    assert Budget(30, 100).next() == 30 and 19 < Budget(30, 25).next() <= 20
    assert Budget(30, 15).next() is None  # under 15 s left: not started


def test_data_pack_round_trip(tmp_path, data_root):
    """gpu_pack.sh's parts (here forced small) rejoin and unpack the way gpu_check.sh does,
    into a CIFAR-10 subset and the CIFAR-100 subset that ssl_sec loads, and the JPEG sample."""
    pack = tmp_path / "pack"
    run = subprocess.run(["bash", "scripts/gpu_pack.sh", str(pack), "--train", "50", "--test",
                          "20", "--part-mib", "1", "--data", str(data_root),
                          "--python", sys.executable], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    parts = sorted(pack.glob("ssl_sec_data.tar.xz.*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 2**20 for p in parts)
    manifest = json.loads((pack / "pack.json").read_text())
    assert manifest["total_bytes"] == sum(p.stat().st_size for p in parts)
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=pack, check=True)
    dest = tmp_path / "data"
    joined = b"".join(p.read_bytes() for p in parts)
    # The same extraction gpu_check.sh's unpack_data runs.
    script = re.search(r"-c '(import sys, tarfile.*?)'", (ROOT / "scripts/gpu_check.sh")
                       .read_text(), re.S).group(1)
    subprocess.run([sys.executable, "-c", script, str(dest)], input=joined, check=True)
    from ssl_sec.data import load_cifar

    train, test = load_cifar("cifar10", dest), load_cifar("cifar10", dest, train=False)
    full = load_cifar("cifar10", data_root, train=False)
    assert len(train) == 50 and len(test) == 20
    assert (test.images == full.images[:20]).all() and (test.labels == full.labels[:20]).all()
    assert len(load_cifar("cifar100", dest)) == len(load_cifar("cifar100", data_root))
    assert len(list((dest / "imagefolder-sample").glob("*/*.jpg"))) == len(
        list((data_root / "imagefolder-sample").glob("*/*.jpg")))


def test_gpu_check_report_names_stages_and_machine(tmp_path):
    from gpu_check_report import main

    stages = tmp_path / "stages.tsv"
    stages.write_text("setup\t30\t12\tpass\t0\tbash -c install_missing\n"
                      "tests\t110\t110\ttimeout\t124\tpython -m pytest tests -m gpu\n"
                      "pack\t0\t0\tskipped\t\tno --pack\n")
    out = tmp_path / "check.json"
    summary = main(["--stages", str(stages), "--budget", "480", "--out", str(out)])
    assert summary["counts"] == {"pass": 1, "fail": 0, "timeout": 1, "skipped": 1}
    assert summary["seconds_total"] == 122 and summary["within_budget"]
    d = json.loads(out.read_text())
    assert d["stages"][1]["exit_code"] == 124 and d["stages"][2]["exit_code"] is None
    assert d["machine"]["cpu_model"] == d["host"]["cpu_model"]


def test_readme_gpu_block_is_generated_from_the_json(tmp_path, monkeypatch):
    """The committed block is what the generator makes of the committed JSON (so it cannot
    drift), it names the GPU and host CPU, and a rewrite leaves the rest of the file alone."""
    import summarize

    text = (ROOT / "README.md").read_text()
    inside = text.split(summarize.BEGIN + "\n")[1].split("\n" + summarize.END)[0]
    assert inside == summarize.readme_block()
    path, d = summarize.gpu_benchmarks()[-1]
    assert d["gpu"]["name"] in inside and d["machine"]["cpu_model"] in inside
    copy = tmp_path / "README.md"
    copy.write_text(text.replace(inside, "stale"))
    summarize.write_readme(copy)
    assert copy.read_text() == text

    no_cpu = {**d, "machine": {k: v for k, v in d["machine"].items() if k != "cpu_model"}}
    assert summarize.host(no_cpu) == "host CPU not recorded"


def test_gpu_check_help_lists_every_option():
    script = (ROOT / "scripts/gpu_check.sh").read_text()
    help_text = subprocess.run(["bash", "scripts/gpu_check.sh", "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    options = set(re.findall(r"^\s+(--[a-z-]+)\)", script, re.M))
    assert options and all(o in help_text for o in options), options
    for env in re.findall(r"\$\{([A-Z]+_TIMEOUT):-", script):
        assert env in help_text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="no shellcheck")
def test_gpu_scripts_pass_shellcheck():
    subprocess.run(["shellcheck", "scripts/gpu_check.sh", "scripts/gpu_pack.sh",
                    "scripts/gpu_wheels.sh"], cwd=ROOT, check=True)


def test_the_benchmark_counts_step_flops_as_the_arithmetic_says():
    """eval/bench_gpu.py's limit columns: FlopCounterMode's count of one training step is
    forward + backward (about 3x the forward: the first convolution needs no input gradient),
    MoCo adds the key encoder's forward of both views (about 4/3 of SimCLR's step), and the
    fraction of the peak follows from the measured milliseconds."""
    import torch
    from bench_gpu import limit_fraction, step_flops
    from torch.utils.flop_counter import FlopCounterMode

    from ssl_sec.methods import build_model
    from ssl_sec.recipe import from_dict

    small = ["model.cifar_stem=false", "model.proj_hidden_dim=64", "model.proj_output_dim=16",
             "optim.batch_size=8", "augment.size=32", "moco.bn_splits=2", "moco.queue_size=16",
             "loss.sec.eta=0.1"]
    g = torch.Generator().manual_seed(0)
    views = (torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g))
    counted = {}
    for method in ("simclr", "moco"):
        cfg = from_dict({}, [*small, f"method={method}"])
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu")).train()
        counted[method] = step_flops(model, views, cfg)
    torch.manual_seed(0)
    model = build_model(from_dict({}, [*small, "method=simclr"]), torch.device("cpu")).train()
    with FlopCounterMode(display=False) as forward_only, torch.no_grad():
        model(*views, 0.5, False)
    ratio = counted["simclr"] / forward_only.get_total_flops()
    assert 2.8 < ratio <= 3.0, ratio
    assert 1.25 < counted["moco"] / counted["simclr"] < 1.4
    lim = limit_fraction(2e12, 10.0, {"tflops": 400.0})
    assert lim["achieved_tflops"] == pytest.approx(200.0)
    assert lim["fraction_of_peak"] == pytest.approx(0.5) and lim["ideal_ms_per_step"] == 5.0

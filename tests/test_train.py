"""Short real training runs on a CIFAR-10 subset: artefacts, resume equivalence, CLI errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli, small_cfg

from ssl_sec.checkpoint import load_checkpoint
from ssl_sec.engine import train
from ssl_sec.errors import CheckpointError, ConfigError, UserError
from ssl_sec.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]

def test_short_real_run_writes_events_metrics_checkpoint(tmp_path, data_root):
    result = train(small_cfg(tmp_path, "loss.sec.eta=0.05", "loss.sec.mu=ema"), progress_bar=False)
    run = tmp_path / "run"
    assert (run / "last.pt").is_file() and (run / "epoch0002.pt").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"]["sec"]["eta"] == 0.05
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) >= 4
    for key in ("loss/infonce", "loss/sec", "loss/total", "lr", "diag/norm_mean", "diag/norm_cv",
                "diag/pos_sim", "diag/neg_sim", "diag/contrastive_top1", "diag/z_dim_std",
                "perf/images_per_s"):
        assert key in train_rows[-1], key
        assert all(torch.isfinite(torch.tensor(r[key])) for r in train_rows)
    knn_rows = [r for r in rows if r["kind"] == "knn"]
    assert len(knn_rows) == 2 and 0 <= knn_rows[-1]["knn/top1"] <= 100
    assert result["top1"] == knn_rows[-1]["knn/top1"] and result["epoch"] == 2
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    # SEC's running mu is state: it is in the checkpoint.
    assert torch.isfinite(ckpt["model"]["objective.terms.sec.mu"])
    # TensorBoard holds the logged tags, a norm histogram and the augmentation previews.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"knn/top1", "knn/top5", "loss/sec", "lr"} <= set(tags["scalars"])
    assert "norm/hist" in tags["histograms"]
    assert {"augment/view1", "augment/view2"} <= set(tags["images"])


def test_resume_equals_uninterrupted_run(tmp_path, data_root):
    cfg_a = small_cfg(tmp_path, "name=a", "loss.sec.eta=0.05", "loss.sec.mu=ema", "eval.knn_every=0")
    train(cfg_a, progress_bar=False)
    cfg_b = small_cfg(tmp_path, "name=b", "loss.sec.eta=0.05", "loss.sec.mu=ema", "eval.knn_every=0")
    train(cfg_b, progress_bar=False, max_epochs=1)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    train(cfg_b, resume=True, progress_bar=False)
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 8
    # Bit for bit, as every resume on the CPU (tests/test_faults.py): a tolerance would hide
    # a state that is restored slightly wrong.
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        torch.testing.assert_close(sb["momentum_buffer"], sa["momentum_buffer"], rtol=0, atol=0)


def test_run_directory_is_never_overwritten_and_resume_checks(tmp_path, data_root):
    cfg = small_cfg(tmp_path, "optim.epochs=1", "eval.knn_every=0")
    train(cfg, progress_bar=False)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        train(cfg, progress_bar=False)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    with pytest.raises(ConfigError, match="optim.momentum"):
        train(small_cfg(tmp_path, "optim.epochs=1", "optim.momentum=0.8"), resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(small_cfg(tmp_path, "name=nothing"), resume=True)


def test_batch_larger_than_dataset(tmp_path, data_root):
    with pytest.raises(ConfigError, match="optim.batch_size"):
        train(small_cfg(tmp_path, "data.train_subset=16"), progress_bar=False)


@pytest.mark.parametrize("args,fragment,process", [
    (["pretrain", "recipes/quickstart.yaml", "optim.lrr=1"], "unknown key 'optim.lrr'", True),
    (["pretrain", "recipes/nope.yaml"], "recipe 'recipes/nope.yaml' not found", False),
    (["pretrain", "recipes/quickstart.yaml", "loss.infonce.temperature=0"], "loss.infonce.temperature", False),
    (["pretrain", "recipes/quickstart.yaml", "data.root=/nonexistent/x", "data.download=false"],
     "/nonexistent/x", False),
    (["knn", "--checkpoint", "missing.pt"], "checkpoint 'missing.pt' not found", True),
])
def test_cli_user_errors_one_line_exit_2(args, fragment, process, tmp_path):
    # From the repository, so that relative recipe paths work; runs go into tmp_path.
    extra = [f"out_dir={tmp_path}"] if args[0] == "pretrain" else []
    proc = run_cli(*args, *extra, process=process)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0]


def test_cli_rejects_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_cli("knn", "--checkpoint", str(bad))
    assert proc.returncode == 2 and "cannot be read" in proc.stderr
    assert bad.read_bytes() == b"not a checkpoint"


def test_knn_command_on_trained_checkpoint(tmp_path, data_root):
    train(small_cfg(tmp_path, "optim.epochs=1", "eval.knn_every=0"), progress_bar=False)
    ckpt = tmp_path / "run" / "last.pt"
    proc = run_cli("knn", "--checkpoint", str(ckpt), "eval.knn_k=10", process=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["k"] == 10 and result["n_train"] == 128 and result["n_test"] == 200
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert json.loads((tmp_path / "run" / "last.knn.json").read_text())["top1"] == result["top1"]


def test_quickstart_recipe_is_valid():
    cfg = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert cfg.data.dataset == "cifar10" and cfg.data.train_subset == 0

"""Norm diagnostics: statistics equal a direct computation; JSON and PNG are written."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli

from ssl_sec.augment import EvalTransform
from ssl_sec.data import NORMALIZATION, load_splits
from ssl_sec.engine import build_model
from ssl_sec.errors import UserError
from ssl_sec.evaluation import norms as norms_mod
from ssl_sec.evaluation.norms import embed_norms, norm_statistics, norms_command
from ssl_sec.recipe import from_dict

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_norm_statistics_match_numpy():
    x = torch.tensor([1.0, 2.0, 2.5, 4.0, 10.0])
    s = norm_statistics(x)
    v = x.double().numpy()
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(v.mean())
    assert s["std"] == pytest.approx(v.std(ddof=1))
    assert s["cv"] == pytest.approx(v.std(ddof=1) / v.mean())
    assert (s["min"], s["max"], s["median"]) == (1.0, 10.0, 2.5)
    assert s["p05"] == pytest.approx(np.quantile(v, 0.05))
    assert s["p95"] == pytest.approx(np.quantile(v, 0.95))


def test_norms_command_writes_json_and_png_matching_a_direct_computation(make_checkpoint,
                                                                         data_root):
    path = make_checkpoint()
    result = norms_command(path, ["data.test_subset=64"])
    saved = json.loads(path.with_name("last.norms.json").read_text())
    assert saved["h"] == result["h"] and saved["n_images"] == 64
    png = path.with_name("last.norms.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000

    # Direct computation: the model from the checkpoint, eval mode, plain test view.
    ckpt = torch.load(path, weights_only=True)
    cfg = from_dict(ckpt["config"])
    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(ckpt["model"])
    model.eval()
    test_set = load_splits(cfg.data).test
    mean, std = NORMALIZATION["cifar10"]
    with torch.no_grad():
        h = model.encoder.backbone(EvalTransform(size=32, mean=mean, std=std)(test_set.images))
        z = model.encoder.projector(h)
    for name, feats in (("h", h), ("z", z)):
        n = feats.double().norm(dim=1).numpy()
        assert result[name]["mean"] == pytest.approx(n.mean(), rel=1e-5)
        assert result[name]["std"] == pytest.approx(n.std(ddof=1), rel=1e-4)
        assert result[name]["cv"] == pytest.approx(n.std(ddof=1) / n.mean(), rel=1e-4)
        assert result[name]["max"] == pytest.approx(n.max(), rel=1e-5)


def test_embed_norms_uses_eval_mode_and_restores_it(make_checkpoint):
    path = make_checkpoint()
    ckpt = torch.load(path, weights_only=True)
    model = build_model(from_dict(ckpt["config"]), torch.device("cpu"))
    model.load_state_dict(ckpt["model"])
    encoder = model.encoder.train()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    transform = EvalTransform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    h, z = embed_norms(encoder, images.split(4), transform, torch.device("cpu"))
    assert encoder.training and h.shape == z.shape == (6,)
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k  # no BN statistics moved
    with torch.no_grad():
        ref_h, ref_z = encoder.eval()(transform(images))
    torch.testing.assert_close(h, ref_h.norm(dim=1))
    torch.testing.assert_close(z, ref_z.norm(dim=1))


def test_missing_matplotlib_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(UserError, match=r"pip install ssl_sec\[plots\]"):
        norms_mod._pyplot()


def test_cli_norms_errors_one_line_exit_2(make_checkpoint):
    path = make_checkpoint()
    for process, args, fragment in [
        (True, ["norms", "--checkpoint", "missing.pt"], "checkpoint 'missing.pt' not found"),
        (False, ["norms", "--checkpoint", str(path), "loss.temprature=0.1"], "unknown key"),
    ]:
        proc = run_cli(*args, process=process)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert fragment in lines[0], proc.stderr

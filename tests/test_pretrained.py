"""Backbones by name, load_backbone and `ssl-sec export`: the exported weights load into a
fresh torchvision (or timm) model and give our features bit for bit (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import DEADLINE_S, rewrite_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

import ssl_sec
from ssl_sec import cli
from ssl_sec.archs import build_backbone
from ssl_sec.checkpoint import load_checkpoint
from ssl_sec.engine import optimize_step
from ssl_sec.errors import ConfigError
from ssl_sec.methods import METHODS, build_model
from ssl_sec.recipe import from_dict
from ssl_sec.runtime import grad_scaler

ROOT = Path(__file__).resolve().parents[1]


def _perturbed(make_checkpoint, *overrides) -> Path:
    """A checkpoint whose every weight and BN statistic is random and non-trivial."""
    path = make_checkpoint(*overrides)
    ckpt = load_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    for key, value in ckpt["model"].items():
        if value.is_floating_point():
            noise = torch.rand(value.shape, generator=g)
            value.copy_(noise + 0.5 if "running_var" in key else value + 0.1 * (noise - 0.5))
    rewrite_checkpoint(path, ckpt)
    return path


def _cifar_stem(net):
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    return net


@pytest.mark.parametrize("stem", [True, False])
def test_export_loads_strictly_into_torchvision_and_matches_bit_for_bit(make_checkpoint, tmp_path,
                                                                         stem):
    path = _perturbed(make_checkpoint, f"model.cifar_stem={str(stem).lower()}")
    ours = ssl_sec.load_backbone(path)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(x)

    info = ssl_sec.export_backbone(path)  # safetensors, torchvision key names
    assert info["file"].endswith(".resnet18.torchvision.safetensors")
    net = torchvision.models.resnet18()
    if stem:
        _cifar_stem(net)
    missing, unexpected = net.load_state_dict(load_file(info["file"]), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.equal(net.eval()(x), expected)
    with safe_open(info["file"], "pt") as f:
        meta = f.metadata()
    assert "arch: resnet18" in meta["recipe"] and meta["ssl_sec_version"] == ssl_sec.__version__
    assert ("conv1 = nn.Conv2d(3, 64, 3, 1, 1" in meta["cifar_stem"]) == stem

    pt = ssl_sec.export_backbone(path, "torchvision", tmp_path / "w.pt")
    net2 = torchvision.models.resnet18()
    if stem:
        _cifar_stem(net2)
    net2.load_state_dict(torch.load(pt["file"], weights_only=True), strict=False)
    net2.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.equal(net2.eval()(x), expected)

    timm = pytest.importorskip("timm")  # (the dev extra installs it; CI runs this)
    tm = ssl_sec.export_backbone(path, "timm", tmp_path / "w.safetensors")
    t = timm.create_model("resnet18", pretrained=False, num_classes=0)
    if stem:
        _cifar_stem(t)
    t.load_state_dict(load_file(tm["file"]), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(t.eval()(x), expected, rtol=1e-5, atol=1e-6)


def test_export_command_never_overwrites(make_checkpoint, tmp_path, capsys):
    path = make_checkpoint()
    out = tmp_path / "b.safetensors"
    assert cli.main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["feature_dim"] == 512 and Path(info["file"]) == out
    before = out.read_bytes()
    assert cli.main(["export", "--checkpoint", str(path), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert cli.main(["export", "--checkpoint", str(path), "--out", str(out), "--force"]) == 0


def test_export_format_follows_the_name_and_a_contradiction_is_refused(make_checkpoint,
                                                                        tmp_path, capsys):
    """Without --format the extension decides; a name that contradicts --format, or names no
    format, is one line and writes nothing."""
    path = make_checkpoint()
    pt = tmp_path / "w.pt"
    assert cli.main(["export", "--checkpoint", str(path), "--out", str(pt)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "torchvision"
    assert torch.load(pt, weights_only=True).keys() == load_file(
        ssl_sec.export_backbone(path)["file"]).keys()  # a torch state_dict, not safetensors
    for fmt, name, fragment in [("torchvision", "b.safetensors", "does not name a torchvision"),
                                ("safetensors", "b.pt", "does not name a safetensors"),
                                ("timm", "b.pth", "does not name a timm"),
                                (None, "b.bin", "cannot be told from '.bin'")]:
        args = ["export", "--checkpoint", str(path), "--out", str(tmp_path / name)]
        assert cli.main(args + (["--format", fmt] if fmt else [])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert not (tmp_path / name).exists()


def test_export_verify_catches_a_flipped_byte(make_checkpoint, tmp_path, capsys):
    """`ssl-sec export --verify FILE`: an intact export passes (safetensors by its metadata
    digest, a torchvision .pt by its seal); one flipped bit of a weight, exit 2."""
    path = make_checkpoint()
    for name in ("w.safetensors", "w.pt"):
        out = tmp_path / name
        ssl_sec.export_backbone(path, out=out)
        assert cli.main(["export", "--verify", str(out)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["verified"] and report["tensors"] == 120
        data = bytearray(out.read_bytes())
        data[len(data) // 2] ^= 0x01
        out.write_bytes(bytes(data))
        assert cli.main(["export", "--verify", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "fails its sha256 check" in err[0], err
    plain = tmp_path / "plain.safetensors"  # not written by ssl-sec export: nothing to check
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(plain))
    assert cli.main(["export", "--verify", str(plain)]) == 2
    assert "carries no ssl_sec digest" in capsys.readouterr().err
    assert cli.main(["export", "--verify", str(plain), "--out", "x.pt"]) == 2
    assert "takes no other option" in capsys.readouterr().err


def test_load_backbone_with_projector_matches_the_method(make_checkpoint):
    path = _perturbed(make_checkpoint)
    cfg = from_dict(torch.load(path, weights_only=True)["config"])
    model = METHODS[cfg.method](cfg).eval()  # (load_backbone keeps the default memory format)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    x = torch.randn(2, 3, 32, 32)
    encoder = ssl_sec.load_backbone(path, with_projector=True)
    with torch.no_grad():
        h, z = encoder(x)
        h_ref, z_ref = model.encoder(x)
    assert torch.equal(h, h_ref) and torch.equal(z, z_ref) and not encoder.training


# ----------------------------------------------------------------------------- archs
@pytest.mark.parametrize("arch,size,dim", [
    ("resnet50", 32, 2048), ("convnext_tiny", 32, 768), ("efficientnet_b0", 32, 1280),
    ("regnet_y_400mf", 32, 440), ("vit_b_16", 32, 768), ("timm:resnet18", 32, 512)])
def test_architectures_by_name_train_a_step(arch, size, dim):
    cfg = from_dict({}, [f"model.arch={arch}", "model.cifar_stem=false", "optim.batch_size=4",
                         "model.proj_hidden_dim=16", "model.proj_output_dim=8", "optim.name=sgd",
                         f"augment.size={size}", "moco.bn_splits=2"])
    net, found = build_backbone(arch, False, size)
    assert found == dim
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    assert model.encoder.feat_dim == dim
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    v1, v2 = torch.randn(2, 4, 3, size, size)
    terms, stepped = optimize_step(model, v1, v2, optimizer, grad_scaler(torch.device("cpu"),
                                                                         "fp32"), cfg, 0.0)
    assert stepped and torch.isfinite(terms.losses["total"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("arch,fragment", [
    ("resnet19", "did you mean resnet18"),
    ("convnext_tinny", "did you mean convnext_tiny"),
    ("timm:resnet19", "did you mean timm:resnet18"),
])
def test_unknown_architecture_suggests_close_names(arch, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict({}, [f"model.arch={arch}"])


def test_cifar_stem_is_for_resnets_only():
    with pytest.raises(ConfigError, match="cifar_stem=false"):
        from_dict({}, ["model.arch=convnext_tiny", "model.cifar_stem=true"])
    assert from_dict({}, ["model.arch=wide_resnet50_2"]).model.cifar_stem


def test_cli_convnext_pretrains_and_resnet19_is_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    base = [sys.executable, "-m", "ssl_sec", "pretrain", "recipes/quickstart.yaml",
            "data.train_subset=64", "data.test_subset=32", "optim.batch_size=32",
            "optim.epochs=1", "eval.knn_k=5", "model.proj_hidden_dim=32",
            f"out_dir={tmp_path}"]
    proc = subprocess.run([*base, "model.arch=convnext_tiny", "name=cx"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 2
    proc = subprocess.run([*base, "model.arch=resnet19"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 2 and "did you mean resnet18" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

"""Hostile and mistaken inputs, as a table: recipes, overrides, command lines, checkpoints,
CIFAR files and image folders. Each must end the command with exit code 2 and one line on
stderr that names the culprit, cut to a readable length, with no traceback; payloads must
not run; and nothing a user already had may be overwritten.

Most cases run `ssl_sec.cli.main` in this process (an exception escaping it fails the
test); the ones where a crash would be most likely also run as real subprocesses.
"""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEADLINE_S
from PIL import Image

from ssl_sec import cli

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ["SSL_SEC_DATA"])
RECIPE = "recipes/quickstart.yaml"
QUICK = ["data.train_subset=256", "data.test_subset=64", "optim.batch_size=64",
         "model.proj_hidden_dim=32", "model.proj_output_dim=8", "optim.epochs=1",
         "eval.knn_k=5", "ckpt_every_minutes=0"]
MAX_LINE = 600


class Payload:
    """Unpickling it would create the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- builders
def recipe(tmp: Path, text: str | bytes, name: str = "r.yaml") -> str:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _bomb_text() -> str:
    """A YAML alias bomb under a typed key: optim.lr holds lists of 10 references to the
    previous list, 10 levels deep: 10^10 strings by reference. yaml builds it cheaply; a
    repr of it in an error message would never end."""
    levels = ['&x0 ["' + "x" * 60 + '"]']
    levels += [f"&x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]" for i in range(1, 11)]
    return "optim:\n  lr: [" + ", ".join(levels) + "]\n"


def ckpt(tmp: Path, content, name: str = "c.pt") -> str:
    """A file as ssl_sec writes checkpoints (sealed: what it holds is what a reader meets)."""
    from ssl_sec.checkpoint import atomic_save

    path = tmp / name
    atomic_save(content, path, sealed=True)
    return str(path)


def make_good_checkpoint(tmp: Path, cfg=None) -> dict:
    from ssl_sec.checkpoint import FORMAT_VERSION
    from ssl_sec.config import to_dict
    from ssl_sec.engine import build_model
    from ssl_sec.recipe import from_dict

    cfg = cfg or from_dict({}, ["model.cifar_stem=false", "model.proj_hidden_dim=32",
                                "model.proj_output_dim=8", "data.train_subset=64",
                                "data.test_subset=32", "device=cpu", "eval.knn_k=5"])
    model = build_model(cfg, torch.device("cpu"))
    return {"format": "ssl_sec", "format_version": FORMAT_VERSION, "config": to_dict(cfg),
            "model": model.state_dict(), "epoch": 0, "step": 0}


def cifar_copy(tmp: Path, replace: dict[str, bytes]) -> str:
    """A CIFAR-10 root whose files are links to the real ones, except `replace`."""
    folder = tmp / "c10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in (DATA / "cifar-10-batches-py").iterdir():
        if f.name in replace:
            (folder / f.name).write_bytes(replace[f.name])
        else:
            (folder / f.name).symlink_to(f)
    return str(tmp / "c10")


def image_folder(tmp: Path, bad: dict[str, bytes]) -> str:
    root = tmp / "imgs"
    good = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(good).save(root / c / f"{i}.png")
    for rel, content in bad.items():
        (root / rel).write_bytes(content)
    return str(root)


def bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2,
                                                              0, 0, 0)) + chunk(b"IEND", b""))


def truncated_jpeg(tmp: Path) -> bytes:
    path = tmp / "t.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (240, 320, 3),
                                                      dtype=np.uint8)).save(path, quality=95)
    return path.read_bytes()[:3000]


def existing_run(tmp: Path) -> Path:
    """A finished run directory (its files must survive every case aimed at it)."""
    run = tmp / "runs" / "done"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"precious")
    (run / "config.yaml").write_text("precious\n")
    return run


def pretrain(tmp: Path, *extra: str) -> list[str]:
    return ["pretrain", RECIPE, *QUICK, f"out_dir={tmp / 'runs'}", *extra]


def knn(path: str, *extra: str) -> list[str]:
    return ["knn", "--checkpoint", path, "--no-cache", *extra]


def good_with(tmp: Path, **changes) -> str:
    c = make_good_checkpoint(tmp)
    for key, value in changes.items():
        if value is ...:
            del c[key]
        else:
            c[key] = value
    return ckpt(tmp, c)


def resume_with(tmp: Path, **changes) -> list[str]:
    """--resume-from a checkpoint of this recipe with training state, some of it damaged."""
    from ssl_sec.engine import build_model
    from ssl_sec.optim import build_optimizer
    from ssl_sec.recipe import load_recipe

    cfg = load_recipe(ROOT / RECIPE, QUICK)
    c = make_good_checkpoint(tmp, cfg)
    optimizer = build_optimizer(build_model(cfg, torch.device("cpu")), cfg.optim)
    c.update({"optimizer": optimizer.state_dict(), "scaler": {},
              "loader_rng": torch.Generator().get_state(),
              "rng": [{"torch": torch.get_rng_state(), "python": list((3, [0] * 625, None))}]})
    c.update(changes)
    return pretrain(tmp, "name=r2", *c.pop("_extra", ()), "--resume-from", ckpt(tmp, c))


# ----------------------------------------------------------------------------- the table
# (id, build argv from tmp_path, fragment the line must contain)
CASES = [
    # recipes
    ("recipe-random-bytes", lambda t: ["pretrain", recipe(t, os.urandom(4096))], "not UTF-8"),
    ("recipe-alias-bomb", lambda t: ["pretrain", recipe(t, _bomb_text())], "'optim.lr' must be"),
    ("recipe-duplicate-section",
     lambda t: ["pretrain", recipe(t, "optim:\n  lr: 0.1\nseed: 1\noptim:\n  epochs: 3\n")],
     "gives 'optim' twice (lines 1 and 4)"),
    ("recipe-duplicate-key",
     lambda t: ["pretrain", recipe(t, "optim:\n  lr: 0.1\n  lr: 0.2\n")], "'lr' twice"),
    ("recipe-python-tag",
     lambda t: ["pretrain", recipe(t, f"seed: !!python/object/apply:os.system "
                                      f"['touch {t / 'PWNED'}']\n")], "not valid YAML"),
    ("recipe-list", lambda t: ["pretrain", recipe(t, "- a\n- b\n")], "must be a YAML mapping"),
    ("recipe-deep-nesting", lambda t: ["pretrain", recipe(t, "a: " + "[" * 5000 + "]" * 5000)],
     "r.yaml"),
    ("recipe-bad-syntax", lambda t: ["pretrain", recipe(t, "optim:\n\tlr: 0.1\n")],
     "not valid YAML at line"),
    ("recipe-is-folder", lambda t: ["pretrain", str(t)], "not found"),
    ("recipe-missing", lambda t: ["pretrain", str(t / "nope.yaml")], "nope.yaml' not found"),
    ("recipe-unknown-key", lambda t: ["pretrain", recipe(t, "optim:\n  lrr: 0.1\n")],
     "unknown key 'optim.lrr' (did you mean lr"),
    ("recipe-section-not-mapping", lambda t: ["pretrain", recipe(t, "optim: 3\n")],
     "optim must be a mapping"),
    ("recipe-wrong-type", lambda t: ["pretrain", recipe(t, "optim:\n  lr: fast\n")],
     "'optim.lr' must be float, got 'fast'"),
    ("recipe-huge-string", lambda t: ["pretrain", recipe(t, "method: " + "m" * 100_000 + "\n")],
     "method='mmmm"),
    # overrides
    ("override-inf", lambda t: pretrain(t, "optim.lr=.inf"), "'optim.lr' must be a finite"),
    ("override-nan", lambda t: pretrain(t, "loss.infonce.temperature=.nan"), "loss.infonce.temperature"),
    ("override-seed-65-bits", lambda t: pretrain(t, f"seed={2**65}"), "'seed' must be an integer"),
    ("override-seed-negative", lambda t: pretrain(t, "seed=-3"), "seed=-3 is out of range"),
    ("override-device-garbage", lambda t: pretrain(t, "device=cpu:abc"), "device='cpu:abc'"),
    ("override-device-no-gpu", lambda t: pretrain(t, "device=cuda:3"), "device='cuda:3'"),
    ("override-name-dotdot", lambda t: pretrain(t, "name=.."), "name='..'"),
    ("override-name-slash", lambda t: pretrain(t, "name=a/b"), "name='a/b'"),
    ("override-name-too-long", lambda t: pretrain(t, "name=" + "n" * 300), "name='nnn"),
    ("override-out-dir-is-file",
     lambda t: pretrain(t, f"out_dir={recipe(t, 'x', 'afile')}"), "afile' is a file"),
    ("override-out-dir-inside-run",
     lambda t: pretrain(t, f"out_dir={existing_run(t)}", "name=inner"),
     "would be inside the run"),
    ("override-name-dotdot-inside-run",
     lambda t: pretrain(t, f"out_dir={existing_run(t) / 'x'}", "name=.."), "name='..'"),
    ("override-existing-run", lambda t: pretrain(t, f"out_dir={existing_run(t).parent}",
                                                 "name=done"), "already exists"),
    ("override-no-equals", lambda t: pretrain(t, "optim.lr"), "not of the form key=value"),
    ("override-section-as-value", lambda t: pretrain(t, "optim=3"), "optim must be a mapping"),
    ("override-below-a-value", lambda t: pretrain(t, "optim.lr.x=1"), "'optim.lr' must be"),
    ("override-unknown-dataset", lambda t: pretrain(t, "data.dataset=imagenet"),
     "data.dataset='imagenet'"),
    ("override-batch-zero", lambda t: pretrain(t, "optim.batch_size=0"), "optim.batch_size=0"),
    ("override-workers-huge", lambda t: pretrain(t, "data.workers=100000"), "data.workers"),
    ("override-k-zero", lambda t: pretrain(t, "eval.knn_k=0"), "eval.knn_k=0"),
    ("override-crop-scale-short", lambda t: pretrain(t, "augment.crop_scale=[0.5]"),
     "augment.crop_scale"),
    ("override-bool-for-int", lambda t: pretrain(t, "optim.epochs=true"), "'optim.epochs' must"),
    ("override-ckpt-minutes-negative", lambda t: pretrain(t, "ckpt_every_minutes=-1"),
     "ckpt_every_minutes"),
    ("override-batch-over-data", lambda t: pretrain(t, "optim.batch_size=512"),
     "larger than the 256 training images"),
    # command line
    ("cli-unknown-option", lambda t: pretrain(t, "--bogus"), "unrecognized arguments: --bogus"),
    ("cli-max-epochs-zero", lambda t: pretrain(t, "--max-epochs", "0"), "--max-epochs 0"),
    ("cli-two-resume-modes", lambda t: pretrain(t, "--resume", "--auto-resume"),
     "not allowed with argument"),
    ("cli-resume-nothing", lambda t: pretrain(t, "name=never", "--resume"), "no checkpoint at"),
    ("cli-resume-from-missing", lambda t: pretrain(t, "--resume-from", str(t / "x.pt")),
     "x.pt' not found"),
    ("cli-kshot-seed", lambda t: ["kshot", "--checkpoint", good_with(t), "--seed", "-5"],
     "--seed -5"),
    # checkpoints
    ("ckpt-missing", lambda t: knn(str(t / "none.pt")), "none.pt' not found"),
    ("ckpt-random-bytes", lambda t: knn(recipe(t, os.urandom(5000), "r.pt")), "cannot be read"),
    ("ckpt-pickle-payload", lambda t: knn(ckpt(t, {"format": "ssl_sec",
                                                   "model": Payload(t / "PWNED")})),
     "cannot be read"),
    ("ckpt-foreign", lambda t: knn(ckpt(t, {"state_dict": {"w": torch.zeros(1)}})),
     "not an ssl_sec checkpoint"),
    ("ckpt-no-config", lambda t: knn(good_with(t, config=...)), "lacks 'config'"),
    ("ckpt-config-is-string", lambda t: knn(good_with(t, config="resnet")),
     "has a str as 'config'"),
    ("ckpt-config-unknown-key",
     lambda t: knn(good_with(t, config={"optim": {"lrr": 1.0}})), "holds a config"),
    ("ckpt-weights-not-tensors", lambda t: knn(good_with(t, model={"w": [1, 2]})),
     "non-tensor weights"),
    ("ckpt-step-is-string", lambda t: knn(good_with(t, step="7")), "has a str as 'step'"),
    ("ckpt-newer-format", lambda t: knn(good_with(t, format_version=99)), "format_version 99"),
    ("ckpt-wrong-arch", lambda t: knn(good_with(t, config={"model": {"arch": "resnet34",
                                                                     "cifar_stem": False}})),
     "does not match model.arch=resnet34"),
    ("resume-bad-loader-rng", lambda t: resume_with(t, loader_rng=torch.zeros(3, dtype=torch.uint8)),
     "damaged data-order state"),
    ("resume-bad-rng", lambda t: resume_with(t, rng=[{"torch": torch.zeros(2, dtype=torch.uint8),
                                                      "python": [1]}]), "damaged RNG state"),
    ("resume-no-optimizer", lambda t: resume_with(t, optimizer="x"), "has a str as 'optimizer'"),
    ("resume-other-recipe", lambda t: resume_with(t, _extra=("optim.momentum=0.5",)),
     "differs from the run's config.yaml"),
    # CIFAR files
    ("cifar-pickle-payload",
     lambda t: pretrain(t, f"data.root={cifar_copy(t, {'data_batch_1': pickle.dumps({'data': Payload(t / 'PWNED')}, protocol=2)})}",
                        "data.download=false"), "data_batch_1"),
    ("cifar-truncated",
     lambda t: pretrain(t, f"data.root={cifar_copy(t, {'data_batch_2': (DATA / 'cifar-10-batches-py' / 'data_batch_2').read_bytes()[:5000]})}",
                        "data.download=false"), "data_batch_2"),
    ("cifar-wrong-shape",
     lambda t: pretrain(t, f"data.root={cifar_copy(t, {'test_batch': pickle.dumps({'data': np.zeros((4, 10), np.uint8), 'labels': [0] * 4}, protocol=2)})}",
                        "data.download=false"), "test_batch"),
    ("cifar-missing", lambda t: pretrain(t, f"data.root={t / 'empty'}", "data.download=false"),
     "cifar10: not found"),
    # image folders
    ("folder-bomb-png", lambda t: pretrain(t, "data.dataset=imagefolder",
                                           f"data.root={image_folder(t, {'a/bomb.png': bomb_png()})}"),
     "bomb.png"),
    ("folder-not-an-image", lambda t: pretrain(t, "data.dataset=imagefolder",
                                               f"data.root={image_folder(t, {'b/x.jpg': b'hello'})}"),
     "x.jpg"),
    ("folder-empty-file", lambda t: pretrain(t, "data.dataset=imagefolder", "data.mode=stream",
                                             f"data.root={image_folder(t, {'b/e.png': b''})}"),
     "e.png"),
    ("folder-truncated-jpeg",
     lambda t: pretrain(t, "data.dataset=imagefolder", "data.mode=memory",
                        f"data.root={image_folder(t, {'a/t.jpg': truncated_jpeg(t)})}"), "t.jpg"),
    ("folder-root-is-file", lambda t: pretrain(t, "data.dataset=imagefolder",
                                               f"data.root={recipe(t, 'x', 'notdir')}"), "notdir"),
    ("folder-missing-classes", lambda t: pretrain(
        t, "data.dataset=imagefolder", f"data.root={image_folder(t, {})}",
        f"data.classes_file={recipe(t, 'a' + chr(10) + 'zzz' + chr(10), 'cls.txt')}"), "cls.txt"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    _, build, fragment = case
    monkeypatch.chdir(ROOT)
    argv = build(tmp_path)
    before = _snapshot(tmp_path)
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert len(lines[0]) <= MAX_LINE + len("ssl-sec: error: ")
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "PWNED").exists()
    # What was there before is still there, byte for byte.
    for path, content in before.items():
        assert path.read_bytes() == content, path


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
            and p.stat().st_size < 50_000_000}


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


# A real process for the cases most likely to crash the interpreter itself.
@pytest.mark.parametrize("name", ["recipe-random-bytes", "recipe-alias-bomb",
                                  "recipe-deep-nesting", "ckpt-pickle-payload"])
def test_subprocess_one_line_no_traceback(name, tmp_path):
    _, build, fragment = next(c for c in CASES if c[0] == name)
    proc = subprocess.run([sys.executable, "-m", "ssl_sec", *build(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=DEADLINE_S,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------- legitimate
def test_legitimate_inputs_that_used_to_fail(tmp_path, capsys, monkeypatch):
    """Not errors: `1e6` is a float; a kNN k above the bank is used as the bank size and
    reported as such; a run moved to another out_dir resumes there."""
    from ssl_sec.recipe import load_recipe

    monkeypatch.chdir(ROOT)
    assert load_recipe(RECIPE, ["optim.lr=1e6", "loss.infonce.temperature=5e-2"]).optim.lr == 1e6
    run = ["pretrain", RECIPE, *QUICK, "eval.knn_k=100000", "eval.knn_temperature=0.01",
           f"out_dir={tmp_path / 'a'}", "name=r"]
    assert cli.main(run) == 0
    out = capsys.readouterr()
    result = [line for line in out.out.splitlines() if line.startswith('{"run_dir"')][-1]
    import json

    result = json.loads(result)
    assert result["k"] == 256 and result["knn_k"] == 256
    assert "eval.knn_k=100000 is larger than the 256-image kNN bank" in out.err
    # (T=0.01's votes against a float64 reference: tests/test_knn.py.)
    assert 0 <= result["top1"] <= result["top5"] <= 100
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = ["pretrain", RECIPE, *QUICK, "optim.epochs=2", "eval.knn_k=100000",
             "eval.knn_temperature=0.01", f"out_dir={tmp_path / 'b'}", "name=r", "--resume"]
    # optim.epochs differs: refused; the same recipe in the new place: resumed.
    assert cli.main(moved) == 2
    assert "optim.epochs: 1 -> 2" in capsys.readouterr().err
    moved = [a for a in moved if a != "optim.epochs=2"]
    assert cli.main(moved) == 0
    assert "run already finished" in capsys.readouterr().out

"""What a run's directory says about its training stays true: config.yaml is the config it
started with, a resume that changes a value appends it to changes.jsonl with its step, and a
resume of a finished run writes nothing at all. Also the messages that report where a run
stopped and how to go on."""

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli, small_cfg

from ssl_sec.engine import train
from ssl_sec.errors import UserError
from ssl_sec.run_dir import RunDir
from ssl_sec.save_policy import check_finite

RUN = ["optim.epochs=2", "eval.knn_every=0", "optim.lr=0.1"]


def _files(run: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run but its lock, with its bytes and modification time."""
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".ssl_sec.lock"}


def test_resuming_a_finished_run_writes_nothing(tmp_path, data_root, capsys):
    """`--resume` with a changed lr and `--auto-resume` (twice) on a finished run: "nothing
    to do", the same result, and not one byte or file of the run changes."""
    first = train(small_cfg(tmp_path, *RUN), progress_bar=False)
    run = tmp_path / "run"
    before = _files(run)
    assert "config.yaml" in before and "result.json" in before and any(
        k.startswith("tb/") for k in before)
    capsys.readouterr()
    again = train(small_cfg(tmp_path, *RUN[:-1], "optim.lr=0.05"), resume=True,
                  progress_bar=False)
    assert "nothing to do" in capsys.readouterr().out
    for _ in range(2):
        assert train(small_cfg(tmp_path, *RUN), resume="auto", progress_bar=False) == first
    assert again == first
    assert _files(run) == before
    assert "lr: 0.1" in (run / "config.yaml").read_text()  # how the weights were trained


def test_a_changed_value_is_appended_with_its_step(tmp_path, data_root, capsys):
    """A run stopped after epoch 1 and resumed at a lower lr: config.yaml still says how it
    started, changes.jsonl says from which step the new lr applies, and `ssl-sec config
    --run` prints that history and the config in effect."""
    train(small_cfg(tmp_path, *RUN), progress_bar=False, max_epochs=1)
    run = tmp_path / "run"
    config = (run / "config.yaml").read_text()
    train(small_cfg(tmp_path, *RUN[:-1], "optim.lr=0.05", "log_every=1"), resume=True,
          progress_bar=False)
    assert (run / "config.yaml").read_text() == config
    rows = [json.loads(line) for line in (run / "changes.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 4  # 4 steps an epoch
    assert rows[0]["changes"] == {"log_every": [2, 1], "optim.lr": [0.1, 0.05]}
    assert torch.load(run / "last.pt", weights_only=True)["config"]["optim"]["lr"] == 0.05
    proc = run_cli("config", "--run", str(run))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "# from step 4: optim.lr: 0.1 -> 0.05" in out and "  lr: 0.05" in out
    assert "# from step 4: log_every: 2 -> 1" in out and "log_every: 1" in out
    for args, fragment in [(["config", "--run", str(tmp_path)], "no config.yaml"),
                           (["config", "recipes/quickstart.yaml", "--run", str(run)],
                            "not both"),
                           (["config"], "pass a recipe")]:
        proc = run_cli(*args)
        assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr


@pytest.mark.parametrize("clip,advice", [(0.0, "optim.grad_clip=3.0"),
                                         (3.0, "optim.grad_clip=1.5 (now 3)")])
def test_nan_advice_starts_from_the_values_that_diverged(tmp_path, clip, advice):
    """After a resume with optim.grad_clip=3.0 diverged too, the advice is not 3.0 again."""
    from ssl_sec.recipe import from_dict

    (tmp_path / "last.pt").write_bytes(b"")
    optim = from_dict({}, [f"optim.grad_clip={clip}", "optim.lr=0.4"]).optim
    with pytest.raises(UserError) as stop:
        check_finite(torch.ones((), dtype=torch.bool), 7, RunDir(tmp_path), optim)
    assert advice in str(stop.value) and "optim.lr (now 0.4, e.g. 0.2)" in str(stop.value)

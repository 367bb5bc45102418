"""How a run was trained, append-only: `config.yaml` is the config the run started with and
is never rewritten; every resume that changes a value (optim.lr, optim.grad_clip, out_dir,
data.root...) appends one line to `changes.jsonl`, with the step from which it applies.

    {"step": 400, "time": "2026-11-30T07:40:00+00:00", "changes": {"optim.lr": [0.3, 0.1]}}

`ssl-sec config --run DIR` prints that history and the config in effect now.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from .config import to_yaml
from .errors import UserError
from .recipe import from_stored

CONFIG = "config.yaml"
CHANGES = "changes.jsonl"


def config_changes(saved: dict, now: dict) -> dict[str, list]:
    """The leaves that differ between two config dicts: {dotted key: [saved, now]}."""
    changes: dict[str, list] = {}

    def walk(a: dict, b: dict, prefix: str) -> None:
        for key in sorted(set(a) | set(b)):
            va, vb = a.get(key), b.get(key)
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, f"{prefix}{key}.")
            elif va != vb:
                changes[prefix + key] = [va, vb]

    walk(saved, now, "")
    return changes


def record_changes(root: Path, step: int, changes: dict[str, list]) -> None:
    """Append a resume's changes, applying from `step`, to the run's changes.jsonl."""
    row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}
    with open(root / CHANGES, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def history(root: str | Path) -> str:
    """The run's history as printed by `ssl-sec config --run DIR`: each change with its step,
    as comments, then the config in effect now (config.yaml with the changes applied)."""

    root = Path(root)
    if not (root / CONFIG).is_file():
        raise UserError(f"--run '{root}': no {CONFIG} there; pass the directory of a run "
                        "(out_dir/name, e.g. runs/quickstart)")
    values = yaml.safe_load((root / CONFIG).read_text())
    rows = []
    if (root / CHANGES).is_file():
        for n, line in enumerate((root / CHANGES).read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                rows.append((int(row["step"]), dict(row["changes"])))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"'{root / CHANGES}' line {n} is not a change record; it "
                                "was edited or damaged") from None
    lines = [f"# run {root}: {CONFIG} as the run started"]
    if not rows:
        lines.append("# no changes on resume")
    for step, changes in rows:
        for key, (old, new) in changes.items():
            lines.append(f"# from step {step}: {key}: {old!r} -> {new!r}")
            *parents, leaf = key.split(".")
            node = values
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = new
    lines.append("# the config in effect now:")
    return "\n".join(lines) + "\n" + to_yaml(from_stored(values))

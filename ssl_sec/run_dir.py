"""The run directory `out_dir/name`: what is in it, who may write it, and whether a start
continues it.

One process trains in a run directory at a time: rank 0 holds an OS lock (`flock`) on
`.ssl_sec.lock` for the whole run. The kernel drops it when the process dies, however it
dies, so a crashed run never leaves the directory locked.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import stale_temp_files
from .errors import CheckpointError, UserError

LOCK = ".ssl_sec.lock"
# A folder holding one of these is a run (config.yaml alone is too common a name).
RUN_MARKERS = (LOCK, "last.pt")
# Files of an earlier attempt that stopped before its first checkpoint: kept under
# attempts/N/ when the run starts again.
ATTEMPT_FILES = ("config.yaml", "metrics.jsonl", "result.json", "tb")
# Not logs of an attempt: the lock, earlier attempts and image-folder index caches (kept
# here when the data folder is read-only: data/index.py).
_NOT_ATTEMPT = {LOCK, ".ssl_sec_index.json", "attempts"}
_INDEX_CACHE = re.compile(r"index-[0-9a-f]+\.json")


# The lock files this process holds. A forked child (a DataLoader worker) inherits their
# descriptors, and an flock lasts while any descriptor of it is open: persistent workers
# would keep the directory locked after this process released it. Children close theirs.
_HELD: set = set()


def _close_inherited_locks() -> None:
    for lock in _HELD:
        lock.close()
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@dataclass
class RunDir:
    root: Path
    # The checkpoint this start continues from (None: a new run).
    resume_from: Path | None = None
    notes: list[str] = field(default_factory=list)
    _lock: object = None

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def prev(self) -> Path:
        return self.root / "prev.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def release(self) -> None:
        if self._lock is not None:
            _HELD.discard(self._lock)
            self._lock.close()  # closing the file drops the flock
            self._lock = None


def run_root(out_dir: str, name: str) -> Path:
    return Path(out_dir) / name


def open_run(out_dir: str, name: str, resume: str | Path | None) -> RunDir:
    """Create or reopen `out_dir/name` and lock it (call on rank 0 only).

    resume: None (a new run), "last" (continue from last.pt), "auto" (continue when there
    is a checkpoint, else start) or the path of a checkpoint to continue from.
    A directory whose run stopped before its first checkpoint holds no training to lose:
    a new start reuses it and keeps the earlier logs under attempts/N/.
    """
    root = run_root(out_dir, name)
    _check_place(Path(out_dir), root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / LOCK, "a+")  # noqa: SIM115 - held until release()
    except OSError as err:
        raise UserError(f"cannot create the run directory '{root}' ({err.strerror}); set "
                        "out_dir to a writable folder") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"run directory '{root}' is in use by a running ssl-sec ({holder}); "
                        "wait for it to finish, or pass name=NEW_NAME for a new run") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    lock.flush()
    _HELD.add(lock)
    run = RunDir(root, _lock=lock)
    try:
        _decide(run, resume)
    except BaseException:
        run.release()
        raise
    return run


def _without_last(run: RunDir) -> str:
    """How to go on in a run directory without last.pt."""
    if run.prev.is_file():
        return f"continue from prev.pt with --resume-from {run.prev}"
    if (run.root / "config.yaml").is_file():
        return ("the run stopped before its first checkpoint: start it again without "
                "--resume (the directory is reused)")
    return "start the run without --resume, or set out_dir/name to the run to continue"


def _check_place(out_dir: Path, root: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"out_dir '{out_dir}' is a file, not a folder; set out_dir to a folder")
    if root.exists() and not root.is_dir():
        raise UserError(f"run directory '{root}' is a file, not a folder; pass name=NEW_NAME")
    # A run inside another run's folder would mix their files (out_dir=runs/a name=b is
    # fine when runs/a is just a folder, not when it is a run).
    resolved = root.resolve()
    for parent in resolved.parents:
        if any((parent / marker).exists() for marker in RUN_MARKERS):
            raise UserError(f"run directory '{root}' would be inside the run '{parent}'; "
                            "choose an out_dir outside it")


def _decide(run: RunDir, resume: str | Path | None) -> None:
    for tmp in stale_temp_files(run.root):
        # Left by a process killed while writing a checkpoint; we hold the lock, so no
        # writer is alive.
        tmp.unlink(missing_ok=True)
        run.notes.append(f"removed '{tmp.name}', left by an interrupted checkpoint write")
    has_last = run.last.is_file()
    if resume == "auto":
        resume = "last" if has_last else None
        if not has_last and run.prev.is_file():
            raise CheckpointError(f"run '{run.root}' has prev.pt but no last.pt; "
                                  f"{_without_last(run)}")
    if resume == "last":
        if not has_last:
            raise CheckpointError(f"--resume: no checkpoint at '{run.last}'; "
                                  f"{_without_last(run)}")
        run.resume_from = run.last
        return
    if resume is not None:
        source = Path(resume)
        if not source.is_file():
            raise CheckpointError(f"--resume-from: checkpoint '{source}' not found; pass a "
                                  "checkpoint file such as runs/NAME/prev.pt")
        if has_last and source.resolve() != run.last.resolve():
            # The new checkpoints go to last.pt: keep the one they replace.
            kept = run.root / f"last.replaced-{time.strftime('%Y%m%d-%H%M%S')}.pt"
            os.replace(run.last, kept)
            run.notes.append(f"kept the last.pt this resume replaces as '{kept.name}'")
        run.resume_from = source
        return
    # A new run.
    if has_last or run.prev.is_file():
        raise UserError(f"run directory '{run.root}' already exists and holds a checkpoint; "
                        "add --resume to continue it, or pass name=NEW_NAME (or out_dir=...) "
                        "to start a new run")
    left = [p for p in run.root.iterdir()
            if p.name not in _NOT_ATTEMPT and not _INDEX_CACHE.fullmatch(p.name)]
    if not left:
        return
    if not (run.root / "config.yaml").is_file() or any(p.name not in ATTEMPT_FILES
                                                         for p in left):
        raise UserError(f"run directory '{run.root}' already exists and is not an ssl_sec "
                        "run without checkpoints; pass name=NEW_NAME (or out_dir=...)")
    n = 1
    while (run.root / "attempts" / str(n)).exists():
        n += 1
    keep = run.root / "attempts" / str(n)
    keep.mkdir(parents=True)
    for p in left:
        shutil.move(str(p), keep / p.name)
    run.notes.append(f"the earlier attempt stopped before its first checkpoint; its logs "
                     f"are kept in '{keep}'")

"""What a run continues from: the run directory opened the same way on every rank, the
checkpoint to resume, and the config changes a resume may make (field metadata in
config.py: FREE and ADJUSTABLE) and records."""

from __future__ import annotations

from pathlib import Path

from . import config as config_mod
from . import distributed as dist
from .checkpoint import load_checkpoint
from .config import resume_policy, show
from .errors import CheckpointError, ConfigError, UserError
from .progress import say
from .provenance import CHANGES, config_changes
from .recipe import Config, from_stored
from .run_dir import RunDir, open_run, run_root

# Keys that may differ between a run and its resumption (field metadata in config.py):
# "free" (where things are, how often to log or evaluate) and "adjustable" (what the NaN
# message advises: it changes the optimisation, so a resume that changes it says so).
# Everything else changes the optimisation and must match.
RESUME_POLICY = resume_policy(Config)


def check_resume_config(saved: dict, cfg: Config) -> dict[str, list]:
    """Refuse a resume whose recipe changes the optimisation; return every change (keys of
    RESUME_POLICY only): {dotted key: [saved, now]}. The saved config may come from an
    older version: its keys are moved to their current place first (recipe.upgrade), and
    sections it lacks (added since) hold their defaults."""
    saved = config_mod.to_dict(from_stored(saved))
    changes = config_changes(saved, config_mod.to_dict(cfg))
    refused = [f"{key}: {show(a)} -> {show(b)}" for key, (a, b) in changes.items()
               if key not in RESUME_POLICY]
    if refused:
        raise ConfigError("--resume with a recipe that differs from the run's config.yaml in "
                          + "; ".join(refused) + "; resume with the same recipe and overrides")
    return changes


def open_run_dir(cfg: Config, resume: bool | str | Path | None) -> RunDir:
    """Rank 0 creates, locks and inspects the run directory and says which checkpoint (if
    any) the run continues from; every rank gets the same answer, or the same error."""
    mode = "last" if resume is True else (resume or None)
    run, error = None, None
    if dist.is_main():
        try:
            run = open_run(cfg.out_dir, cfg.name, mode)
        except UserError as err:
            error = err
    decided = dist.broadcast_object(
        (None if run is None else run.resume_from, None if error is None else str(error)))
    if error is not None:
        raise error
    if decided[1] is not None:
        raise UserError(decided[1])
    return run or RunDir(run_root(cfg.out_dir, cfg.name), resume_from=decided[0])


def read_resume(run: RunDir, cfg: Config, world: int) -> tuple[dict, dict[str, list]]:
    """The checkpoint to continue from, and the config changes of this resume."""
    ckpt = load_checkpoint(run.resume_from, training=True)  # its config is a dict
    changes = check_resume_config(ckpt["config"], cfg)
    for key, (old, new) in changes.items():
        if RESUME_POLICY.get(key) == "adjustable":
            say(f"note: resuming with a changed {key}: {old!r} -> {new!r} (allowed for this "
                f"key, recorded in {CHANGES} with the step it applies from)")
    saved_world = ckpt.get("world_size", len(ckpt["rng"]) if isinstance(ckpt["rng"], list) else 1)
    if saved_world != world:
        raise CheckpointError(
            f"checkpoint '{run.resume_from}' was written by {saved_world} process(es), this "
            f"run has {world}; resume with the same world size (torchrun --nnodes x "
            f"--nproc_per_node = {saved_world}): each process's random state is restored")
    return ckpt, changes

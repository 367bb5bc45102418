"""When a run writes its checkpoints and what it refuses to write: last.pt at every epoch
end and within an epoch by steps, minutes or a stop signal (prev.pt keeps the one it
replaces), epochNNNN.pt snapshots, and no checkpoint of a state with a NaN/inf loss or
weight. The file format itself is ssl_sec/checkpoint.py's."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from . import config as config_mod
from . import distributed as dist
from .checkpoint import link_atomically, rng_state, save_rotated, training_state
from .errors import UserError
from .provenance import record_changes
from .run_dir import RunDir

if TYPE_CHECKING:
    from .recipe import Config


class SavePolicy:
    """When and what to write. last.pt at every epoch end and, within an epoch, every
    `ckpt_every_steps` steps and every `ckpt_every_minutes` minutes, and when a stop signal
    came; the checkpoint it replaces stays as prev.pt; epochNNNN.pt every `ckpt_every`
    epochs. With several processes the time and signal decisions are agreed (a MAX
    all-reduce) every AGREE_EVERY steps, so all ranks checkpoint and stop at the same step
    without a host sync on every step."""

    AGREE_EVERY = 10

    def __init__(self, run: RunDir, cfg: Config, core, optimizer, scaler, loader,
                 steps_per_epoch: int, device: torch.device):
        self.run, self.cfg, self.core, self.optimizer = run, cfg, core, optimizer
        self.scaler, self.loader, self.steps_per_epoch = scaler, loader, steps_per_epoch
        self.device, self.last_write = device, time.monotonic()
        # A resume's config changes and the step they apply from: appended to changes.jsonl
        # with the first checkpoint that holds them (an attempt that fails first left none).
        self.changes: tuple[int, dict] | None = None

    def due(self, step: int, signal_name: str | None, epoch_end: bool = False
            ) -> tuple[bool, str | None]:
        """(write last.pt now, the stop signal's name or None) after `step` steps."""
        every_s = self.cfg.ckpt_every_minutes * 60
        timed = bool(every_s) and time.monotonic() - self.last_write >= every_s
        stop = signal_name is not None
        if dist.world_size() > 1:
            if not epoch_end and step % self.AGREE_EVERY:
                timed = stop = False
            else:
                timed, stop = dist.any_rank([timed, stop], self.device)
                signal_name = signal_name or "a stop signal (on another rank)"
        by_steps = bool(self.cfg.ckpt_every_steps) and step % self.cfg.ckpt_every_steps == 0
        return by_steps or timed, (signal_name if stop else None)

    def save(self, step: int, result: dict, skipped: int, nonfinite: torch.Tensor,
             snapshot: bool = False) -> None:
        """Write last.pt (and epochNNNN.pt when `snapshot`), unless a loss since the last
        check (`nonfinite`) or a weight is NaN/inf: then stop, the last good file kept."""
        check_finite(nonfinite | ~weights_finite(self.core), step, self.run, self.cfg.optim)
        rng_states = dist.gather_objects(rng_state())
        if dist.is_main():
            state = training_state(config_mod.to_dict(self.cfg), step, self.steps_per_epoch,
                                   self.core, self.optimizer, self.scaler, self.loader,
                                   rng_states, result, skipped)
            save_rotated(state, self.run.last, self.run.prev)
            if self.changes is not None:
                record_changes(self.run.root, *self.changes)
                self.changes = None
            if snapshot:  # the same bytes: a link, not a second write
                link_atomically(self.run.last,
                                self.run.root / f"epoch{state['epoch']:04d}.pt")
        self.last_write = time.monotonic()
        dist.barrier()

    def stopped_message(self, signal_name: str, step: int) -> str:
        # Counted as the progress lines count: epochs and batches from 1.
        epoch, batch = divmod(step, self.steps_per_epoch)
        epochs = self.cfg.optim.epochs
        where = (f"epoch {epoch + 1}/{epochs}, batch {batch}/{self.steps_per_epoch}" if batch
                 else f"end of epoch {epoch}/{epochs}")
        return (f"stopped by {signal_name} at step {step} ({where}); checkpoint written to "
                f"'{self.run.last}'; continue with the same command and --resume")


def check_finite(flag: torch.Tensor, step: int, run: RunDir, optim) -> None:
    """Stop (exit 2) when a loss since the last check was NaN/inf, before that state could
    reach a checkpoint. Every rank takes the same decision, or the others would hang."""
    if not bool(dist.all_reduce_mean(flag.float()) > 0):
        return
    # The advice starts from the values that just diverged (a resume may have changed them).
    clip = (f"a tighter optim.grad_clip={optim.grad_clip / 2:g} (now {optim.grad_clip:g})"
            if optim.grad_clip > 0 else "optim.grad_clip=3.0")
    fix = f"a lower optim.lr (now {optim.lr:g}, e.g. {optim.lr / 2:g}) or {clip}"
    if run.last.is_file():
        raise UserError(f"the loss became NaN/inf at or before step {step}; the last good "
                        f"checkpoint '{run.last}' is untouched: continue from it with --resume "
                        f"and {fix} (both may change on resume)")
    raise UserError(f"the loss became NaN/inf at or before step {step}, before the first "
                    f"checkpoint; start the run again with {fix} (the run directory is "
                    "reused, its logs kept under attempts/)")


def weights_finite(model: torch.nn.Module) -> torch.Tensor:
    """Whether every weight is finite (a bool tensor): checked before each checkpoint, as
    the step whose loss was still finite can be the one whose update overflowed."""
    return torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()

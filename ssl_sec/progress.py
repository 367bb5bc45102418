"""What a run shows and records as it trains: TensorBoard + metrics.jsonl + console from
rank 0 (`Logger`, `say`), the scalars of a logged step, the epoch's timer and the progress
lines or bar."""

from __future__ import annotations

import json
import os
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from . import distributed as dist
from .run_dir import RunDir


class Logger:
    """TensorBoard + metrics.jsonl + console, from rank 0 only.

    A resumed run replays the steps after its checkpoint: their rows from the interrupted
    attempt are dropped (metrics.jsonl rewritten, TensorBoard's purge_step), so each step
    is logged once."""

    def __init__(self, run: RunDir, resumed_step: int | None = None):
        if resumed_step is not None and run.metrics.is_file():
            kept = [line for line in run.metrics.read_text().splitlines(keepends=True)
                    if _row_step(line) <= resumed_step]
            tmp = run.metrics.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, run.metrics)
        purge = None if resumed_step is None else resumed_step + 1
        self.tb = SummaryWriter(log_dir=str(run.root / "tb"), purge_step=purge)
        self.jsonl = open(run.metrics, "a")  # noqa: SIM115 - closed in close()

    def scalars(self, step: int, values: dict[str, float], kind: str) -> None:
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut by a kill: dropped


def say(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)


def step_scalars(terms, lr: float, images_per_s: float) -> dict[str, float]:
    """One host sync for every logged value of this step."""
    names = [f"loss/{k}" for k in terms.losses] + [f"diag/{k}" for k in terms.diagnostics]
    tensors = [*terms.losses.values(), *terms.diagnostics.values()]
    values = torch.stack([v.detach().float().reshape(()) for v in tensors]).tolist()
    out = dict(zip(names, values, strict=True))
    out["lr"] = lr
    out["perf/images_per_s"] = images_per_s
    return out


class EpochTimer:
    """Seconds of one epoch: CUDA events on a GPU (the device's own clock, no extra host
    sync until the epoch ends), the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.start = time.perf_counter()
        self.events = None
        if device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True),
                           torch.cuda.Event(enable_timing=True))
            self.events[0].record()

    def seconds(self) -> float:
        if self.events is None:
            return time.perf_counter() - self.start
        self.events[1].record()
        self.events[1].synchronize()
        return self.events[0].elapsed_time(self.events[1]) / 1000.0


class ProgressLines:
    """Progress lines for logs (stderr not a terminal, so no progress bar): at a logging step,
    print step, loss, images/s and ETAs when at least `every_s` seconds passed since the last
    line, i.e. every `log_every` steps or every ~30 s, whichever comes later."""

    def __init__(self, epoch: int, epochs: int, steps_per_epoch: int, first: int = 0,
                 every_s: float = 30.0):
        self.epoch, self.epochs, self.steps = epoch, epochs, steps_per_epoch
        self.first = first  # batches of this epoch done before a resume
        self.every_s = every_s
        self.last = time.perf_counter()

    def maybe_print(self, done: int, step: int, values: dict, elapsed: float,
                    epochs_after: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s or done >= self.steps:
            return  # the epoch line follows at the epoch's last step
        self.last = now
        per_step = elapsed / max(done - self.first, 1)
        epoch_left = per_step * (self.steps - done)
        run_left = epoch_left + per_step * self.steps * epochs_after
        say(f"  epoch {self.epoch + 1}/{self.epochs}  step {done}/{self.steps} "
            f"(global {step})  loss {values['loss/total']:.4f}  "
            f"{values['perf/images_per_s']:.0f} img/s  ETA epoch {epoch_left / 60:.1f} min, "
            f"run {run_left / 60:.1f} min")


def epoch_bar(total: int, epoch: int, epochs: int, show: bool, done: int = 0):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                leave=False, dynamic_ncols=True)

"""The training loop: data, model, objective, schedules, resume, loop, in plain phases.

Nothing happens in invisible callbacks: every update (optimizer, momentum encoder, queue,
SEC buffer), every log line and every checkpoint is called from `train` below. The parts it
calls live beside it: the input pipeline (pipeline.py), what it shows and records
(progress.py), when it writes checkpoints (save_policy.py) and what it resumes (resume.py).
"""

from __future__ import annotations

import json
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import config as config_mod
from . import distributed as dist
from .checkpoint import restore_training_state
from .data import load_splits
from .errors import ConfigError, UserError
from .evaluation.features import Labelled, labelled_features
from .evaluation.knn import knn_evaluate
from .methods import build_model
from .optim import build_optimizer, set_lr
from .pipeline import build_augment, data_pipeline, log_previews  # noqa: F401 - re-exported
from .preemption import Preempted, StopRequests
from .progress import EpochTimer, Logger, ProgressLines, epoch_bar, say, step_scalars
from .provenance import CONFIG
from .recipe import Config, from_stored
from .resume import open_run_dir, read_resume
from .run_dir import RunDir
from .runtime import (
    autocast_for,
    backends,
    effective_precision,
    grad_scaler,
    memory_note,
    resolve_device,
)
from .save_policy import SavePolicy, check_finite
from .schedules import lr_at


# ----------------------------------------------------------------------------- kNN monitor
def knn_monitor(backbone: torch.nn.Module, train: Labelled, test: Labelled,
                transform: torch.nn.Module, cfg: Config,
                device: torch.device | None = None) -> dict[str, float]:
    """Weighted kNN top-1/top-5 of eval-mode backbone features (no augmentation); the bank
    and test sets in memory or streamed."""
    device = device or next(backbone.parameters()).device
    view = (transform, device, cfg.augment.size, cfg.data.eval_resize, cfg.precision)
    bank, bank_labels = labelled_features(backbone, train, *view)
    queries, labels = labelled_features(backbone, test, *view)
    return knn_evaluate(bank, bank_labels, queries, labels, cfg.eval)


# ----------------------------------------------------------------------------- one step
@torch.no_grad()
def make_views(views: torch.nn.Module, *images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two random views of a uint8 batch (or of its two per-view crops), made on the
    batch's device."""
    return views(*images)


def optimize_step(model: torch.nn.Module, v1: torch.Tensor, v2: torch.Tensor,
                  optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: Config,
                  progress: float, diagnostics: bool = False):
    """Forward (autocast), backward, optional clipping, optimizer step, then the method's
    post-step update (momentum encoder, queue) - in that order, as MoCo and DINO do.

    Returns (terms, stepped). `stepped` is False only under fp16 loss scaling when the
    gradients overflowed: the scaler skipped the optimizer step (and lowered the scale), and
    the post-step update is skipped with it, so no overflowed key enters MoCo's queue.
    Reading the scale is a host sync, but only under fp16, whose `scaler.step` reads the
    overflow flag on the host anyway; bf16 and fp32 steps never wait for the device.
    """
    with autocast_for(v1.device, cfg.precision):
        terms = model(v1, v2, progress, diagnostics)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms.losses["total"]).backward()
    if cfg.optim.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    stepped = scale is None or scaler.get_scale() >= scale
    if stepped:
        getattr(model, "module", model).after_step(progress)
    return terms, stepped


# ----------------------------------------------------------------------------- training
def train(cfg: Config, resume: bool | str | Path = False, progress_bar: bool | None = None,
          max_epochs: int | None = None) -> dict:
    """Pretrain as `cfg` says; returns the final kNN result and where the run lives.

    resume: False (a new run in out_dir/name), True (continue from its last.pt), "auto"
    (continue when it has a checkpoint, else start: what a requeued cluster job wants) or
    the path of a checkpoint to continue from (e.g. runs/NAME/prev.pt).
    `max_epochs` stops this invocation after that many epochs, so a long run can be split
    into time-limited jobs. SIGTERM, SIGUSR1 or SIGINT stop it after the current step with
    a checkpoint and `Preempted` (ssl_sec/preemption.py).
    """
    device = dist.init(resolve_device(cfg.device))
    world = dist.world_size()
    if cfg.optim.batch_size % world:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} must be divisible by the "
                          f"{world} processes (it is the global batch)")
    with backends(device, cfg.deterministic):
        run = open_run_dir(cfg, resume)
        try:
            return _train(cfg, device, run, progress_bar, max_epochs)
        except torch.cuda.OutOfMemoryError:
            raise UserError(_out_of_memory(cfg, device, world)) from None
        finally:
            run.release()


def _out_of_memory(cfg: Config, device: torch.device, world: int) -> str:
    batch = cfg.optim.batch_size
    per = f" ({batch // world} per process)" if world > 1 else ""
    fix = f"lower optim.batch_size (e.g. optim.batch_size={max(2, batch // 2)})"
    if effective_precision(device, cfg.precision) == "fp32" and device.type == "cuda":
        fix += " or use precision=bf16"
    return (f"out of memory at optim.batch_size={batch}{per}, augment.size={cfg.augment.size}, "
            f"model.arch={cfg.model.arch} on {memory_note(device)}: {fix}; nothing was saved "
            "after the failed step (the run's last checkpoint is intact, --resume continues it)")


def _train(cfg: Config, device: torch.device, run: RunDir, progress_bar: bool | None,
           max_epochs: int | None) -> dict:
    t_start = time.perf_counter()
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    for note in run.notes:
        say(note)
    ckpt, changes = read_resume(run, cfg, world) if run.resume_from is not None else (None, {})
    if ckpt is not None and ckpt["epoch"] >= cfg.optim.epochs:
        # Nothing to train, so nothing is written: the run's files stay as it left them.
        say(f"run already finished at epoch {ckpt['epoch']}; nothing to do")
        return _summary(run, cfg, ckpt.get("knn", {}))
    # -- data -----------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    splits = load_splits(cfg.data, cache_dir=run.root, log=say)
    if splits.note:
        say(splits.note)
    if cfg.optim.batch_size > len(splits.pretrain.labels):
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is larger than the "
                          f"{len(splits.pretrain.labels)} training images; lower it or use more "
                          "data")
    loader, views, eval_transform, (bank, test) = data_pipeline(cfg, splits, device, rank, world)

    # -- model, objective, optimizer -------------------------------------------------------
    core = build_model(cfg, device)
    model = _wrap_distributed(core, cfg, device)
    if world > 1:
        # Same initial weights everywhere (above), different augmentation draws per rank.
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
    optimizer = build_optimizer(core, cfg.optim)
    scaler = grad_scaler(device, cfg.precision)
    steps_per_epoch = len(loader)
    total_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    # -- resume ------------------------------------------------------------------------------
    step, skipped, result = 0, 0, {}  # skipped: fp16 steps skipped on overflow
    if ckpt is not None:
        step = restore_training_state(ckpt, run.resume_from, core, optimizer, scaler, loader,
                                      rank, steps_per_epoch, total_steps)
        skipped, result = ckpt.get("skipped_steps", 0), ckpt.get("knn", {})
        say(f"resumed {run.resume_from} at epoch {step // steps_per_epoch}, step {step}"
            + (f" (batch {step % steps_per_epoch} of {steps_per_epoch})"
               if step % steps_per_epoch else ""))
    recipe = config_mod.to_yaml(cfg)
    if main:  # config.yaml: the config the run started with; a resume appends its changes
        if not (run.root / CONFIG).is_file():
            (run.root / CONFIG).write_text(recipe if ckpt is None else
                                           config_mod.to_yaml(from_stored(ckpt["config"])))
    say("config:\n" + recipe.rstrip())
    say(f"run directory: {run.root}  (TensorBoard: tensorboard --logdir {run.root / 'tb'})")
    say(f"device {device} x {world} process(es), {len(splits.pretrain.labels)} pretraining / "
        f"{len(splits.bank.labels)} kNN-bank / {len(splits.test.labels)} test images, "
        f"{steps_per_epoch} steps/epoch, "
        f"{cfg.optim.epochs} epochs")
    precision = effective_precision(device, cfg.precision)
    say(f"precision: {precision}" + (" autocast" if precision != "fp32" else "")
        + (" + dynamic loss scaling" if scaler.is_enabled() else "")
        + (", channels_last" if cfg.model.channels_last else "")
        + (", deterministic kernels" if cfg.deterministic else "")
        + ("  (fp16 on the CPU is emulated and slow: use bf16 or fp32 there)"
           if precision == "fp16" and device.type == "cpu" else ""))

    log = Logger(run, step if ckpt is not None else None) if main else None
    t = _Training(cfg=cfg, device=device, run=run, model=model, core=core,
                  optimizer=optimizer, scaler=scaler, loader=loader, views=views, log=log,
                  saver=SavePolicy(run, cfg, core, optimizer, scaler, loader, steps_per_epoch,
                                    device),
                  steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                  warmup_steps=warmup_steps, t_start=t_start,
                  show_bar=sys.stderr.isatty() if progress_bar is None else progress_bar,
                  step=step, skipped=skipped, result=result,
                  nonfinite=torch.zeros((), dtype=torch.bool, device=device))
    if changes:
        t.saver.changes = (step, changes)

    # -- loop --------------------------------------------------------------------------------
    model.train()
    start_epoch = step // steps_per_epoch
    end_epoch = cfg.optim.epochs if max_epochs is None else min(cfg.optim.epochs,
                                                                 start_epoch + max_epochs)
    try:
        if ckpt is None and log is not None:
            log_previews(log, cfg, splits, views, eval_transform, device)
        with StopRequests() as stops:
            for epoch in range(start_epoch, end_epoch):
                done = _train_epoch(t, epoch, stops)
                _end_epoch(t, epoch, done, stops, (bank, test, eval_transform))
    finally:  # also on a failure or a stop: the logs reach the disk (the CLI then exits hard)
        if log is not None:
            log.close()
    if end_epoch < cfg.optim.epochs:
        say(f"stopped after epoch {end_epoch} of {cfg.optim.epochs} as asked; continue with --resume")
    summary = _summary(run, cfg, t.result)
    if main:
        (run.root / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(run: RunDir, cfg: Config, result: dict) -> dict:
    """What `train` returns (and result.json holds): where the run is, and its last kNN."""
    return {"run_dir": str(run.root), "checkpoint": str(run.last),
            "knn_k": result.get("k", cfg.eval.knn_k),
            "knn_temperature": cfg.eval.knn_temperature, **result}


@dataclass
class _Training:
    """What the epochs read (the parts, the schedule) and update (the running state)."""

    cfg: Config
    device: torch.device
    run: RunDir
    model: torch.nn.Module  # DDP-wrapped when there are several processes
    core: torch.nn.Module  # the method itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: object
    views: torch.nn.Module
    log: Logger | None
    saver: SavePolicy
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    t_start: float
    show_bar: bool
    step: int
    skipped: int  # fp16 steps skipped on overflow
    result: dict  # the last kNN result
    nonfinite: torch.Tensor  # a NaN/inf loss since the last check
    first_step: bool = True


@dataclass
class _EpochDone:
    """What the end of an epoch reports: the last step's terms and logged values."""

    first: int  # batches done before this invocation (a mid-epoch resume)
    timer: EpochTimer
    terms: object
    values: dict


def _train_epoch(t: _Training, epoch: int, stops: StopRequests) -> _EpochDone:
    """The steps of one epoch (from a mid-epoch checkpoint's batch on), with logging,
    finite-loss checks and mid-epoch checkpoints; a stop signal ends it after a checkpoint."""
    cfg, world = t.cfg, dist.world_size()
    first = t.step - epoch * t.steps_per_epoch  # batches a mid-epoch checkpoint had done
    t.loader.set_epoch(epoch, start=first)
    timer = EpochTimer(t.device)
    t_log, n_log = timer.start, 0
    bar = epoch_bar(t.steps_per_epoch, epoch, cfg.optim.epochs, t.show_bar, first)
    lines = None if bar is not None else ProgressLines(epoch, cfg.optim.epochs,
                                                       t.steps_per_epoch, first)
    for i, (*images, _) in enumerate(t.loader, start=first):
        lr = lr_at(t.step, t.total_steps, t.warmup_steps, cfg.optim.lr, cfg.optim.min_lr_ratio)
        set_lr(t.optimizer, lr)
        progress = t.step / max(t.total_steps - 1, 1)
        v1, v2 = make_views(t.views, *images)
        log_now = (t.step + 1) % cfg.log_every == 0 or (t.step + 1) % t.steps_per_epoch == 0
        if t.first_step and t.log is not None:
            # The first batch is here and the model built: the start-up a user waits
            # through (index, workers, decoding in memory mode), in wall-clock time.
            t.log.scalars(t.step + 1, {"perf/first_step_unix_time": time.time(),
                                       "perf/seconds_to_first_step":
                                       time.perf_counter() - t.t_start}, "start")
            t.first_step = False
        terms, stepped = optimize_step(t.model, v1, v2, t.optimizer, t.scaler, cfg, progress,
                                       log_now)
        # Finite-loss guard without a host sync per step: remember, check at log time.
        t.nonfinite |= ~torch.isfinite(terms.losses["total"])
        t.step += 1
        n_log += images[0].shape[0]
        if not stepped:
            t.skipped += 1
            if t.skipped <= 20 or t.skipped % 100 == 0:
                say(f"step {t.step}: fp16 gradients overflowed, optimizer step skipped "
                    f"(loss scale now {t.scaler.get_scale():g}; {t.skipped} skipped so far)")
        if bar is not None:
            bar.update(1)
        if log_now:
            check_finite(t.nonfinite, t.step, t.run, cfg.optim)
            now = time.perf_counter()
            values = step_scalars(terms, lr, world * n_log / max(now - t_log, 1e-9))
            if t.scaler.is_enabled():
                values["perf/loss_scale"] = t.scaler.get_scale()
                values["perf/skipped_steps"] = t.skipped
            t_log, n_log = now, 0
            if t.log is not None:
                t.log.scalars(t.step, values, "train")
            if bar is not None:
                bar.set_postfix(loss=f"{values['loss/total']:.3f}",
                                img_s=f"{values['perf/images_per_s']:.0f}")
            if lines is not None and dist.is_main():
                lines.maybe_print(i + 1, t.step, values, now - timer.start,
                                  cfg.optim.epochs - epoch - 1)
        if i + 1 < t.steps_per_epoch:
            save, stop = t.saver.due(t.step, stops.signal_name)
            if save or stop:
                t.saver.save(t.step, t.result, t.skipped, t.nonfinite)
            if stop:
                raise Preempted(t.saver.stopped_message(stop, t.step))
    if bar is not None:
        bar.close()
    # The epoch's last step always logs, so `values` holds its scalars.
    return _EpochDone(first, timer, terms, values)


def _end_epoch(t: _Training, epoch: int, done: _EpochDone, stops: StopRequests,
               monitor: tuple) -> None:
    """The epoch line, the kNN monitor when due, the checkpoint; a stop signal that came
    during the epoch stops the run here (after the checkpoint, without the kNN pass)."""
    cfg, main = t.cfg, dist.is_main()
    epoch_s = done.timer.seconds()
    if done.terms.norms is not None and t.log is not None:
        t.log.tb.add_histogram("norm/hist", done.terms.norms.float().cpu(), t.step)
    epoch_done = epoch + 1
    eta_s = epoch_s * (cfg.optim.epochs - epoch_done)
    line = (f"epoch {epoch_done}/{cfg.optim.epochs}  loss {done.values['loss/total']:.4f}  "
            f"{epoch_s:.1f} s  "
            f"{(t.steps_per_epoch - done.first) * cfg.optim.batch_size / epoch_s:.0f} img/s"
            f"  ETA {eta_s / 60:.1f} min")
    _, stop = t.saver.due(t.step, stops.signal_name, epoch_end=True)
    every = cfg.eval.knn_every
    if main:
        t.log.scalars(t.step, {"perf/epoch_seconds": epoch_s,
                               "perf/epoch_wall_seconds": time.perf_counter() - done.timer.start},
                      "epoch")
    if main and not stop and (epoch_done == cfg.optim.epochs
                              or (every and epoch_done % every == 0)):
        bank, test, eval_transform = monitor
        t0 = time.perf_counter()
        acc = knn_monitor(t.core.backbone, bank, test, eval_transform, cfg, t.device)
        knn_s = time.perf_counter() - t0
        t.log.scalars(t.step, {"knn/top1": acc["top1"], "knn/top5": acc["top5"],
                               "perf/knn_seconds": knn_s}, "knn")
        line += f"  kNN top-1 {acc['top1']:.2f}  top-5 {acc['top5']:.2f} ({knn_s:.1f} s)"
        t.result = {"epoch": epoch_done, "step": t.step, **acc}
    say(line)
    # The checkpoint comes after the kNN pass, which uses no randomness.
    t.saver.save(t.step, t.result, t.skipped, t.nonfinite,
                 snapshot=bool(cfg.ckpt_every and epoch_done % cfg.ckpt_every == 0))
    if stop:
        raise Preempted(t.saver.stopped_message(stop, t.step))


def _wrap_distributed(model: torch.nn.Module, cfg: Config, device: torch.device):
    """DDP across processes (gradient all-reduce) with SyncBN for SimCLR on GPUs, whose
    BatchNorm should see the global batch (torch's SyncBN is GPU-only: CPU processes keep
    per-process BN). MoCo keeps its per-process split-BN (its remedy for the BN leak).
    At world size 1 the model is returned as it is."""
    if dist.world_size() == 1:
        return model
    if model.sync_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    # Buffers (queue, SEC mu, BN stats) are kept equal by construction; no broadcast needed.
    # (Newer torch warns that the flag is deprecated; its replacement still syncs at init.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                         broadcast_buffers=False)

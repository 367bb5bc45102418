"""The training loop: data, model, objective, schedules, resume, loop, in plain phases.

Nothing happens in invisible callbacks: every update (optimizer, momentum encoder, queue,
SEC buffer), every log line and every checkpoint is called from `train` below.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from . import config as config_mod
from . import distributed as dist
from .augment import EvalTransform, TwoViews, ViewAugment, preview_grid
from .checkpoint import (
    link_atomically,
    load_checkpoint,
    restore_training_state,
    rng_state,
    save_rotated,
    training_state,
)
from .config import AugmentConfig, resume_policy, show
from .data import NORMALIZATION, DeviceLoader, load_splits
from .data.crops import read_centre
from .data.stream import BytesStream, CropStream, StreamLoader, eval_resize_for
from .errors import CheckpointError, ConfigError, UserError
from .evaluation.features import Labelled, labelled_features
from .evaluation.knn import knn_evaluate
from .methods import build_model
from .optim import build_optimizer, set_lr
from .preemption import Preempted, StopRequests
from .provenance import CHANGES, CONFIG, config_changes, record_changes
from .recipe import Config, from_stored
from .run_dir import RunDir, open_run, run_root
from .runtime import (
    autocast_for,
    backends,
    effective_precision,
    grad_scaler,
    memory_note,
    resolve_device,
)
from .schedules import lr_at

# Keys that may differ between a run and its resumption (field metadata in config.py):
# "free" (where things are, how often to log or evaluate) and "adjustable" (what the NaN
# message advises: it changes the optimisation, so a resume that changes it says so).
# Everything else changes the optimisation and must match.
RESUME_POLICY = resume_policy(Config)


# ----------------------------------------------------------------------------- setup
def view_augment(a: AugmentConfig, dataset: str, crop: bool = True) -> ViewAugment:
    """One view's augmentation from its recipe section."""
    mean, std = NORMALIZATION[dataset]
    return ViewAugment(size=a.size, crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio),
                       hflip_p=a.hflip_p, jitter_p=a.jitter_p, brightness=a.brightness,
                       contrast=a.contrast, saturation=a.saturation, hue=a.hue, gray_p=a.gray_p,
                       blur_p=a.blur_p, blur_sigma=tuple(a.blur_sigma),
                       solarize_p=a.solarize_p, mean=mean, std=std, crop=crop)


def build_augment(cfg: Config, device: torch.device, crop: bool = True
                  ) -> tuple[TwoViews, EvalTransform]:
    """The two views (`augment`, and `augment2` when the views differ) and the eval view.
    crop=False: the loader delivers each view's crop (streaming), the views start at the flip."""
    first = view_augment(cfg.augment, cfg.data.dataset, crop)
    second = None if cfg.augment2 is None else view_augment(cfg.augment2, cfg.data.dataset, crop)
    mean, std = NORMALIZATION[cfg.data.dataset]
    eval_view = EvalTransform(size=cfg.augment.size, mean=mean, std=std)
    return TwoViews(first, second).to(device), eval_view.to(device)


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


def _open_run(cfg: Config, resume: bool | str | Path | None) -> RunDir:
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


def _read_resume(run: RunDir, cfg: Config, world: int) -> tuple[dict, dict[str, list]]:
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


# ----------------------------------------------------------------------------- logging
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


# ----------------------------------------------------------------------------- data
def _data_pipeline(cfg: Config, splits, device: torch.device, rank: int, world: int):
    """The loader of the pretraining set, the two views, the eval view, and the kNN monitor's
    bank and test sets, for memory or streaming mode."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if splits.mode == "memory":
        # The whole uint8 set lives on the device; batches are index_select'ed there. The
        # kNN bank is usually the pretraining set itself: one device copy serves both.
        on_device = {}

        def moved(s):
            if id(s) not in on_device:
                on_device[id(s)] = s.to(device)
            return on_device[id(s)]

        pretrain = moved(splits.pretrain)
        loader = DeviceLoader(pretrain.images, pretrain.labels, cfg.optim.batch_size,
                              shuffle=True, drop_last=True, generator=generator,
                              shard=(rank, world))
        views, eval_transform = build_augment(cfg, device)
        return loader, views, eval_transform, [moved(splits.bank), moved(splits.test)]
    if cfg.data.decode == "gpu" and device.type != "cuda":
        raise ConfigError(f"data.decode=gpu needs a CUDA device, this run is on {device}; "
                          "use data.decode=cpu")
    second = cfg.augment2 or cfg.augment
    crops = [(cfg.augment.crop_scale, cfg.augment.crop_ratio),
             (second.crop_scale, second.crop_ratio)]
    kind = BytesStream if cfg.data.decode == "gpu" else CropStream
    dataset = kind(splits.pretrain.index, cfg.augment.size, crops, cfg.seed,
                   cfg.data.skip_bad_images)
    loader = StreamLoader(dataset, cfg.optim.batch_size, generator, device, (rank, world),
                          splits.pretrain.workers, log=say)
    views, eval_transform = build_augment(cfg, device, crop=False)
    return loader, views, eval_transform, [splits.bank, splits.test]


def _preview_images(cfg: Config, splits, device: torch.device) -> torch.Tensor:
    """16 pretraining images at the views' input size, for the augmentation previews."""
    if splits.mode == "memory":
        return splits.pretrain.images[:16].to(device)
    index, size = splits.pretrain.index, cfg.augment.size
    resize = eval_resize_for(size, cfg.data.eval_resize)
    pixels = [torch.from_numpy(read_centre(index.path(i), size, resize)).permute(2, 0, 1)
              for i in range(min(16, len(index)))]
    return torch.stack(pixels).to(device)


@torch.no_grad()
def _log_previews(log: Logger, cfg: Config, splits, views: torch.nn.Module,
                  eval_transform: torch.nn.Module, device: torch.device) -> None:
    """The augmentation previews of a new run. They use their own generator state: they must
    not shift the training RNG stream (a resumed run has to replay the same draws)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        sample, stats = _preview_images(cfg, splits, device), NORMALIZATION[cfg.data.dataset]
        view1, view2 = views(sample)
        log.tb.add_image("augment/original", preview_grid(eval_transform(sample), *stats), 0)
        log.tb.add_image("augment/view1", preview_grid(view1, *stats), 0)
        log.tb.add_image("augment/view2", preview_grid(view2, *stats), 0)


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
        run = _open_run(cfg, resume)
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
    ckpt, changes = _read_resume(run, cfg, world) if run.resume_from is not None else (None, {})
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
    loader, views, eval_transform, (bank, test) = _data_pipeline(cfg, splits, device, rank, world)

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
                  saver=Checkpoints(run, cfg, core, optimizer, scaler, loader, steps_per_epoch,
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
            _log_previews(log, cfg, splits, views, eval_transform, device)
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
    saver: Checkpoints
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
    bar = _bar(t.steps_per_epoch, epoch, cfg.optim.epochs, t.show_bar, first)
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
            _check_finite(t.nonfinite, t.step, t.run, cfg.optim)
            now = time.perf_counter()
            values = _step_scalars(terms, lr, world * n_log / max(now - t_log, 1e-9))
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


class Checkpoints:
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
        _check_finite(nonfinite | ~_weights_finite(self.core), step, self.run, self.cfg.optim)
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


def _check_finite(flag: torch.Tensor, step: int, run: RunDir, optim) -> None:
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


def _weights_finite(model: torch.nn.Module) -> torch.Tensor:
    """Whether every weight is finite (a bool tensor): checked before each checkpoint, as
    the step whose loss was still finite can be the one whose update overflowed."""
    return torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()


def _step_scalars(terms, lr: float, images_per_s: float) -> dict[str, float]:
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


def _bar(total: int, epoch: int, epochs: int, show: bool, done: int = 0):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                leave=False, dynamic_ncols=True)

"""The training loop: data, model, objective, schedules, resume, loop, in plain phases.

Nothing happens in invisible callbacks: every update (optimizer, momentum encoder, queue,
SEC buffer), every log line and every checkpoint is called from `train` below.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from . import config as config_mod
from . import distributed as dist
from .augment import EvalTransform, ViewAugment, preview_grid
from .checkpoint import FORMAT_VERSION, atomic_save, load_checkpoint, rng_state, set_rng_state
from .config import Config
from .data import NORMALIZATION, DeviceLoader, ImageSet, load_dataset
from .errors import CheckpointError, ConfigError, UserError
from .evaluation.features import autocast_for, extract_features
from .evaluation.knn import knn_evaluate
from .methods import METHODS
from .optim import build_optimizer, lr_at, set_lr

# Keys that may differ between a run and its resumption: where things are and how often
# to log or evaluate. Everything else changes the optimisation and must match.
RESUMABLE_CHANGES = ("device", "log_every", "ckpt_every", "data.root", "data.download",
                     "eval.knn_every", "eval.knn_backend", "eval.knn_memory_mb")


# ----------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def load_splits(cfg: Config) -> tuple[ImageSet, ImageSet]:
    """Train and test ImageSets as the recipe asks (class subset, first-N subsets)."""
    d = cfg.data
    sets = []
    for train, limit in ((True, d.train_subset), (False, d.test_subset)):
        ds = load_dataset(d.dataset, root=d.root, train=train, download=d.download,
                          image_size=d.image_size, classes_file=d.classes_file)
        if d.classes is not None:
            bad = [c for c in d.classes if not 0 <= c < len(ds.classes)]
            if bad:
                raise ConfigError(f"data.classes has ids {bad} outside 0..{len(ds.classes) - 1} "
                                  f"of {d.dataset}")
            ds = ds.select_classes(d.classes)
        if limit:
            ds = ds.subset(torch.arange(min(limit, len(ds.labels))))
        sets.append(ds)
    return sets[0], sets[1]


def build_augment(cfg: Config, device: torch.device) -> tuple[ViewAugment, EvalTransform]:
    a = cfg.augment
    mean, std = NORMALIZATION[cfg.data.dataset]
    views = ViewAugment(size=a.size, crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio),
                        hflip_p=a.hflip_p, jitter_p=a.jitter_p, brightness=a.brightness,
                        contrast=a.contrast, saturation=a.saturation, hue=a.hue, gray_p=a.gray_p,
                        blur_p=a.blur_p, blur_sigma=tuple(a.blur_sigma),
                        solarize_p=a.solarize_p, mean=mean, std=std)
    return views.to(device), EvalTransform(size=a.size, mean=mean, std=std).to(device)


def build_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    model = METHODS[cfg.method](cfg).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class RunPaths:
    root: Path

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"


def prepare_run_dir(cfg: Config, resume: bool) -> RunPaths:
    """Create the run directory; an existing one is never silently reused."""
    paths = RunPaths(Path(cfg.out_dir) / cfg.name)
    if resume:
        if not paths.last.is_file():
            raise CheckpointError(f"--resume: no checkpoint at '{paths.last}'; start the run "
                                  "without --resume, or set out_dir/name to the run to continue")
        return paths
    if paths.root.exists() and any(paths.root.iterdir()):
        raise UserError(f"run directory '{paths.root}' already exists; add --resume to continue "
                        "it, or pass name=NEW_NAME (or out_dir=...) to start a new run")
    paths.root.mkdir(parents=True, exist_ok=True)
    return paths


def check_resume_config(saved: dict, cfg: Config) -> None:
    now = config_mod.to_dict(cfg)
    diffs = []

    def walk(a: dict, b: dict, prefix: str) -> None:
        for key in sorted(set(a) | set(b)):
            path = prefix + key
            va, vb = a.get(key), b.get(key)
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, path + ".")
            elif va != vb and path not in RESUMABLE_CHANGES:
                diffs.append(f"{path}: {va!r} -> {vb!r}")

    walk(saved, now, "")
    if diffs:
        raise ConfigError("--resume with a recipe that differs from the run's config.yaml in "
                          + "; ".join(diffs) + "; resume with the same recipe and overrides")


# ----------------------------------------------------------------------------- logging
class Logger:
    """TensorBoard + metrics.jsonl + console, from rank 0 only."""

    def __init__(self, paths: RunPaths):
        self.tb = SummaryWriter(log_dir=str(paths.root / "tb"))
        self.jsonl = open(paths.metrics, "a")  # noqa: SIM115 - closed in close()

    def scalars(self, step: int, values: dict[str, float], kind: str) -> None:
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()


def say(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)


# ----------------------------------------------------------------------------- kNN monitor
def knn_monitor(backbone: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                test: tuple[torch.Tensor, torch.Tensor], transform: torch.nn.Module,
                cfg: Config) -> dict[str, float]:
    """Weighted kNN top-1/top-5 of eval-mode backbone features (no augmentation)."""
    bank = extract_features(backbone, train[0], transform, precision=cfg.precision)
    queries = extract_features(backbone, test[0], transform, precision=cfg.precision)
    return knn_evaluate(bank, train[1], queries, test[1], cfg.eval)


# ----------------------------------------------------------------------------- one step
@torch.no_grad()
def make_views(augment: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent random views of a uint8 batch, made on the batch's device."""
    return augment(images), augment(images)


def optimize_step(model: torch.nn.Module, v1: torch.Tensor, v2: torch.Tensor,
                  optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: Config,
                  progress: float, diagnostics: bool = False):
    """Forward (autocast), backward, optional clipping, optimizer step, then the method's
    post-step update (momentum encoder, queue) - in that order, as MoCo and DINO do."""
    with autocast_for(v1.device, cfg.precision):
        terms = model(v1, v2, progress, diagnostics)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms.losses["total"]).backward()
    if cfg.optim.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    getattr(model, "module", model).after_step(progress)
    return terms


# ----------------------------------------------------------------------------- training
def train(cfg: Config, resume: bool = False, progress_bar: bool | None = None,
          max_epochs: int | None = None) -> dict:
    """Pretrain as `cfg` says; returns the final kNN result and where the run lives.

    `max_epochs` stops this invocation after that many epochs (last.pt is written every
    epoch), so a long run can be split into time-limited jobs and continued with resume.
    """
    # -- data -----------------------------------------------------------------------------
    device = dist.init(resolve_device(cfg.device))
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    if cfg.optim.batch_size % world:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} must be divisible by the "
                          f"{world} processes (it is the global batch)")
    paths = prepare_run_dir(cfg, resume) if main else RunPaths(Path(cfg.out_dir) / cfg.name)
    dist.barrier()
    ckpt = None
    if resume:
        ckpt = load_checkpoint(paths.last)
        check_resume_config(ckpt["config"], cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    train_set, test_set = load_splits(cfg)
    if cfg.optim.batch_size > len(train_set.labels):
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is larger than the "
                          f"{len(train_set.labels)} training images; lower it or use more data")
    # The whole uint8 set lives on the device; batches are index_select'ed there.
    train_x, train_y = train_set.images.to(device), train_set.labels.to(device)
    test_x, test_y = test_set.images.to(device), test_set.labels.to(device)
    loader = DeviceLoader(train_x, train_y, cfg.optim.batch_size, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(cfg.seed), shard=(rank, world))
    augment, eval_transform = build_augment(cfg, device)

    # -- model, objective, optimizer -------------------------------------------------------
    core = build_model(cfg, device)
    model = _wrap_distributed(core, cfg, device)
    if world > 1:
        # Same initial weights everywhere (above), different augmentation draws per rank.
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
    optimizer = build_optimizer(core, cfg.optim)
    use_fp16 = device.type == "cuda" and cfg.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)
    steps_per_epoch = len(loader)
    total_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    # -- resume ------------------------------------------------------------------------------
    start_epoch, step = 0, 0
    if ckpt is not None:
        try:
            core.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint '{paths.last}' does not fit this model "
                                  f"({str(err).splitlines()[0][:160]})") from None
        scaler.load_state_dict(ckpt["scaler"])
        loader.generator.set_state(ckpt["loader_rng"])
        # One RNG state per rank (a run resumes with the world size it was saved with).
        rng = ckpt["rng"]
        set_rng_state(rng[rank] if isinstance(rng, list) else rng)
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        say(f"resumed {paths.last} at epoch {start_epoch}, step {step}")
    elif main:
        (paths.root / "config.yaml").write_text(config_mod.to_yaml(cfg))
    say("config:\n" + config_mod.to_yaml(cfg).rstrip())
    say(f"run directory: {paths.root}  (TensorBoard: tensorboard --logdir {paths.root / 'tb'})")
    say(f"device {device} x {world} process(es), {len(train_set.labels)} train / "
        f"{len(test_set.labels)} test images, {steps_per_epoch} steps/epoch, "
        f"{cfg.optim.epochs} epochs")

    log = Logger(paths) if main else None
    if ckpt is None and main:
        # Augmentation previews use their own generator state: they must not shift the
        # training RNG stream (a resumed run has to replay the same draws).
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            sample, stats = train_x[:16], NORMALIZATION[cfg.data.dataset]
            log.tb.add_image("augment/original", preview_grid(eval_transform(sample), *stats), 0)
            log.tb.add_image("augment/view1", preview_grid(augment(sample), *stats), 0)
            log.tb.add_image("augment/view2", preview_grid(augment(sample), *stats), 0)
    show_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
    result: dict = {}
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    # -- loop --------------------------------------------------------------------------------
    model.train()
    end_epoch = cfg.optim.epochs if max_epochs is None else min(cfg.optim.epochs,
                                                                 start_epoch + max_epochs)
    for epoch in range(start_epoch, end_epoch):
        t_epoch = time.perf_counter()
        t_log, n_log = t_epoch, 0
        bar = _bar(steps_per_epoch, epoch, cfg.optim.epochs, show_bar)
        for images, _ in loader:
            lr = lr_at(step, total_steps, warmup_steps, cfg.optim.lr, cfg.optim.min_lr_ratio)
            set_lr(optimizer, lr)
            progress = step / max(total_steps - 1, 1)
            v1, v2 = make_views(augment, images)
            log_now = (step + 1) % cfg.log_every == 0 or (step + 1) % steps_per_epoch == 0
            terms = optimize_step(model, v1, v2, optimizer, scaler, cfg, progress, log_now)
            # Finite-loss guard without a host sync per step: remember, check at log time.
            nonfinite |= ~torch.isfinite(terms.losses["total"])
            step += 1
            n_log += images.shape[0]
            if bar is not None:
                bar.update(1)
            if log_now:
                _check_finite(nonfinite, step, paths)
                now = time.perf_counter()
                values = _step_scalars(terms, lr, world * n_log / max(now - t_log, 1e-9))
                t_log, n_log = now, 0
                if log is not None:
                    log.scalars(step, values, "train")
                if bar is not None:
                    bar.set_postfix(loss=f"{values['loss/total']:.3f}",
                                    img_s=f"{values['perf/images_per_s']:.0f}")
        if bar is not None:
            bar.close()
        epoch_s = time.perf_counter() - t_epoch
        if terms.norms is not None and log is not None:
            log.tb.add_histogram("norm/hist", terms.norms.float().cpu(), step)
        epoch_done = epoch + 1
        eta_s = epoch_s * (cfg.optim.epochs - epoch_done)
        line = (f"epoch {epoch_done}/{cfg.optim.epochs}  loss {values['loss/total']:.4f}  "
                f"{epoch_s:.1f} s  {steps_per_epoch * cfg.optim.batch_size / epoch_s:.0f} img/s"
                f"  ETA {eta_s / 60:.1f} min")
        rng_states = dist.gather_objects(rng_state())
        if not main:
            dist.barrier()  # rank 0 evaluates and checkpoints
            continue
        log.scalars(step, {"perf/epoch_seconds": epoch_s}, "epoch")
        last = epoch_done == cfg.optim.epochs
        every = cfg.eval.knn_every
        if last or (every and epoch_done % every == 0):
            t0 = time.perf_counter()
            acc = knn_monitor(core.backbone, (train_x, train_y), (test_x, test_y),
                              eval_transform, cfg)
            knn_s = time.perf_counter() - t0
            log.scalars(step, {"knn/top1": acc["top1"], "knn/top5": acc["top5"],
                               "perf/knn_seconds": knn_s}, "knn")
            line += f"  kNN top-1 {acc['top1']:.2f}  top-5 {acc['top5']:.2f} ({knn_s:.1f} s)"
            result = {"epoch": epoch_done, "step": step, **acc}
        say(line)
        # -- checkpoint (after the kNN pass, which uses no randomness) ------------------------
        state = {
            "format": "ssl_sec", "format_version": FORMAT_VERSION,
            "config": config_mod.to_dict(cfg), "epoch": epoch_done, "step": step,
            "model": core.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "loader_rng": loader.generator.get_state(),
            "rng": rng_states, "knn": result,
        }
        atomic_save(state, paths.last)
        if cfg.ckpt_every and epoch_done % cfg.ckpt_every == 0:
            atomic_save(state, paths.root / f"epoch{epoch_done:04d}.pt")
        dist.barrier()
    if log is not None:
        log.close()
    if ckpt is not None and start_epoch >= cfg.optim.epochs:
        result = ckpt.get("knn", {})
        say(f"run already finished at epoch {start_epoch}; nothing to do")
    elif end_epoch < cfg.optim.epochs:
        say(f"stopped after epoch {end_epoch} of {cfg.optim.epochs} as asked; continue with --resume")
    summary = {"run_dir": str(paths.root), "checkpoint": str(paths.last),
               "knn_k": cfg.eval.knn_k, "knn_temperature": cfg.eval.knn_temperature, **result}
    if main:
        (paths.root / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _wrap_distributed(model: torch.nn.Module, cfg: Config, device: torch.device):
    """DDP across processes (gradient all-reduce) with SyncBN for SimCLR on GPUs, whose
    BatchNorm should see the global batch (torch's SyncBN is GPU-only: CPU processes keep
    per-process BN). MoCo keeps its per-process split-BN (its remedy for the BN leak).
    At world size 1 the model is returned as it is."""
    if dist.world_size() == 1:
        return model
    if cfg.method == "simclr" and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    # Buffers (queue, SEC mu, BN stats) are kept equal by construction; no broadcast needed.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                     broadcast_buffers=False)


def _check_finite(flag: torch.Tensor, step: int, paths: RunPaths) -> None:
    # Every rank must take the same decision, or the others would hang in a collective.
    if bool(dist.all_reduce_mean(flag.float()) > 0):
        raise UserError(f"the loss became NaN/inf at or before step {step}; the last good "
                        f"checkpoint is kept at '{paths.last}'; lower optim.lr or set "
                        "optim.grad_clip (e.g. 3.0)")


def _step_scalars(terms, lr: float, images_per_s: float) -> dict[str, float]:
    """One host sync for every logged value of this step."""
    names = [f"loss/{k}" for k in terms.losses] + [f"diag/{k}" for k in terms.diagnostics]
    tensors = [*terms.losses.values(), *terms.diagnostics.values()]
    values = torch.stack([v.detach().float().reshape(()) for v in tensors]).tolist()
    out = dict(zip(names, values, strict=True))
    out["lr"] = lr
    out["perf/images_per_s"] = images_per_s
    return out


def _bar(total: int, epoch: int, epochs: int, show: bool):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False,
                dynamic_ncols=True)

"""Norm diagnostics of a checkpoint: how spread out are the embedding norms?

SEC (docs/methods.md section 3) pulls the projector outputs' norms ||z|| towards their mean; this
command measures the result on the (whole) test set, for the pooled backbone features h and the
projector outputs z alike, in eval mode and **before** any L2 normalisation. It writes
`<stem>.norms.json` (mean, std, coefficient of variation, quantiles) and `<stem>.norms.png`
(histograms; needs matplotlib: `pip install ssl_sec[plots]`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..data import load_splits
from ..errors import CheckpointError, UserError
from ..methods import build_model
from ..runtime import resolve_device
from .commands import checkpoint_config, eval_transform_for, pretrain_dataset
from .features import embed, labelled_batches


def norm_statistics(norms: torch.Tensor) -> dict[str, float]:
    """mean, std (unbiased, as the training diagnostics), cv = std / mean, min, max, quantiles.

    Shape: norms (N,) -> dict of floats.
    """
    x = norms.detach().double().flatten().cpu()
    mean = x.mean()
    std = x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype)
    q = torch.quantile(x, torch.tensor([0.05, 0.5, 0.95], dtype=x.dtype))
    return {"n": int(x.numel()), "mean": mean.item(), "std": std.item(),
            "cv": (std / mean.clamp_min(1e-12)).item(), "min": x.min().item(),
            "max": x.max().item(), "p05": q[0].item(), "median": q[1].item(), "p95": q[2].item()}


@torch.no_grad()
def embed_norms(encoder: nn.Module, batches: Iterable[torch.Tensor], transform: nn.Module,
                device: torch.device, precision: str = "auto"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """||h|| and ||z|| of every image under the plain eval view, encoder in eval mode.

    `encoder(x)` must return (h, z) (ssl_sec.models.Encoder); `batches` yields uint8
    (B,3,H,W) images on `device`. Returns two float32 (N,) tensors on the CPU.
    """
    norms = embed(_Norms(encoder), batches, transform, device, precision).cpu()
    return norms[:, 0].contiguous(), norms[:, 1].contiguous()


class _Norms(nn.Module):
    """(h, z) -> (B, 2) float32 norms, so `embed` (eval mode, autocast) runs the pass."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.train(encoder.training)  # embed restores this mode afterwards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, z = self.encoder(x)
        return torch.stack([h.float().norm(dim=1), z.float().norm(dim=1)], dim=1)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("the norm histogram needs matplotlib: pip install ssl_sec[plots]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_norm_histograms(h_norms: torch.Tensor, z_norms: torch.Tensor, stats: dict,
                         out: Path, title: str = "") -> None:
    """Two histograms (||h||, ||z||) with their mean/std/CV in the panel titles, as a PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, norms, name, label in ((axes[0], h_norms, "h", "||h|| (backbone, pooled)"),
                                   (axes[1], z_norms, "z", "||z|| (projector)")):
        s = stats[name]
        ax.hist(norms.numpy(), bins=60, color="tab:blue" if name == "h" else "tab:orange")
        ax.axvline(s["mean"], color="k", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("images")
        ax.set_title(f"mean {s['mean']:.3g}  std {s['std']:.3g}  CV {s['cv']:.3f}")
    if title:
        fig.suptitle(title, fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def norms_command(path: Path, overrides: list[str] | None = None) -> dict:
    """`ssl-sec norms`: statistics of ||h|| and ||z|| on the test set, JSON + PNG beside the
    checkpoint."""
    _pyplot()  # fail before the expensive part when matplotlib is missing
    path = Path(path)
    ckpt = load_checkpoint(path)
    # The whole test set unless data.test_subset is overridden (the pretraining run's subset
    # was a speed device, not part of this diagnostic).
    cfg = checkpoint_config(path, ckpt, overrides, {"data": {"test_subset": 0}})
    device = resolve_device(cfg.device)
    model = build_model(cfg, device)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint '{path}' does not fit the model its config describes "
                              f"({str(err).splitlines()[0][:160]})") from None
    transform = eval_transform_for(cfg, pretrain_dataset(ckpt), device)
    del ckpt
    test_set = load_splits(cfg.data, cache_dir=path.parent).test
    t0 = time.perf_counter()
    batches = (x for x, _ in labelled_batches(test_set, device, cfg.augment.size,
                                              cfg.data.eval_resize))
    h, z = embed_norms(model.encoder, batches, transform, device, precision=cfg.precision)
    stats = {"h": norm_statistics(h), "z": norm_statistics(z)}
    png = path.with_name(f"{path.stem}.norms.png")
    plot_norm_histograms(h, z, stats, png, title=f"{path} on {cfg.data.dataset} test "
                         f"({len(h)} images, eval mode, un-normalised)")
    result = {"checkpoint": str(path), "dataset": cfg.data.dataset, "split": "test",
              "n_images": len(h), "method": cfg.method, "arch": cfg.model.arch,
              "sec_eta": cfg.loss.sec.eta,
              "layers": {"h": "backbone pooled features", "z": "projector output (online)"},
              **stats, "png": str(png), "seconds": round(time.perf_counter() - t0, 2)}
    path.with_name(f"{path.stem}.norms.json").write_text(json.dumps(result, indent=2) + "\n")
    return result

"""Norm diagnostics of a checkpoint: how spread out are the embedding norms?

SEC (docs/methods.md section 3) pulls the projector outputs' norms ||z|| towards their mean; this
command measures the result on the (whole) test set, for the pooled backbone features h and the
projector outputs z alike, in eval mode and **before** any L2 normalisation. It writes
`<stem>.norms.json` (mean, std, coefficient of variation, quantiles) and `<stem>.norms.png`
(histograms; needs matplotlib: `pip install ssl_sec[plots]`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .features import embed
from .session import EvalSession


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


OVERRIDES = ("overrides of the checkpoint's config; the whole test set is embedded unless "
             "e.g. data.test_subset=1000")


def add_arguments(parser) -> None:
    """No options of its own (its features are not cached: --no-cache changes nothing)."""


def run(args) -> dict:
    return norms_command(Path(args.checkpoint), args.overrides)


def norms_command(path: Path, overrides: list[str] | None = None) -> dict:
    """`ssl-sec norms`: statistics of ||h|| and ||z|| on the test set, JSON + PNG beside the
    checkpoint."""
    _pyplot()  # fail before the expensive part when matplotlib is missing
    path = Path(path)
    # The whole test set unless data.test_subset is overridden (the pretraining run's subset
    # was a speed device, not part of this diagnostic).
    session = EvalSession(path, overrides, data={"data": {"test_subset": 0}}, projector=True)
    cfg, device = session.cfg, session.device
    t0 = time.perf_counter()
    batches = (x for x, _ in session.splits.test.eval_batches(device, cfg.augment.size,
                                                              cfg.data.eval_resize))
    h, z = embed_norms(session.model, batches, session.transform, device,
                       precision=session.precision)
    stats = {"h": norm_statistics(h), "z": norm_statistics(z)}
    png = path.with_name(f"{path.stem}.norms.png")
    plot_norm_histograms(h, z, stats, png, title=f"{path} on {cfg.data.dataset} test "
                         f"({len(h)} images, eval mode, un-normalised)")
    result = {"checkpoint": str(path), "dataset": cfg.data.dataset, "split": "test",
              "n_images": len(h), "method": cfg.method, "arch": cfg.model.arch,
              "sec_eta": cfg.loss.sec.eta,
              "layers": {"h": "backbone pooled features", "z": "projector output (online)"},
              **stats, "png": str(png), "seconds": round(time.perf_counter() - t0, 2)}
    session.write("norms", result)
    return result

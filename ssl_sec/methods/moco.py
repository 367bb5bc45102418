"""MoCo v2 (He et al. 2020; Chen et al. 2020): momentum key encoder and a queue of keys.

The loop calls `after_step` after the optimizer step: it moves the momentum encoder and
enqueues this step's keys. Nothing is updated inside `forward`'s autograd graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config import Need
from ..distributed import gather
from ..losses import Similarities, queue_similarities
from ..models import Encoder, convert_split_bn, ema_update, mlp, momentum_copy
from ..objective import Objective, Terms
from ..schedules import momentum_at
from .base import ContrastiveMethod

if TYPE_CHECKING:
    from ..recipe import Config


@dataclass
class MocoOptions:
    """The recipe's `moco:` section."""

    queue_size: int = 4096
    momentum: float = 0.99
    # "constant" or "cosine" (cosine-increased to 1 over the run, as BYOL / solo-learn).
    momentum_schedule: str = "constant"
    symmetric: bool = True
    # Single-device BatchNorm remedy: "split" (split-BN into groups) or "none".
    bn_remedy: str = "split"
    bn_splits: int = 8

    def check(self, need: Need) -> None:
        need(self.queue_size >= 1, "queue_size", self.queue_size, ">= 1")
        need(0.0 <= self.momentum <= 1.0, "momentum", self.momentum, "in [0, 1]")
        need.choice("momentum_schedule", self.momentum_schedule, ("constant", "cosine"))
        need.choice("bn_remedy", self.bn_remedy, ("split", "none"))
        need(self.bn_splits >= 1, "bn_splits", self.bn_splits, ">= 1")


class MoCo(ContrastiveMethod):
    """A `Method` (ssl_sec/methods/base.py)."""

    sync_bn = False  # per-process split-BN is MoCo's remedy for the BN leak
    Options = MocoOptions

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.moco
        self.cfg = m
        dims = [cfg.model.proj_hidden_dim, cfg.model.proj_output_dim]
        # lightly's MoCoProjectionHead (v2): Linear-ReLU-Linear, no BN.
        self.encoder = Encoder(cfg.model, lambda d: mlp([d, *dims], batch_norm=False),
                               image_size=cfg.augment.size)
        if m.bn_remedy == "split":
            convert_split_bn(self.encoder.backbone, m.bn_splits)
        self.momentum_encoder = momentum_copy(self.encoder)
        self.objective = Objective(cfg.loss)
        # Ring buffer of normalised keys. It starts empty: columns not yet filled are masked
        # out of the loss (no random "keys" as negatives), so the loss is defined from step 0.
        self.register_buffer("queue", torch.zeros(m.queue_size, cfg.model.proj_output_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))
        self._pending_keys: torch.Tensor | None = None
        # queue_ptr mirrored on the host, so that a write is a slice copy that never waits
        # for the device; read from the buffer once after construction or a load.
        self._ptr: int | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ptr = None

    @staticmethod
    def check_config(cfg: Config, need: Need) -> None:
        ContrastiveMethod.check_config(cfg, need)
        if cfg.moco.bn_remedy == "split":
            need(cfg.optim.batch_size % cfg.moco.bn_splits == 0, "moco.bn_splits",
                 cfg.moco.bn_splits, f"a divisor of optim.batch_size={cfg.optim.batch_size} "
                 "(split-BN groups)")

    @torch.no_grad()
    def _keys(self, v: torch.Tensor) -> torch.Tensor:
        """Normalised keys of the momentum encoder. With split-BN the batch is shuffled first
        so that a key lands in a different BN group than its query (shuffle-BN on one device)."""
        if self.cfg.bn_remedy == "split":
            # argsort of uniforms: a random permutation drawn on the device, no host sync.
            perm = torch.rand(v.shape[0], device=v.device).argsort()
            _, k = self.momentum_encoder(v[perm])
            k = k[torch.argsort(perm)]
        else:
            _, k = self.momentum_encoder(v)
        return F.normalize(k.float(), dim=1)

    def _similarities(self, q: torch.Tensor, k: torch.Tensor) -> Similarities:
        s = queue_similarities(q, k, self.queue)
        # Unfilled queue slots are not candidates: one (1, 1+K) column mask, broadcast.
        filled = torch.arange(self.queue.shape[0], device=q.device) < self.queue_len
        s.valid = torch.cat([filled.new_ones(1), filled])[None, :]
        return s

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, progress: float,
                diagnostics: bool = True) -> Terms:
        """v1, v2: augmented views (N,3,h,w). Queries from v1 (and v2 when symmetric), keys
        from the other view."""
        h1, q1 = self.encoder(v1)
        k2 = self._keys(v2)
        if self.cfg.symmetric:
            h2, q2 = self.encoder(v2)
            k1 = self._keys(v1)
            a, b = self._similarities(q1, k2), self._similarities(q2, k1)
            # Stacking both directions as rows averages the two losses.
            s = Similarities(torch.cat([a.sim, b.sim]), torch.cat([a.pos, b.pos]),
                             valid=a.valid)
            q, h = torch.cat([q1, q2]), torch.cat([h1, h2])
            self._pending_keys = gather(torch.cat([k1, k2]))
        else:
            s, q, h = self._similarities(q1, k2), q1, h1
            self._pending_keys = gather(k2)
        return self.objective(s, q, h, progress, diagnostics)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """After the optimizer step: momentum update, then enqueue this step's keys (the
        keys of every rank, so the queue is identical on all ranks)."""
        ema_update(self.momentum_encoder, self.encoder,
                   momentum_at(self.cfg.momentum, self.cfg.momentum_schedule, progress))
        if self._pending_keys is not None:
            self.enqueue(self._pending_keys)
            self._pending_keys = None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (B, d) into the ring buffer in place at the pointer: one slice copy, two
        where it wraps around (K need not divide B; of more than K keys the last K stay)."""
        size = self.queue.shape[0]
        keys = keys[-size:].to(self.queue.dtype)
        if self._ptr is None:
            self._ptr = int(self.queue_ptr)
        ptr, n = self._ptr, keys.shape[0]
        first = min(n, size - ptr)
        self.queue[ptr:ptr + first].copy_(keys[:first])
        if first < n:
            self.queue[:n - first].copy_(keys[first:])
        self._ptr = (ptr + n) % size
        self.queue_ptr.fill_(self._ptr)
        self.queue_len.copy_(torch.clamp(self.queue_len + n, max=size))

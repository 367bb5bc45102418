"""Loss functions, pure (float32 math even under bf16 autocast): the similarity record both
methods build, InfoNCE and Circle (plain and fused), SEC. The objective's terms
(ssl_sec/terms/) and the Objective that sums them (ssl_sec/objective.py) are built on these.

Notation (docs/methods.md): z1, z2 are the un-normalised projector outputs of the two views,
Shape (N, d); u = z / ||z||; T the temperature.

Every contrastive term is a cross-entropy over one row of candidates per anchor. Both
methods describe their candidates with one `Similarities` record: SimCLR's (2N, 2N) matrix
of all views (self masked out, positive at i +- N), MoCo's (N, 1+K) matrix [q.k, q.queue]
(positive in column 0). InfoNCE and the Circle term are then derived from the same matrix,
so the similarities are computed once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .distributed import gather_with_grad, rank, world_size

__all__ = ["Similarities", "circle_contrastive", "circle_from",
           "circle_logits", "circle_queue", "contrastive_losses", "info_nce", "info_nce_from",
           "moco_info_nce", "pairwise_similarities", "queue_similarities", "sec_loss"]


@dataclass
class Similarities:
    """Cosine similarities of anchors to candidates.

    sim: (R, C) float32 cosine similarities.
    pos: (R,) int64 column of each anchor's positive.
    self_col: (R,) int64 column holding the anchor itself (SimCLR), excluded; or None.
    valid: (R, C) or broadcastable (1, C) bool, False where a column is not a candidate
        (MoCo's unfilled queue slots), or None when every column is.
    """

    sim: torch.Tensor
    pos: torch.Tensor
    self_col: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """Non-candidates get -inf (exp -> 0), never 0 (exp -> 1, a phantom negative).

        Writes in place: pass a fresh logits tensor (its op must not need its own output
        for backward, true of the scalings used here)."""
        if self.self_col is not None:
            logits.scatter_(1, self.self_col[:, None], float("-inf"))
        if self.valid is not None:
            logits.masked_fill_(~self.valid, float("-inf"))
        return logits

    def pos_mask(self) -> torch.Tensor:
        return F.one_hot(self.pos, self.sim.shape[1]).bool()



def pairwise_similarities(z1: torch.Tensor, z2: torch.Tensor) -> Similarities:
    """SimCLR candidates: all 2N views of the global batch. Shapes: z1, z2 (N, d) local
    -> sim (2N, 2N * world): this rank's anchors against every rank's views.

    Across ranks the views are gathered with gradient and this rank's positives and self
    columns are offset by rank * N (forgetting the offset is the classic bug). At world
    size 1 this is the (2N, 2N) matrix of all views.
    """
    n = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    r, w = rank(), world_size()
    candidates = u if w == 1 else torch.cat([gather_with_grad(u[:n]), gather_with_grad(u[n:])])
    local = torch.arange(n, device=u.device) + r * n
    return Similarities(u @ candidates.T, pos=torch.cat([local + w * n, local]),
                        self_col=torch.cat([local, local + w * n]))


def queue_similarities(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> Similarities:
    """MoCo candidates: the key of the same image, then the queue of past keys.

    Shapes: q (N, d) un-normalised queries; k (N, d) keys; queue (K, d) normalised keys
    (K may be 0) -> sim (N, 1+K) with the positive in column 0.
    """
    u = F.normalize(q.float(), dim=1)
    key = F.normalize(k.float(), dim=1)
    sim = torch.cat([(u * key).sum(1, keepdim=True), u @ queue.float().T], dim=1)
    return Similarities(sim, torch.zeros(u.shape[0], dtype=torch.long, device=u.device))


def info_nce_from(s: Similarities, temperature: float) -> torch.Tensor:
    """Cross-entropy of each anchor's positive among its valid candidates, logits s / T.
    Scalar (mean over anchors). Computed as log-sum-exp minus the positive's logit, never
    log(pos / (pos + neg)) on raw exponentials (overflow, lost precision)."""
    return contrastive_losses(s, temperature=temperature)[0]


def circle_from(s: Similarities, margin: float, gamma: float) -> torch.Tensor:
    """Circle term with one positive per anchor: softplus(lse_n + lse_p) equals the
    cross-entropy of the positive's logit among all logits of the row. Scalar."""
    return contrastive_losses(s, w_infonce=0.0, circle=(margin, gamma))[0]


def circle_logits(s: Similarities, margin: float, gamma: float,
                  alpha: torch.Tensor | None = None, deltas: tuple[float, float] | None = None
                  ) -> torch.Tensor:
    """Circle-loss logits (Sun et al. 2020), one row per anchor. Shape (R, C).

    positive column: gamma * alpha_p * (s_p - Delta_p), alpha_p = relu(1 + m - s_p)
    negative columns: gamma * alpha_n * (s_n - Delta_n), alpha_n = relu(s_n + m)
    with Delta_p = 1 - m, Delta_n = m. alpha is detached: it re-weights pairs but is a
    constant for autograd, as in every reference implementation.

    This is the formula written out with plain autograd, kept as the readable reference
    (tests compare the fused path of `contrastive_losses` against it). `alpha` (R, C) and
    `deltas` (Delta_p, Delta_n) may be passed explicitly (the alpha-detached test, the
    InfoNCE reduction).
    """
    pos = s.pos_mask()
    sim = s.sim.float()
    if alpha is None:
        alpha = torch.where(pos, 1.0 + margin - sim, sim + margin).clamp_min(0.0).detach()
    delta_p, delta_n = (1.0 - margin, margin) if deltas is None else deltas
    shift = torch.where(pos, sim - delta_p, sim - delta_n)
    return s.masked(gamma * alpha * shift)


def contrastive_losses(s: Similarities, temperature: float = 0.2, w_infonce: float = 1.0,
                       circle: tuple[float, float] | None = None, w_circle: float = 1.0
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w_infonce * InfoNCE + w_circle * Circle from one similarity matrix, fused.

    Args:
        s: the step's similarities, sim (R, C).
        temperature: InfoNCE's T (> 0).
        w_infonce: InfoNCE's weight; 0 skips the term (nothing is computed for it).
        circle: (margin, gamma) to add the Circle term, None to leave it out.
        w_circle: Circle's weight.
    Returns:
        (total, parts): total is the weighted sum, a scalar that carries the gradient;
        parts maps "infonce" and/or "circle" to each term's value (mean over the R
        anchors), detached, for logging.
    """
    weights = {"infonce": w_infonce, "circle": w_circle if circle is not None else 0.0}
    names = [name for name, w in weights.items() if w > 0]
    if not names:
        return s.sim.new_zeros(()), {}
    margin, gamma = circle if weights["circle"] > 0 else (0.0, 0.0)
    # Float32 math even inside a bf16 autocast region (the softmax of large logits).
    with torch.autocast(s.sim.device.type, enabled=False):
        total, values = _ContrastiveCE.apply(s.sim, s, temperature, weights["infonce"],
                                             margin, gamma, weights["circle"])
    return total, dict(zip(names, values, strict=True))


class _ContrastiveCE(torch.autograd.Function):
    """InfoNCE and Circle cross-entropies over the rows of one (R, C) similarity matrix,
    with the gradient computed in the forward pass.

    Why: through plain autograd each term costs a logits tensor, log_softmax, the one-hot
    nll backward (an (R, C) zero fill + scatter), log_softmax's backward (an exp), the
    backward of the scaling and of the -inf masking, and a final add of the two gradients:
    about ten passes over the matrix per term, which made the Circle term cost half as much
    again as InfoNCE on the CPU. The gradient has a closed form,

        d CE_row / d logit = softmax(logits) - onehot(pos),
        d logit / d sim    = 1 / T (InfoNCE), gamma * alpha (Circle, alpha detached),

    and the only thing backward adds is the upstream scalar. So the forward computes each
    term's softmax, its loss, and accumulates the weighted gradient into one (R, C) buffer,
    the only tensor saved for backward. Masked candidates have probability exactly 0,
    hence zero gradient.
    """

    @staticmethod
    def forward(ctx, sim: torch.Tensor, s: Similarities, temperature: float, w_infonce: float,
                margin: float, gamma: float, w_circle: float):
        if sim.dtype in (torch.float16, torch.bfloat16):
            sim = sim.float()  # float32 math whatever autocast produced
        s = replace(s, sim=sim)
        idx = s.pos[:, None]
        rows = sim.shape[0]
        need_grad = ctx.needs_input_grad[0]
        c_nce, c_circle = w_infonce / (temperature * rows), w_circle / rows
        values, grad = [], None
        if w_infonce > 0:
            prob, ce = _softmax_ce(s.masked(sim * (1.0 / temperature)), idx)
            values.append(ce)
            if need_grad:
                grad = prob.mul_(c_nce)
        if w_circle > 0:
            alpha, logits = _circle_parts(s, margin, gamma)
            prob, ce = _softmax_ce(s.masked(logits), idx)
            values.append(ce)
            c_circle *= gamma  # d logit / d sim = gamma * alpha
            if need_grad:
                grad = (prob.mul_(alpha).mul_(c_circle) if grad is None
                        else grad.addcmul_(prob, alpha, value=c_circle))
        if need_grad:
            # The -onehot(pos) part of each term's softmax: -coef * dlogit at the positive.
            pos_grad = torch.full_like(idx, -c_nce, dtype=grad.dtype)
            if w_circle > 0:
                pos_grad -= c_circle * alpha.gather(1, idx)
            grad.scatter_add_(1, idx, pos_grad)
        values = torch.stack(values)
        ctx.mark_non_differentiable(values)
        ctx.save_for_backward(grad)
        weights = [w for w in (w_infonce, w_circle) if w > 0]
        return sum(w * v for w, v in zip(weights, values, strict=True)), values

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_values):
        (grad,) = ctx.saved_tensors
        # loss.backward() seeds 1: on the CPU reading that costs nothing and saves a pass
        # over the matrix; on CUDA reading it would be a host sync, so multiply instead.
        if not grad_total.is_cuda and grad_total.item() == 1.0:
            return grad, None, None, None, None, None, None
        return grad * grad_total, None, None, None, None, None, None


def _circle_parts(s: Similarities, margin: float, gamma: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Circle alpha (detached) and logits, both (R, C), unmasked: gamma * alpha is the
    derivative of each logit w.r.t. its similarity. Same values as `circle_logits`.

    Negatives: with c = max(s, -m), alpha_n = relu(s + m) = c + m and the logit
    gamma * alpha_n * (s - m) = gamma * (c^2 - m^2) (equal where s >= -m, both 0 where
    s < -m), which needs a handful of cheap passes over the matrix and no multiply of two
    (R, C) tensors. The one positive per row, gamma * relu(1 + m - s_p) * (s_p - (1 - m)),
    is then scattered in: no (R, C) positive mask, no where() over the matrix."""
    idx = s.pos[:, None]
    s_pos = s.sim.gather(1, idx)
    alpha = s.sim.clamp(min=-margin)                                   # c
    logits = torch.mul(alpha, alpha).mul_(gamma).sub_(gamma * margin * margin)
    alpha.add_(margin)                                                 # alpha_n = c + m
    alpha_p = (1.0 + margin - s_pos).clamp_(min=0.0)
    alpha.scatter_(1, idx, alpha_p)
    logits.scatter_(1, idx, gamma * alpha_p * (s_pos - (1.0 - margin)))
    return alpha, logits


def _softmax_ce(logits: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of each row and the mean cross-entropy of the positives. Shapes: logits
    (R, C) with -inf at non-candidates, idx (R, 1) the positives' columns -> (R, C), scalar.

    The loss is lse - x_pos with lse recovered from the softmax itself instead of a second
    reduction: at the row maximum the probability is exp(max - lse), so
    lse = max - log(max prob). That probability is at least 1/C, so the log never sees an
    underflowed 0 (log of the positive's own probability could: large gamma, bad pair)."""
    prob = F.softmax(logits, dim=1)
    lse = logits.amax(dim=1) - prob.amax(dim=1).log()
    return prob, (lse - logits.gather(1, idx).squeeze(1)).mean()


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR NT-Xent over the 2N anchors (each with one positive, 2N-2 negatives).

    Args:
        z1, z2: un-normalised projections of the two views. Shape (N, d).
        temperature: T > 0.
    Returns:
        Scalar mean loss over the 2N anchors; equals lightly's NTXentLoss(T)(z1, z2).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return info_nce_from(pairwise_similarities(z1, z2), temperature)


def circle_contrastive(z1: torch.Tensor, z2: torch.Tensor, margin: float, gamma: float
                       ) -> torch.Tensor:
    """Circle-style term with in-batch negatives (SimCLR form).

    Args:
        z1, z2: un-normalised projections of the two views. Shape (N, d).
        margin: m in [0, 1]; gamma: scale > 0.
    Returns:
        Scalar mean over the 2N anchors (one positive, 2N-2 negatives each).
    """
    _check_circle(margin, gamma)
    return circle_from(pairwise_similarities(z1, z2), margin, gamma)


def circle_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, margin: float,
                 gamma: float) -> torch.Tensor:
    """Circle-style term with a queue of negatives (MoCo form).

    Shapes: q (N, d) un-normalised queries, k (N, d) keys, queue (K, d). Scalar.
    """
    _check_circle(margin, gamma)
    return circle_from(queue_similarities(q, k, queue), margin, gamma)


def moco_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: logits [q.k, q.queue] / T, target 0. Shapes as circle_queue."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return info_nce_from(queue_similarities(q, k, queue), temperature)


def _check_circle(margin: float, gamma: float) -> None:
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"circle margin must be in [0, 1], got {margin}")
    if gamma <= 0:
        raise ValueError(f"circle gamma must be > 0, got {gamma}")


def sec_loss(z: torch.Tensor, mu: torch.Tensor | float | None = None,
             norms: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical embedding constraint: mean_i (||z_i|| - mu)^2.

    Args:
        z: un-normalised embeddings. Shape (M, d).
        mu: target radius; None means the detached mean norm of `z` (the batch variant).
        norms: the detached row norms of `z` (M,) when the caller has them already.
    Returns:
        Scalar. Its gradient w.r.t. z_i is purely radial: (2/M)(n_i - mu) z_i / n_i.
    """
    z = z.float()
    norms = z.detach().norm(dim=1) if norms is None else norms
    return _SecLoss.apply(z, norms, norms.mean() if mu is None else mu)


class _SecLoss(torch.autograd.Function):
    """mean_i (n_i - mu)^2 from z (M, d) and its row norms n (M,), computed once per step
    and passed in detached; mu is a constant. The gradient has the closed form
    d/dz_i = (2/M)(n_i - mu) z_i / n_i (0 for a zero row): one pass over z in backward
    instead of autograd's norm, subtraction, power and mean nodes."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, norms: torch.Tensor, mu: torch.Tensor | float):
        dev = norms - mu
        ctx.save_for_backward(z, norms, dev)
        return dev.square().mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, norms, dev = ctx.saved_tensors
        scale = torch.where(norms > 0, dev / norms, 0.0) * (2.0 / norms.shape[0]) * grad
        return z * scale[:, None], None, None

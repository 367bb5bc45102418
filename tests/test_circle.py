"""Circle-style term against a loop implementation of the pair form (docs/methods.md section 4)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import EPS32, f32_close

from ssl_sec.losses import (
    Similarities,
    circle_contrastive,
    circle_logits,
    circle_queue,
    contrastive_losses,
    info_nce,
    pairwise_similarities,
    queue_similarities,
)


def circle_loop(u_rows, candidates, pos_cols, valid, m, gamma):
    """softplus(lse_n(gamma a_n (s_n - m)) + lse_p(-gamma a_p (s_p - (1 - m)))) per anchor."""
    total = 0.0
    for i, u in enumerate(u_rows):
        sp, sn = [], []
        for j, c in enumerate(candidates):
            if not valid(i, j):
                continue
            s = float(u @ c)
            (sp if j == pos_cols[i] else sn).append(s)
        neg = [gamma * max(s + m, 0.0) * (s - m) for s in sn]
        pos = [-gamma * max(1 + m - s, 0.0) * (s - (1 - m)) for s in sp]
        lse_n = math.log(sum(math.exp(x) for x in neg)) if neg else -math.inf
        lse_p = math.log(sum(math.exp(x) for x in pos))
        x = lse_n + lse_p
        total += math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))
    return total / len(u_rows)


@pytest.mark.parametrize("n", [2, 6, 12])
@pytest.mark.parametrize("d", [4, 32])
@pytest.mark.parametrize("m,gamma", [(0.25, 16.0), (0.4, 80.0), (0.1, 1.0), (0.0, 32.0)])
def test_circle_pairs_match_loop(n, d, m, gamma):
    g = torch.Generator().manual_seed(n + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 2
    ours = circle_contrastive(z1, z2, m, gamma)
    u = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    pos = [(i + n) % (2 * n) for i in range(2 * n)]
    ref = circle_loop(u, u, pos, lambda i, j: i != j, m, gamma)
    assert ours.dtype == torch.float32
    # float32 against a float64 loop: relative (the loss grows with gamma like its logits);
    # measured: at most 0.2% of the tolerance on AVX2, scalar and SSE4.1 kernels.
    assert ours.item() == pytest.approx(ref, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("k", [0, 5, 40])
def test_circle_queue_matches_loop(k):
    g = torch.Generator().manual_seed(k)
    q, key = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    queue = F.normalize(torch.randn(k, 16, generator=g), dim=1)
    ours = circle_queue(q, key, queue, 0.25, 20.0)
    uq = F.normalize(q.double(), dim=1)
    uk = F.normalize(key.double(), dim=1)
    total = 0.0
    for i in range(8):
        cands = torch.cat([uk[i:i + 1], queue.double()])
        total += circle_loop(uq[i:i + 1], cands, [0], lambda a, b: True, 0.25, 20.0)
    assert ours.item() == pytest.approx(total / 8, rel=1e-4, abs=1e-5)


def test_alpha_is_detached():
    """The gradient equals the one computed with alpha passed in as constants."""
    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(6, 8, generator=g, requires_grad=True)
    z2 = torch.randn(6, 8, generator=g, requires_grad=True)
    m, gamma = 0.25, 24.0
    circle_contrastive(z1, z2, m, gamma).backward()
    grads = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    s = pairwise_similarities(z1, z2)
    const = torch.where(s.pos_mask(), 1 + m - s.sim, s.sim + m).clamp_min(0).detach().clone()
    F.cross_entropy(circle_logits(s, m, gamma, alpha=const), s.pos).backward()
    # Two float32 formulas of one gradient (hand-written, autograd): each entry sums over the
    # 12 candidates of its anchor, so a few roundings per candidate, relative to the largest
    # entry (~2 here). Measured: at most 1 eps * that entry on AVX2 and scalar kernels.
    torch.testing.assert_close(z1.grad, grads[0], **f32_close(grads[0], terms=12))
    torch.testing.assert_close(z2.grad, grads[1], **f32_close(grads[1], terms=12))
    # And alpha is not a constant of 1: letting it carry gradient would change the result,
    # by ~60% of the largest entry (1e5 times the tolerance above).
    z1.grad = z2.grad = None
    s = pairwise_similarities(z1, z2)
    live = torch.where(s.pos_mask(), 1 + m - s.sim, s.sim + m).clamp_min(0)
    F.cross_entropy(circle_logits(s, m, gamma, alpha=live), s.pos).backward()
    assert (z1.grad - grads[0]).abs().max() > 0.1 * grads[0].abs().max()


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_reduces_to_info_nce(t):
    """alpha = 1, Delta = 0, gamma = 1/T gives InfoNCE with the positive in the denominator."""
    g = torch.Generator().manual_seed(11)
    z1, z2 = torch.randn(10, 16, generator=g), torch.randn(10, 16, generator=g)
    s = pairwise_similarities(z1, z2)
    logits = circle_logits(s, 0.25, 1 / t, alpha=torch.ones_like(s.sim), deltas=(0.0, 0.0))
    circle = F.cross_entropy(logits, s.pos)
    # Two float32 formulas: a few ulps of the loss or of the largest logit (1/T), whichever
    # is larger (measured: at most 2 ulps of either, on AVX2, scalar and SSE4.1 kernels).
    assert circle.item() == pytest.approx(info_nce(z1, z2, t).item(), rel=8 * EPS32,
                                          abs=8 * EPS32 / t)


def test_non_pairs_masked_with_minus_inf_and_large_gamma_finite():
    z = torch.randn(4, 8)
    s = pairwise_similarities(z, z + 0.01)
    logits = circle_logits(s, 0.25, 256.0)
    assert torch.isinf(logits.diagonal()).all() and (logits.diagonal() < 0).all()
    assert torch.isfinite(circle_contrastive(z * 1e3, z, 0.25, 256.0))
    s_q = queue_similarities(z, z, torch.zeros(0, 8))
    assert s_q.sim.shape == (4, 1)
    with pytest.raises(ValueError):
        circle_contrastive(z, z, 1.5, 10.0)
    with pytest.raises(ValueError):
        circle_contrastive(z, z, 0.25, 0.0)


def _reference_total(s, t, w_nce, m, gamma, w_circle):
    """The same objective through plain autograd: cross_entropy of masked logits."""
    total = s.sim.new_zeros(())
    if w_nce > 0:
        total = total + w_nce * F.cross_entropy(s.masked(s.sim / t), s.pos)
    if w_circle > 0:
        total = total + w_circle * F.cross_entropy(circle_logits(s, m, gamma), s.pos)
    return total


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.7, 2.5)])
@pytest.mark.parametrize("form", ["pairs", "queue", "queue_partly_filled"])
@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_fused_objective_matches_autograd_reference(weights, form, upstream):
    """contrastive_losses computes the gradient in its forward pass; values and gradients
    must equal plain autograd through F.cross_entropy, for every weight combination, both
    candidate layouts, MoCo's masked (unfilled) queue slots and a non-unit upstream grad."""
    w_nce, w_circle = weights
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(6, 8, generator=g, requires_grad=True)
    z2 = torch.randn(6, 8, generator=g, requires_grad=True)

    def sims():
        if form == "pairs":
            return pairwise_similarities(z1, z2)
        queue = F.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(1)), dim=1)
        s = queue_similarities(z1, z2, queue)
        if form == "queue_partly_filled":
            s.valid = torch.tensor([True] * 7 + [False] * 4)[None, :]
        return s

    total, parts = contrastive_losses(sims(), 0.3, w_nce, (0.25, 16.0), w_circle)
    (total * upstream).backward()
    ours = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    ref = _reference_total(sims(), 0.3, w_nce, 0.25, 16.0, w_circle)
    (ref * upstream).backward()
    # Fused against autograd in float32: each term to a few ulps of its largest logit (1/T for
    # InfoNCE; gamma * alpha * |s - Delta| < 16 * 2 * 2 for Circle), weighted; each gradient
    # entry sums over up to 17 candidates, relative to the largest entry.
    logit_scale = w_nce / 0.3 + w_circle * 16.0 * 4
    assert total.item() == pytest.approx(ref.item(), abs=8 * EPS32 * logit_scale)
    assert set(parts) == {n for n, w in (("infonce", w_nce), ("circle", w_circle)) if w > 0}
    assert not any(p.requires_grad for p in parts.values())
    torch.testing.assert_close(ours[0], z1.grad, **f32_close(z1.grad, terms=17))
    torch.testing.assert_close(ours[1], z2.grad, **f32_close(z2.grad, terms=17))


def test_fused_infonce_gradcheck_float64():
    """Finite differences agree with the hand-written gradient. (InfoNCE only: the Circle
    term's gradient deliberately leaves out d alpha / d sim, so finite differences of its
    value cannot match it; the test above checks it against autograd with alpha detached.)"""
    sim = torch.empty(8, 8, dtype=torch.float64).uniform_(-1, 1).requires_grad_()
    pos = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])

    def f(x):
        return contrastive_losses(Similarities(x, pos, torch.arange(8)), 0.5, 0.8)[0]

    assert torch.autograd.gradcheck(f, (sim,))
    with torch.no_grad():  # no gradient buffer is needed, none is built
        assert torch.isfinite(f(sim))

"""Losses against loop implementations of the formulas, lightly, and analytic values."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import EPS32, f32_close
from lightly.loss import NTXentLoss

from ssl_sec.losses import info_nce, pairwise_similarities, sec_loss
from ssl_sec.objective import Objective
from ssl_sec.recipe import from_dict
from ssl_sec.schedules import sec_weight


def info_nce_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """The paper's formula, one anchor at a time, in float64."""
    u = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = u.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(math.exp(float(u[i] @ u[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(u[i] @ u[j]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("n", [2, 5, 16])
@pytest.mark.parametrize("d", [3, 32])
@pytest.mark.parametrize("t", [0.1, 0.2, 0.5, 1.0])
def test_info_nce_matches_loop_and_lightly(n, d, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1 = torch.randn(n, d, generator=g) * 3
    z2 = torch.randn(n, d, generator=g) * 0.5
    ours = info_nce(z1, z2, t)
    assert ours.dtype == torch.float32
    # float32 against float64 and lightly: ~100 ulps of the loss, logits up to 1/T = 10
    # (measured: 2% of the tolerance on AVX2, scalar and SSE4.1 kernels).
    assert ours.item() == pytest.approx(info_nce_loop(z1, z2, t), rel=1e-5, abs=1e-5)
    assert ours.item() == pytest.approx(NTXentLoss(temperature=t)(z1, z2).item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("n,t", [(4, 0.5), (8, 0.2), (64, 0.1)])
def test_info_nce_analytic_aligned_orthogonal(n, t):
    # z1 == z2, all other vectors orthogonal: log(2N-2 + e^{1/T}) - 1/T.
    z = torch.eye(n, 2 * n) * 7.0
    expected = math.log(2 * n - 2 + math.exp(1 / t)) - 1 / t
    # A float32 logsumexp of logits up to 1/T, minus 1/T: it cancels to 0.006 at n=64, T=0.1,
    # and carries the rounding of 1/T (ulp(10) = 1e-6), not of the small result.
    assert info_nce(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-5,
                                                             abs=8 * EPS32 / t)


def test_info_nce_random_high_dim_large_t():
    g = torch.Generator().manual_seed(0)
    n = 32
    z1, z2 = torch.randn(n, 4096, generator=g), torch.randn(n, 4096, generator=g)
    assert info_nce(z1, z2, 100.0).item() == pytest.approx(math.log(2 * n - 1), abs=1e-3)


def test_info_nce_bf16_inputs_float32_math_and_scale_invariance():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    ref = info_nce(z1, z2, 0.2)
    assert info_nce(z1 * 50, z2 * 0.01, 0.2).item() == pytest.approx(ref.item(), rel=1e-5)
    low = info_nce(z1.bfloat16(), z2.bfloat16(), 0.2)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), abs=0.05)
    with pytest.raises(ValueError):
        info_nce(z1, z2, 0.0)


def test_sec_loss_hand_computation():
    z = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])  # norms 5, 1, 10
    mu = (5 + 1 + 10) / 3
    expected = ((5 - mu) ** 2 + (1 - mu) ** 2 + (10 - mu) ** 2) / 3
    assert sec_loss(z).item() == pytest.approx(expected, rel=1e-6)
    assert sec_loss(z, mu=2.0).item() == pytest.approx((9 + 1 + 64) / 3, rel=1e-6)
    assert sec_loss(z, mu=torch.tensor(2.0)).item() == pytest.approx((9 + 1 + 64) / 3, rel=1e-6)


def test_sec_gradient_is_radial_and_matches_formula_float64():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    # float64 math: sec_loss casts to float32, so compare with a float64 reimplementation
    # for the formula and check sec_loss's own gradient against it at float32 precision.
    norms = z.norm(dim=1)
    mu = norms.detach().mean()
    (grad64,) = torch.autograd.grad(((norms - mu) ** 2).mean(), z)
    formula = (2 / 6) * (norms - mu).unsqueeze(1) * z / norms.unsqueeze(1)
    torch.testing.assert_close(grad64, formula.detach(), rtol=1e-12, atol=1e-12)
    z32 = z.detach().float().requires_grad_()
    sec_loss(z32).backward()
    # float32 rounding of norms summed from 5 coordinates and averaged over 6 rows, relative to
    # the largest entry (entries where ||z_i|| is near the mean cancel to near 0).
    torch.testing.assert_close(z32.grad.double(), grad64, **f32_close(grad64, terms=6))
    # Radial: the gradient is parallel to z_i (zero component orthogonal to it).
    u = F.normalize(z.detach(), dim=1)
    tangential = grad64 - (grad64 * u).sum(1, keepdim=True) * u
    assert tangential.abs().max() < 1e-12
    # mu is detached: gradcheck of the whole function in float64 through autograd.
    assert torch.autograd.gradcheck(
        lambda x: ((x.norm(dim=1) - x.norm(dim=1).detach().mean()) ** 2).mean(), (z,))


def test_sec_weight_ramps():
    assert sec_weight(0.1, "constant", 0.3) == 0.1
    assert sec_weight(0.1, "linear", 0.0) == 0.0
    assert sec_weight(0.1, "linear", 0.5) == pytest.approx(0.05)
    assert sec_weight(0.1, "linear", 1.0) == pytest.approx(0.1)


def _loss(**terms):
    """The recipe's loss section with these term sections, e.g. _loss(sec={"eta": 0.3})."""
    return from_dict({"loss": terms}).loss


def test_objective_combines_terms_and_ema_buffer():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    z = torch.cat([z1, z2])
    obj = Objective(_loss(infonce={"temperature": 0.5, "weight": 2.0},
                          sec={"eta": 0.3, "ramp": "linear"}))
    terms = obj(pairwise_similarities(z1, z2), z, z, progress=0.5)
    assert terms.losses["infonce"].item() == pytest.approx(info_nce(z1, z2, 0.5).item(), rel=1e-6)
    assert terms.losses["sec"].item() == pytest.approx(sec_loss(z).item(), rel=1e-6)
    expected = 2.0 * terms.losses["infonce"] + 0.15 * terms.losses["sec"]
    assert terms.losses["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    # eta = 0: the SEC term is not computed at all.
    plain = Objective(_loss(infonce={"temperature": 0.5}))(pairwise_similarities(z1, z2), z, z, 0.5)
    assert "sec" not in plain.losses
    # EMA mu: starts at the first batch mean, then (1-rho) mu + rho mean; stored in a buffer.
    ema = Objective(_loss(sec={"eta": 1.0, "mu": "ema", "momentum": 0.25}))
    m1 = z.norm(dim=1).mean()
    ema(pairwise_similarities(z1, z2), z, z, 0.0)
    assert ema.terms["sec"].mu.item() == pytest.approx(m1.item(), rel=1e-6)
    z_b = z * 2
    out = ema(pairwise_similarities(z1 * 2, z2 * 2), z_b, z_b, 0.0)
    mu2 = 0.75 * m1 + 0.25 * z_b.norm(dim=1).mean()
    assert ema.terms["sec"].mu.item() == pytest.approx(mu2.item(), rel=1e-6)
    assert out.losses["sec"].item() == pytest.approx(sec_loss(z_b, mu2).item(), rel=1e-5)
    assert "terms.sec.mu" in ema.state_dict()


def test_diagnostics_values():
    # Perfect alignment with orthogonal negatives: pos sim 1, neg sim 0, top-1 100%.
    z = torch.eye(4, 8)
    zz = torch.cat([z, z])
    d = Objective(_loss())(pairwise_similarities(z, z.clone()), zz, zz, 0.0).diagnostics
    assert d["pos_sim"].item() == pytest.approx(1.0)
    assert d["neg_sim"].item() == pytest.approx(0.0)
    assert d["contrastive_top1"].item() == pytest.approx(100.0)
    assert d["norm_cv"].item() == pytest.approx(0.0, abs=1e-6)


def test_the_documented_info_nce_is_what_training_computes():
    """README: `info_nce(z1, z2, T)` is the value and gradient SimCLR's objective trains on."""
    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    documented = info_nce(a1, a2, 0.3)
    documented.backward()
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    z = torch.cat([b1, b2])
    terms = Objective(_loss(infonce={"temperature": 0.3}))(pairwise_similarities(b1, b2), z, z,
                                                           0.0, diagnostics=False)
    terms.losses["total"].backward()
    assert torch.equal(terms.losses["infonce"], documented.detach())
    assert torch.equal(a1.grad, b1.grad) and torch.equal(a2.grad, b2.grad)

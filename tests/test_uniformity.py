"""The uniformity term (Wang & Isola 2020) against a float64 loop over the pairs, and inside
the objective beside SEC."""

import math

import pytest
import torch
from helpers import f32_close

from ssl_sec.losses import pairwise_similarities
from ssl_sec.objective import Objective
from ssl_sec.recipe import from_dict
from ssl_sec.terms.uniformity import uniformity_loss


def loop_uniformity(z: torch.Tensor, t: float) -> torch.Tensor:
    """log( 1/P sum_{i<j} exp(-t ||u_i - u_j||^2) ), one pair at a time, in float64."""
    u = z.double() / z.double().norm(dim=1, keepdim=True)
    total, pairs = u.new_zeros(()), 0
    for i in range(u.shape[0]):
        for j in range(i + 1, u.shape[0]):
            total = total + torch.exp(-t * ((u[i] - u[j]) ** 2).sum())
            pairs += 1
    return torch.log(total / pairs)


@pytest.mark.parametrize("t", [0.5, 2.0, 10.0])
def test_value_and_gradient_equal_a_float64_loop(t):
    z = torch.randn(12, 5, generator=torch.Generator().manual_seed(3)) * 3
    ours = z.clone().requires_grad_()
    value = uniformity_loss(ours, t)
    value.backward()
    ref_z = z.double().requires_grad_()
    ref = loop_uniformity(ref_z, t)
    ref.backward()
    torch.testing.assert_close(value.double(), ref.detach(), **f32_close(ref, terms=12))
    torch.testing.assert_close(ours.grad.double(), ref_z.grad, **f32_close(ref_z.grad, terms=12))


def test_collapse_is_the_maximum_and_spread_is_lower():
    collapsed = torch.ones(6, 3)
    assert uniformity_loss(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    # The 6 vertices of an octahedron: pair distances 2 (12 pairs) and 4 (3 pairs).
    spread = torch.cat([torch.eye(3), -torch.eye(3)])
    expected = math.log((12 * math.exp(-2 * 2) + 3 * math.exp(-2 * 4)) / 15)
    assert uniformity_loss(spread).item() == pytest.approx(expected, rel=1e-6)


def test_in_the_objective_with_its_own_section():
    cfg = from_dict({}, ["loss.uniformity.weight=0.5", "loss.uniformity.t=2.0",
                         "loss.sec.eta=0.25"])
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    z, h = torch.cat([z1, z2]), torch.randn(16, 32, generator=g)
    terms = Objective(cfg.loss)(pairwise_similarities(z1, z2), z, h, 0.5)
    assert list(terms.losses) == ["infonce", "sec", "uniformity", "total"]
    torch.testing.assert_close(terms.losses["uniformity"], uniformity_loss(z, 2.0))
    total = terms.losses["infonce"] + 0.25 * terms.losses["sec"] + 0.5 * terms.losses["uniformity"]
    torch.testing.assert_close(terms.losses["total"].detach(), total, **f32_close(total, terms=4))
    # On the backbone's features when asked; off (not computed) at weight 0.
    on_h = Objective(from_dict({}, ["loss.uniformity.weight=1", "loss.uniformity.features="
                                    "backbone"]).loss)(pairwise_similarities(z1, z2), z, h, 0.5)
    torch.testing.assert_close(on_h.losses["uniformity"], uniformity_loss(h))
    off = Objective(from_dict({}).loss)(pairwise_similarities(z1, z2), z, h, 0.5)
    assert "uniformity" not in off.losses


def test_its_options_are_checked():
    with pytest.raises(Exception, match=r"loss.uniformity.t=0.0 is out of range"):
        from_dict({}, ["loss.uniformity.t=0"])
    with pytest.raises(Exception, match=r"loss.uniformity.weight=-1.0 is out of range"):
        from_dict({}, ["loss.uniformity.weight=-1"])

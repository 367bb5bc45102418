"""MoCo v3: the loss against a loop over the paper's pseudocode, the momentum encoder and its
cosine schedule, the heads, a real training run with resume, and SEC on its queries."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL, f32_close

from ssl_sec.engine import train
from ssl_sec.methods import METHODS
from ssl_sec.methods.mocov3 import MoCoV3
from ssl_sec.recipe import from_dict, load_recipe

TINY = ["method=mocov3", "model.cifar_stem=false", "model.proj_hidden_dim=32",
        "model.proj_output_dim=8", "mocov3.pred_hidden_dim=16", "optim.batch_size=8"]


def tiny(*extra: str) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(from_dict({}, TINY + list(extra)))


def views(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)


def paper_loss(q1, q2, k1, k2, t: float) -> torch.Tensor:
    """The moco-v3 paper's Algorithm 1, one anchor at a time:
    ctr(q, k) = CE(q k^T / T, labels = the diagonal) * 2T; loss = ctr(q1, k2) + ctr(q2, k1)."""

    def ctr(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        total = q.new_zeros(())
        for i in range(q.shape[0]):
            logits = torch.stack([q[i] @ k[j] for j in range(k.shape[0])]) / t
            total = total - (logits[i] - torch.logsumexp(logits, dim=0))
        return total / q.shape[0] * 2 * t

    return ctr(q1, k2) + ctr(q2, k1)


def test_loss_and_gradient_equal_the_papers_up_to_its_constant():
    model = tiny("loss.infonce.temperature=0.2")
    v1, v2 = views()
    # The model's own queries and keys, so the same numbers enter both computations.
    z1, z2 = model.encoder(v1)[1], model.encoder(v2)[1]
    q1 = model.predictor(z1).detach().double().requires_grad_()
    q2 = model.predictor(z2).detach().double().requires_grad_()
    with torch.no_grad():
        k1, k2 = model.momentum_encoder(v1)[1].double(), model.momentum_encoder(v2)[1].double()
    reference = paper_loss(q1, q2, k1, k2, 0.2)
    ref_grad = torch.autograd.grad(reference, [q1, q2])
    ours = model(v1, v2, 0.0).losses
    # ssl_sec's InfoNCE is the mean over both directions' anchors: the paper's / (4 T).
    torch.testing.assert_close(torch.tensor(4 * 0.2 * ours["infonce"].item(), dtype=torch.float64),
                               reference.detach(), **f32_close(reference, terms=16))
    a, b = q1.detach().float().requires_grad_(), q2.detach().float().requires_grad_()
    from ssl_sec.losses import info_nce_from
    from ssl_sec.methods.mocov3 import key_similarities

    loss = 4 * 0.2 * info_nce_from(key_similarities(a, b, k1.float(), k2.float()), 0.2)
    grads = torch.autograd.grad(loss, [a, b])
    for g, r in zip(grads, ref_grad, strict=True):
        torch.testing.assert_close(g.double(), r, **f32_close(r, terms=16))


def test_heads_follow_the_paper():
    model = tiny()
    proj = [m for m in model.encoder.projector.modules() if not list(m.children())]
    pred = [m for m in model.predictor.modules() if not list(m.children())]
    # Projector: Linear-BN-ReLU-Linear-BN(no affine); predictor: Linear-BN-ReLU-Linear.
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear",
                                                "BatchNorm1d"]
    assert proj[-1].affine is False
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in pred + proj if isinstance(m, torch.nn.Linear))
    # The momentum twin holds the encoder (backbone + projector), not the predictor.
    assert sum(p.numel() for p in model.momentum_encoder.parameters()) == \
        sum(p.numel() for p in model.encoder.parameters())
    assert all(not p.requires_grad for p in model.momentum_encoder.parameters())


def test_momentum_encoder_moves_by_the_cosine_schedule_after_the_step():
    model = tiny("mocov3.momentum=0.9", "mocov3.momentum_schedule=cosine")
    opt = torch.optim.SGD([*model.encoder.parameters(), *model.predictor.parameters()], lr=0.5)
    before_k = [p.clone() for p in model.momentum_encoder.parameters()]
    model(*views(), 0.5).losses["total"].backward()
    # No gradient reaches the momentum encoder; the step moves the query encoder only.
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    opt.step()
    after_q = [p.detach().clone() for p in model.encoder.parameters()]
    model.after_step(0.5)
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 0.5) + 1) / 2
    for k0, q, k in zip(before_k, after_q, model.momentum_encoder.parameters(), strict=True):
        torch.testing.assert_close(k, m * k0 + (1 - m) * q, **f32_close(k0, terms=2))
    # At the end of the run the momentum is 1: the keys stop moving.
    frozen = [p.clone() for p in model.momentum_encoder.parameters()]
    model.after_step(1.0)
    for a, b in zip(frozen, model.momentum_encoder.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sec_constrains_the_queries():
    model = tiny("loss.sec.eta=0.5")
    terms = model(*views(), 1.0)
    assert "sec" in terms.losses and torch.isfinite(terms.losses["sec"])
    total = terms.losses["infonce"] + 0.5 * terms.losses["sec"]
    torch.testing.assert_close(terms.losses["total"].detach(), total,
                               **f32_close(total, terms=4))
    assert terms.norms.shape == (16,)  # the norms of both views' queries


def test_registered_with_its_own_recipe_section():
    assert METHODS["mocov3"] is MoCoV3
    cfg = load_recipe("recipes/cifar10/mocov3.yaml")
    assert cfg.method == "mocov3" and cfg.mocov3.momentum_schedule == "cosine"
    with pytest.raises(Exception, match="mocov3.momentum=1.5 is out of range"):
        from_dict({}, ["method=mocov3", "mocov3.momentum=1.5"])


def test_trains_and_resumes_bit_exactly(tmp_path):
    common = [*SMALL, "method=mocov3", "model.proj_hidden_dim=64", "mocov3.pred_hidden_dim=64",
              "optim.epochs=2", f"out_dir={tmp_path}"]
    whole = train(from_dict({}, [*common, "name=whole"]), progress_bar=False)
    train(from_dict({}, [*common, "name=split"]), progress_bar=False, max_epochs=1)
    split = train(from_dict({}, [*common, "name=split"]), resume=True, progress_bar=False)
    assert 0 < whole["top1"] <= 100
    assert whole["top1"] == split["top1"]
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and any(k.startswith("predictor.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key

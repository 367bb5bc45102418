"""Two gloo processes with B/2 each give the loss and gradients of one process with B
(docs/methods.md section 7): InfoNCE over gathered views, SEC with the global mean norm, the
Circle term, and MoCo's key enqueueing. BN-free model, fixed inputs."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import DEADLINE_S, queue_keys
from torch import nn

from ssl_sec.losses import pairwise_similarities
from ssl_sec.methods import METHODS
from ssl_sec.objective import Objective
from ssl_sec.recipe import from_dict

N, D_IN, D = 8, 12, 6
LOSS = from_dict({"loss": {"infonce": {"temperature": 0.3, "weight": 1.0},
                           "circle": {"weight": 0.5, "margin": 0.25, "gamma": 8.0},
                           "sec": {"eta": 0.2}}}).loss


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Linear(16, D))


def _loss_and_grads(model, x1, x2):
    z1, z2 = model(x1), model(x2)
    z = torch.cat([z1, z2])
    terms = Objective(LOSS)(pairwise_similarities(z1, z2), z, z, 1.0, diagnostics=False)
    model.zero_grad()
    terms.losses["total"].backward()
    return terms.losses, [p.grad.clone() for p in model.parameters()]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    x1, x2 = _data()
    n = N // world
    part = slice(rank * n, (rank + 1) * n)
    model = _model()
    losses, grads = _loss_and_grads(model, x1[part], x2[part])
    # What DDP does with the gradients: average over ranks.
    for g in grads:
        dist.all_reduce(g)
        g /= world
    values = {k: v.detach().clone() for k, v in losses.items()}
    for v in values.values():
        dist.all_reduce(v)
        v /= world
    # MoCo: every rank enqueues the keys of every rank.
    from ssl_sec.methods import MoCo

    torch.manual_seed(0)
    moco = MoCo(from_dict({}, ["method=moco", "model.cifar_stem=false", "moco.queue_size=16",
                               "model.proj_output_dim=4", "model.proj_hidden_dim=8",
                               "moco.bn_remedy=none", "optim.batch_size=4"]))
    keys = torch.nn.functional.normalize(torch.arange(4 * 4, dtype=torch.float32).view(4, 4)
                                         + 100 * rank, dim=1)
    from ssl_sec.distributed import gather

    moco.enqueue(gather(keys))
    torch.save({"losses": values, "grads": grads, "queue": queue_keys(moco)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x1, x2 = _data()
    ref_losses, ref_grads = _loss_and_grads(_model(), x1, x2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key in ("infonce", "circle", "sec", "total"):
            torch.testing.assert_close(got["losses"][key], ref_losses[key].detach(),
                                       rtol=1e-5, atol=1e-6, msg=key)
        for g, ref in zip(got["grads"], ref_grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
        assert got["queue"].shape == (8, 4)
    q0 = torch.load(tmp_path / "rank0.pt", weights_only=True)["queue"]
    q1 = torch.load(tmp_path / "rank1.pt", weights_only=True)["queue"]
    torch.testing.assert_close(q0, q1, rtol=0, atol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_torchrun_two_cpu_processes_train_end_to_end(tmp_path, data_root, method):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "ssl_sec", "pretrain",
           str(root / "recipes" / "quickstart.yaml"), f"method={method}",
           "data.train_subset=256", "data.test_subset=100", "optim.batch_size=64",
           "optim.epochs=2", "moco.queue_size=128", "eval.knn_k=10", "model.proj_hidden_dim=64",
           f"out_dir={tmp_path}", "name=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith('{"run_dir"')]
    assert len(results) == 1  # only rank 0 reports
    from ssl_sec.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ckpt["step"] == 8 and len(ckpt["rng"]) == 2
    if method == "moco":
        assert int(ckpt["model"]["queue_len"]) == 128

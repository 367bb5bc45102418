"""Process-group helpers that all work at world size 1 (no process group at all).

`torchrun --nproc_per_node=G -m ssl_sec pretrain RECIPE` sets RANK / WORLD_SIZE / LOCAL_RANK;
`init()` then starts NCCL (GPU) or gloo (CPU) and pins this process to its GPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Start the process group when launched by torchrun; return this process's device
    (`device` itself, or this rank's GPU when several processes share the CUDA devices)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and is_dist():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def barrier() -> None:
    if is_dist():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradient.

    Every rank's loss depends on every rank's embeddings, so the gradient w.r.t. the local
    slice is the sum over ranks of each rank's gradient w.r.t. that slice: all_reduce(sum),
    then slice. (Returning only the local rank's gradient, or dividing by the world size, is
    the field's classic bug.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        return gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = rank()
        return grad[r * ctx.n:(r + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (N, ...) from all ranks in rank order, keeping the gradient path.
    Shape (world * N, ...); the identity at world size 1."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """all_gather without gradient (MoCo keys, kNN banks). Shape (world * N, ...)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (a new tensor); `x` itself at world size 1."""
    if world_size() == 1:
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def gather_objects(obj):
    """A list with every rank's `obj` (rank order) on all ranks; [obj] at world size 1."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank; `obj` itself at world size 1."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on any rank (a MAX all-reduce); `flags` itself at world size 1.
    The tensor lives on `device` because NCCL reduces only GPU tensors."""
    if world_size() == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]

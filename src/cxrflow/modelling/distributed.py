"""Where a training process stands among its peers: rank, world size, device, and the collectives
training needs (a barrier, a sum or max over ranks).

A process started alone is a world of one and every collective is a no-op; ``torchrun`` and Spark's
TorchDistributor describe the world in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cxrflow.modelling.inference import resolve_device


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_choice: str) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any."""
    device = resolve_device(device_choice)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, device=device)


def leave_distributed(ctx: Dist) -> None:
    """Leave the process group :func:`setup_distributed` joined."""
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Dist) -> None:
    """Wait for every rank (no-op alone)."""
    if ctx.active:
        dist.barrier()


def all_reduce(values: list[float], ctx: Dist, op=None) -> list[float]:
    """``values`` summed (or reduced by ``op``) over the ranks; the values themselves alone."""
    if not ctx.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, ctx: Dist) -> bool:
    """Whether ``flag`` is true on any rank."""
    return all_reduce([float(flag)], ctx, dist.ReduceOp.MAX)[0] > 0 if ctx.active else flag


def min_over_ranks(value: int, ctx: Dist) -> int:
    """The smallest ``value`` of all ranks."""
    return int(all_reduce([float(value)], ctx, dist.ReduceOp.MIN)[0]) if ctx.active else value


def broadcast_buffers(model: torch.nn.Module, ctx: Dist) -> None:
    """Rank 0's buffers (BatchNorm statistics: the saved model's) on every rank."""
    if ctx.active:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def wrap(model: torch.nn.Module, ctx: Dist) -> torch.nn.Module:
    """The model for training: DistributedDataParallel over the ranks, itself alone."""
    if not ctx.active:
        return model
    devices = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=devices)

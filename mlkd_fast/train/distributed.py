"""DDP plumbing for ``torchrun``: process group, rank info, metric reduction, gathering with gradient.

Under ``torchrun --nproc_per_node N -m mlkd_fast.train ...`` every process trains its shard of each
global batch (``--batch-size`` is per process, the global batch is ``batch_size * N``); NCCL on
GPUs, gloo on CPU. Only the student and the loss heads are wrapped in DDP; the teacher is a
frozen copy on every rank.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank)


def shutdown_distributed(wait_for_all: bool = False) -> None:
    """Tears down the process group. ``wait_for_all`` meets the other ranks first, so that none
    destroys its group while another still uses it (an abort at exit otherwise); only where every rank
    is sure to arrive (a run that ended normally), since a barrier nobody else reaches hangs.

    Drop the references to DDP modules and to outputs of :func:`gather_with_grad` first: they hold the
    process group, some inside reference cycles (collected here). One still alive at interpreter exit
    can make gloo abort the process ("terminate called without an active exception") after a run that
    succeeded."""
    if dist.is_initialized():
        gc.collect()
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def sum_across(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (a copy of the input when not distributed)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, this rank's first, then the others in rank order
    (the order ``MLKDLoss(correlation_gather=...)`` needs). Differentiable: the gradient of each
    rank's slice is summed over the ranks' losses, which DDP's gradient averaging turns back into
    the gradient of one global loss. Every rank must pass the same shape."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    try:  # where the deprecation warning of torch.distributed.nn.functional.all_gather points
        from torch.distributed._functional_collectives import all_gather_single_autograd
    except ImportError:  # pragma: no cover - older torch
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(x.contiguous())
    else:
        parts = all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD).chunk(world)
    return torch.cat([parts[rank], *parts[:rank], *parts[rank + 1:]])

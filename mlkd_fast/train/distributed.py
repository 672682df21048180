"""DDP plumbing for ``torchrun``: process group, rank info, metric reduction, gathering with gradient,
BatchNorm statistics across ranks (buffer broadcast, ``--sync-bn``).

Under ``torchrun --nproc_per_node N -m mlkd_fast.train ...`` every process trains its shard of each
global batch (``--batch-size`` is per process, the global batch is ``batch_size * N``); NCCL on
GPUs, gloo on CPU. Only the student and the loss heads are wrapped in DDP; the teacher is a
frozen copy on every rank.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


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


def _gather_in_rank_order(x: Tensor) -> list[Tensor]:
    """Every rank's ``x`` (same shape on all ranks), in rank order. Floating-point tensors keep their
    gradient: the backward pass sums each slice's gradient over the ranks."""
    world = dist.get_world_size()
    if not x.is_floating_point():  # labels and indices: nothing to differentiate
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return parts
    try:  # where the deprecation warning of torch.distributed.nn.functional.all_gather points
        from torch.distributed._functional_collectives import all_gather_single_autograd
    except ImportError:  # pragma: no cover - older torch
        from torch.distributed.nn.functional import all_gather

        return list(all_gather(x.contiguous()))
    return list(all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD).chunk(world))


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, this rank's first, then the others in rank order
    (the order ``MLKDLoss(correlation_gather=..., supcon_gather=...)`` needs). Differentiable: the
    gradient of each rank's slice is summed over the ranks' losses, which DDP's gradient averaging
    turns back into the gradient of one global loss. Every rank must pass the same shape. Integer
    tensors (labels) are gathered the same way, without gradient."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    rank = dist.get_rank()
    parts = _gather_in_rank_order(x)
    return torch.cat([parts[rank], *parts[:rank], *parts[rank + 1:]])


def broadcast_buffers(*modules: Optional[nn.Module], src: int = 0) -> None:
    """Copies rank ``src``'s buffers (BatchNorm running statistics) into every rank's modules.

    DDP broadcasts rank 0's buffers at the start of each training forward, after which every rank
    updates its own copy from its own shard, so after the last step the ranks' statistics differ.
    Call this before evaluating: every rank then scores the same model, the one rank 0 saves."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for module in modules:
        if module is not None:
            for buf in module.buffers():
                dist.broadcast(buf, src)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks' shards), for
    the devices torch's ``SyncBatchNorm`` refuses (it needs a GPU): each rank's per-channel count,
    mean and variance are all-gathered with gradient and combined. In eval mode, or without a
    process group, it is a plain BatchNorm; its state dict is a BatchNorm's."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        x = input.to(dtype)
        dims = [0, *range(2, x.dim())]
        count = x.new_full((1,), x.numel() // c)
        local = torch.cat([count, x.mean(dims), x.var(dims, unbiased=False)])
        stats = torch.stack(_gather_in_rank_order(local))  # (world, 1 + 2C), the same on every rank
        counts, means, variances = stats[:, :1], stats[:, 1:1 + c], stats[:, 1 + c:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / n  # biased, as BatchNorm normalises
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm in ``module`` computing global-batch statistics under DDP: torch's
    ``SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere. Parameters and buffers are
    kept (the same tensors), so do this before building the optimiser."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        if module.affine:
            bn.weight, bn.bias = module.weight, module.bias
        if module.track_running_stats:
            bn.running_mean, bn.running_var = module.running_mean, module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
        return bn.train(module.training)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, device_type)
        if converted is not child:
            setattr(module, name, converted)
    return module

"""Where a command computes: the device, the process group, the precision and the memory layout.

Shared by ``mlkd-train`` (:class:`.run.Run`) and the teacher-cache writer, which both run networks
on the same device with the same precision, so that a cache's teacher outputs are the ones a live
teacher would give the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .distributed import DistInfo, init_distributed

__all__ = ["Placement", "place", "frozen"]


@dataclass(frozen=True)
class Placement:
    """The device (this process's GPU under torchrun), the process group, the autocast dtype (None:
    fp32) and whether activations are channels-last."""

    device: torch.device
    dist: DistInfo
    amp_dtype: Optional[torch.dtype]
    channels_last: bool


def _device(device: str) -> torch.device:
    """``--device``: cuda refused without a GPU (one line, exit status 2); auto takes one when present."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mlkd-train: --device cuda but no CUDA GPU is visible")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def place(device: str, precision: str, channels_last: str, channels_last_pays: bool) -> Placement:
    """The placement of ``--device``, ``--precision`` and ``--channels-last`` (the process group
    joined under torchrun). auto means bf16 and, where the data's models gain from it
    (``channels_last_pays``: 3-channel images), channels-last on CUDA; fp32 and NCHW on CPU."""
    where = _device(device)
    dist = init_distributed(where.type)
    if where.type == "cuda":
        where = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
    on_cuda = where.type == "cuda"
    amp_dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and on_cuda) else None
    nhwc = channels_last == "on" or (channels_last == "auto" and on_cuda and channels_last_pays)
    return Placement(where, dist, amp_dtype, nhwc)


def frozen(teacher: nn.Module, placement: Placement, compile: bool = False) -> nn.Module:
    """A teacher ready to give outputs: on the device, in eval mode, without gradients, in the run's
    precision (bf16 weights on CUDA) and layout, compiled with ``--compile``."""
    teacher = teacher.to(placement.device).eval().requires_grad_(False)
    if placement.amp_dtype is not None and placement.device.type == "cuda":
        teacher = teacher.to(placement.amp_dtype)
    if placement.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return torch.compile(teacher) if compile else teacher

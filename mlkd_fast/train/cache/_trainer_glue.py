"""The cache writer's one way into the trainer: :mod:`..loop` and the run's policies (:mod:`..run`).

No other module of the cache package imports the trainer (``cli``, ``run``, ``loop``); the writer reads
what it needs through the names below, so that the trainer can change shape behind them. Its command
line comes from the flags it shares with ``mlkd-train`` (:mod:`..flags`) and its training data from
the trainer's public loader (:func:`..training_data.load_training_data`), as the run's does. What is
still borrowed here, and the public name that would let this module shrink to a re-export:

- the run's device policy (:func:`device_setup`: device, process group, autocast dtype, channels-last)
  and teacher freezing (:func:`frozen_teacher`), mirrored from ``run.Run.__init__`` and ``Run.frozen``
  because run.py keeps them inside the class: wanted as ``run.device_setup(settings)`` and
  ``run.frozen_teacher(model, device, amp_dtype, channels_last, compile)``;
- :class:`..loop.StopFlag` (SIGINT / SIGTERM) and :func:`..loop.evaluate` with
  :class:`..loop.RunContext` (the teacher's accuracy), public already.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Optional

import torch
from torch import nn

from .. import data as D
from ..distributed import init_distributed
from ..errors import InputError
from ..loop import RunContext, StopFlag, evaluate  # noqa: F401 - StopFlag re-exported
from ..models import build_model
from ..training_data import data_kind, load_training_data
from .inputs import CacheData, WriterSetup

__all__ = ["StopFlag", "device_setup", "frozen_teacher", "writer_setup"]


def device_setup(args: Any) -> tuple[torch.device, Any, Optional[torch.dtype], bool]:
    """``(device, process group, autocast dtype, channels-last)`` of ``--device``, ``--precision`` and
    ``--channels-last``: mlkd-train's policy (``run.Run.__init__``), so that a cache's teacher runs as
    a live teacher in training does (bf16 and NHWC on CUDA under ``auto``)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mlkd-train: --device cuda but no CUDA GPU is visible")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dist = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
    on_cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and on_cuda) else None
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and on_cuda
                                                   and data_kind(args.data).channels_last_pays)
    return device, dist, amp_dtype, channels_last


def frozen_teacher(model: nn.Module, device: torch.device, amp_dtype: Optional[torch.dtype], channels_last: bool,
                   compile: bool) -> nn.Module:
    """A teacher as training runs one (``run.Run.frozen``): on the device, in eval mode without
    gradients, in bf16 on CUDA under bf16 autocast, NHWC where asked, compiled with ``--compile``."""
    model = model.to(device).eval().requires_grad_(False)
    if amp_dtype is not None and device.type == "cuda":
        model = model.to(amp_dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


def writer_setup(args: argparse.Namespace) -> WriterSetup:
    """The training data, device, process group and teacher loader of ``mlkd-cache``'s arguments."""
    device, dist, amp_dtype, channels_last = device_setup(args)
    training = load_training_data(args, D.Shard(args.batch_size, dist.rank, dist.world), device, channels_last)
    if training.train_size is None:  # pragma: no cover - synthetic data is refused by the flags
        raise InputError("--data synthetic has no samples to cache")
    data = CacheData.of(training, args)

    def load_teacher(path: str) -> nn.Module:
        model = build_model(args.teacher_arch, data.num_classes, path, in_channels=data.input_shape[0])
        return frozen_teacher(model, device, amp_dtype, channels_last, args.compile)

    def teacher_accuracy(teacher: nn.Module) -> tuple[float, float]:
        ctx = RunContext(device, dist, amp_dtype, "", lambda record: None, StopFlag())
        top1, top5 = evaluate(teacher, data.eval_batches(), ctx)
        return top1, (math.nan if top5 is None else top5)

    return WriterSetup(data, device, dist, amp_dtype, load_teacher,
                       teacher_accuracy if data.eval_batches is not None else None)

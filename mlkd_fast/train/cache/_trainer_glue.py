"""The cache writer's one way into the trainer: the run's placement and :mod:`..loop`'s evaluation.

No other module of the cache package imports the trainer (``cli``, ``run``, ``loop``); the writer reads
what it needs through the names below, so that the trainer can change shape behind them. Its command
line comes from the flags it shares with ``mlkd-train`` (:mod:`..flags`), its training data from the
trainer's public loader (:func:`..training_data.load_training_data`), and its device, precision and
layout from the policy the run uses (:func:`..placement.place`, :func:`..placement.frozen`), so that a
cache's teacher runs as a live teacher in training does (bf16 and NHWC on CUDA under ``auto``). The
teacher's accuracy is :func:`..loop.evaluate`'s, and Ctrl-C is :class:`..loop.StopFlag`'s.
"""
from __future__ import annotations

import argparse
import math

from torch import nn

from .. import data as D
from ..errors import InputError
from ..loop import RunContext, StopFlag, evaluate  # noqa: F401 - StopFlag re-exported
from ..models import build_model
from ..placement import frozen, place
from ..training_data import data_kind, load_training_data
from .inputs import CacheData, WriterSetup

__all__ = ["StopFlag", "writer_setup"]


def writer_setup(args: argparse.Namespace) -> WriterSetup:
    """The training data, device, process group and teacher loader of ``mlkd-cache``'s arguments."""
    placement = place(args.device, args.precision, args.channels_last, data_kind(args.data).channels_last_pays)
    device, dist, amp_dtype = placement.device, placement.dist, placement.amp_dtype
    training = load_training_data(args, D.Shard(args.batch_size, dist.rank, dist.world), device,
                                  placement.channels_last)
    if training.train_size is None:  # pragma: no cover - synthetic data is refused by the flags
        raise InputError("--data synthetic has no samples to cache")
    data = CacheData.of(training, args)

    def load_teacher(path: str) -> nn.Module:
        model = build_model(args.teacher_arch, data.num_classes, path, in_channels=data.input_shape[0])
        return frozen(model, placement, args.compile)

    def teacher_accuracy(teacher: nn.Module) -> tuple[float, float]:
        ctx = RunContext(device, dist, amp_dtype, "", lambda record: None, StopFlag())
        top1, top5 = evaluate(teacher, data.eval_batches(), ctx)
        return top1, (math.nan if top5 is None else top5)

    return WriterSetup(data, device, dist, amp_dtype, load_teacher,
                       teacher_accuracy if data.eval_batches is not None else None)

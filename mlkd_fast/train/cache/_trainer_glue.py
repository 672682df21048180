"""The cache writer's one way into the trainer (:mod:`..cli`, :mod:`..run`, :mod:`..loop`).

No other module of the cache package imports those three; the writer reads what it needs through
the names below, so that the trainer can change shape behind them. What each still borrows, and the
public name that would let this module shrink to a re-export:

- the flag builders and checks ``mlkd-train`` shares with ``mlkd-cache`` (:mod:`..cli`): ``_Parser``
  (private: one-line errors, exit status 2) is the only private one;
- the run's device, process group, precision and data: built today by a :class:`..run.Run` given a
  copy of the cache's arguments with the training-only flags ``Run`` reads set to values that change
  nothing (:data:`_TRAINING_ONLY`; the writer's own arguments never carry them). A data loader of
  the training data (``training_data.load_training_data``) and a device setup function in the
  trainer replace it;
- the teacher loader (``Run.load_teacher``: the architecture and weights, frozen on the device,
  bf16 / channels-last / compiled as the run's);
- :class:`..loop.StopFlag` (SIGINT / SIGTERM) and :func:`..loop.evaluate` (the teacher's accuracy).
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from torch import nn

from ..cli import DEFAULTS, add_data_arguments, add_device_arguments, add_teacher_arguments, add_version_argument
from ..cli import _Parser as Parser  # noqa: F401 - re-exported: one-line errors, exit status 2
from ..cli import check_data_args, default_teacher_arch  # noqa: F401 - re-exported
from ..loop import RunContext, StopFlag, evaluate  # noqa: F401 - StopFlag re-exported
from ..run import Run
from .inputs import CacheData, WriterSetup

__all__ = ["DEFAULTS", "Parser", "StopFlag", "add_data_arguments", "add_device_arguments", "add_teacher_arguments",
           "add_version_argument", "check_data_args", "default_teacher_arch", "writer_setup"]

# The flags of mlkd-train that Run reads and a cache has no use for, at values that change nothing
# (no learning rate, one process's BatchNorm, no cache to read): on Run's copy of the arguments only.
_TRAINING_ONLY: dict[str, Any] = dict(lr=0.0, scale_lr=False, sync_bn=False, teacher_new_head=False,
                                      teacher_cache=None)


def writer_setup(args: argparse.Namespace) -> WriterSetup:
    """The training data, device, process group and teacher loader of ``mlkd-cache``'s arguments."""
    run = Run(argparse.Namespace(**{**_TRAINING_ONLY, **vars(args)}))
    if run.train_size is None:  # pragma: no cover - synthetic data is refused by the flags
        from ..errors import InputError

        raise InputError("--data synthetic has no samples to cache")

    def teacher_accuracy(teacher: nn.Module) -> tuple[float, float]:
        ctx = RunContext(run.device, run.dist, run.amp_dtype, "", lambda record: None, StopFlag())
        top1, top5 = evaluate(teacher, run.eval_batches(), ctx)
        return top1, (math.nan if top5 is None else top5)

    data = CacheData.of_run(run)
    return WriterSetup(data, run.device, run.dist, run.amp_dtype, run.load_teacher,
                       teacher_accuracy if run.eval_batches is not None else None)

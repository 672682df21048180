"""The student's method built with its options before a teacher phase trains.

A run that trains its teacher first (digits, mnist5k, ``--teacher-epochs N``) builds the student's
phase only when the teacher has finished. Without this check a bad ``--method-opt`` (``temperature=-1``)
or an option the data cannot serve surfaced after the teacher phase (30 epochs on digits) and after
the run folder had been written; :func:`check_student_method` builds the method exactly as the
student phase will, on throwaway networks, before anything is written or trained.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
from torch import nn

from .. import methods as M
from .errors import InputError
from .models import build_model
from .teacher_source import CACHE

__all__ = ["check_student_method"]


class Run(Protocol):
    """What the check reads of :class:`.run.Run` (not imported: run imports this module)."""

    config: Any                        # the run's TrainConfig
    device: torch.device
    cache: Any
    num_classes: int

    def input_shape(self) -> tuple[int, int, int]: ...

    def network(self, arch: str) -> nn.Module: ...

    def teacher_source(self, phase: str, method: type) -> Optional[str]: ...

    def build_distillation(self, phase: str, method: str, model: nn.Module, teacher: Optional[nn.Module],
                           views: int, compile: Optional[bool] = None) -> M.Distillation: ...


def check_student_method(run: Run) -> None:
    """Builds the student phase's method as :meth:`.run.Run.build_distillation` will (the same
    options: ``--method-opt``, ``--temperature``, ``--backend``, the data's facts), against an
    untrained stand-in for the teacher of the run's ``--teacher-arch`` (the spec the method sees is the
    same: classes, feature width, stage shapes), and discards it. Errors are the user's
    (:class:`~.errors.InputError`, one line naming the method and the options given). The global RNG
    is restored afterwards, so that the run draws what it would have drawn without the check, and
    ``--compile`` is left out (nothing here runs a step)."""
    config = run.config
    cls = config.method_class
    cached = run.teacher_source("student", cls) == CACHE
    if run.device.type == "cuda":
        devices = [run.device.index if run.device.index is not None else torch.cuda.current_device()]
    else:
        devices = []
    with torch.random.fork_rng(devices=devices):
        teacher: Optional[nn.Module] = None
        if cls.needs_teacher and not cached:
            teacher = build_model(config.teacher_arch, run.num_classes, in_channels=run.input_shape()[0])
            teacher = teacher.to(run.device).eval().requires_grad_(False)
        views = config.rotations if teacher is not None or cached else 1
        try:
            distill = run.build_distillation("student", config.method, run.network(config.arch), teacher, views,
                                             compile=False)
        except TypeError as exc:  # an option of the wrong type that the method's own checks meet first
            raise InputError(f"--method {config.method}: {exc}") from exc
        except InputError as exc:
            if not config.method_opt:
                raise
            raise InputError(f"{exc} (with --method-opt {' '.join(config.method_opt)})") from exc
        distill.close()

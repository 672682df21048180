"""FitNet (Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015): a middle student stage,
through a trainable regressor, matched to the teacher's."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks as check
from ..ops import math_dtype
from ._common import paired_stages, require_teacher
from .base import Distiller, ModelSpec, Needs
from .registry import register

__all__ = ["fitnet_loss", "FitNet"]


def fitnet_loss(student_map_regressed: Tensor, teacher_map: Tensor) -> Tensor:
    """Hint loss: mean squared error between the regressed student map and the teacher map.

    The regressor (RepDistiller's ``ConvReg``: a conv to the teacher's channels and size) belongs
    to the caller; shapes must match exactly. RepDistiller weights this term 100 at a middle stage.
    """
    s = check.float_tensor(student_map_regressed, "student_map_regressed")
    t = check.float_tensor(teacher_map, "teacher_map")
    check.ndim(s, "student_map_regressed", 2, "(B, ...)", at_least=True)
    check.batch(s, t, "student_map_regressed", "teacher_map")
    if s.shape != t.shape:
        raise ValueError(f"student_map_regressed must have the teacher_map's shape {tuple(t.shape)} "
                         f"(regress it first), got {tuple(s.shape)}")
    dtype = math_dtype(s, t)
    return F.mse_loss(s.to(dtype), t.to(dtype)).to(check.out_dtype(s, t))


class Regressor(nn.Module):
    """Student map -> teacher map shape: average-pooled to the teacher's size when larger, then a
    1x1 conv, BatchNorm and ReLU (RepDistiller's ConvReg, with pooling for every size ratio)."""

    def __init__(self, s_shape: tuple, t_shape: tuple) -> None:
        super().__init__()
        self.size = tuple(t_shape[1:])
        self.conv = nn.Conv2d(s_shape[0], t_shape[0], 1)
        self.bn = nn.BatchNorm2d(t_shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        return F.relu(self.bn(self.conv(x)))


@register("fitnet")
class FitNet(Distiller):
    """MSE between a trainable regressor of a middle student stage and the teacher's stage, weight 100
    (RepDistiller)."""

    source = "Romero et al., ICLR 2015; RepDistiller (-b 100, hint layer 2)"
    family = "representations"
    functions = (fitnet_loss,)
    main_weight = "w_fitnet"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_fitnet: float = 100.0,
                 student_stage: Optional[str] = None, teacher_stage: Optional[str] = None) -> None:
        teacher = require_teacher(teacher, "fitnet")
        super().__init__(student, teacher, w_ce)
        mid_s, mid_t = len(student.stages) // 2, len(teacher.stages) // 2
        (self.s_stage,), (self.t_stage,) = paired_stages(
            student, teacher, None if student_stage is None else [student_stage],
            None if teacher_stage is None else [teacher_stage], slice(mid_s, mid_s + 1), slice(mid_t, mid_t + 1),
            "fitnet", by_resolution=False)  # each network's middle stage: the regressor pools to the teacher's
        self.w_fitnet = float(w_fitnet)
        self.regressor = Regressor(student.stages[self.s_stage], teacher.stages[self.t_stage])

    @property
    def needs(self) -> Needs:
        return Needs(student_stages=(self.s_stage,), teacher_stages=(self.t_stage,))

    def loss_terms(self, student, teacher, target, **context):
        hint = self.regressor(student.stages[self.s_stage])
        return {"fitnet": self.w_fitnet * fitnet_loss(hint, teacher.stages[self.t_stage].detach())}

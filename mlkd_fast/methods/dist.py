"""DIST (Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022): inter- and
intra-class Pearson correlation of the softmaxes."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks as check
from ..ops import math_dtype
from ._common import require_teacher
from .base import Distiller, ModelSpec
from .registry import register

__all__ = ["dist_loss", "DIST"]

_DIST_EPS = 1e-8  # the DIST authors' epsilon in the cosine denominator


def _mean_pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Mean over rows of the Pearson correlation between ``a[i]`` and ``b[i]``, with the DIST
    authors' ``cos = a.b / (|a| |b| + 1e-8)`` on the centred rows."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _DIST_EPS)).mean()


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 1.0) -> Tensor:
    """DIST: ``tau^2 (beta * inter + gamma * intra)`` on ``Y = softmax(z / tau)``.

    ``inter = 1 - mean_i pearson(Y_s[i, :], Y_t[i, :])`` (each sample's class distribution) and
    ``intra = 1 - mean_c pearson(Y_s[:, c], Y_t[:, c])`` (each class's scores across the batch), with
    the authors' epsilon 1e-8 (hunto/DIST_KD). Defaults ``beta = gamma = 1, tau = 1`` are the
    authors' ImageNet setting; they use ``tau = 4`` on CIFAR-100 and a loss weight of 2.

    Degenerate shapes: a Pearson correlation over vectors of length 1 (the intra term of a batch of
    one sample, the inter term of a single class) is undefined; that term is exactly 0 here with zero
    gradients (the authors' formula would give a constant 1 with zero gradient).
    """
    s, t = check.logit_pair(student_logits, teacher_logits)
    beta = check.real(beta, "beta")
    gamma = check.real(gamma, "gamma")
    tau = check.real(tau, "tau", positive=True)
    dtype = math_dtype(s, t)
    y_s = torch.softmax(s.to(dtype) / tau, dim=1)
    y_t = torch.softmax(t.to(dtype) / tau, dim=1)
    n, c = s.shape
    inter = 1 - _mean_pearson_rows(y_s, y_t) if c > 1 else check.zero_loss((s, t), dtype)
    intra = 1 - _mean_pearson_rows(y_s.T, y_t.T) if n > 1 else check.zero_loss((s, t), dtype)
    return ((tau * tau) * (beta * inter + gamma * intra)).to(check.out_dtype(s, t))


@register("dist")
class DIST(Distiller):
    """``w_dist tau^2 (beta inter + gamma intra)``; weight 2, beta = gamma = 1, tau 1 (the authors'
    ImageNet setting; CIFAR uses tau 4)."""

    source = "Huang et al., NeurIPS 2022; the DIST_KD reference code"
    family = "outputs"
    functions = (dist_loss,)
    main_weight = "w_dist"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_dist: float = 2.0,
                 beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> None:
        super().__init__(student, require_teacher(teacher, "dist"), w_ce)
        self.w_dist, self.beta, self.gamma, self.tau = float(w_dist), float(beta), float(gamma), float(tau)

    def loss_terms(self, student, teacher, target, **context):
        return {"dist": self.w_dist * dist_loss(student.logits, teacher.logits.detach(), self.beta, self.gamma,
                                                self.tau)}

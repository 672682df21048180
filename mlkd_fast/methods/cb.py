"""Class-balanced cross-entropy (Cui et al., Class-Balanced Loss Based on Effective Number of Samples,
CVPR 2019): each class's CE weighted by the inverse of its effective number of samples, no teacher.
A control of the KD study under long-tailed training data."""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch
from torch import Tensor

from .. import _checks as check
from ..ops import math_dtype
from .base import Distiller, ModelSpec
from .registry import register

__all__ = ["cb_weights", "cb_loss", "ClassBalanced"]


def cb_weights(class_counts: Sequence[int], beta: float = 0.999) -> Tensor:
    """Cui et al.'s class weights: ``w_c = (1 - beta) / (1 - beta ** n_c)`` (the inverse effective number
    of samples), normalised to sum to K; ``beta = 0`` gives equal weights (CE), ``beta -> 1`` the inverse
    class frequency. Float64 ``(K,)``. Every count must be >= 1 (a class with no sample has no weight)."""
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() < 1:
        raise ValueError(f"class_counts must be a non-empty sequence of counts, got {class_counts!r}")
    if bool((counts < 1).any()) or bool((counts != counts.round()).any()):
        raise ValueError(f"class_counts must be integers >= 1, got {list(class_counts)}")
    beta = check.real(beta, "beta")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    raw = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return raw * (counts.numel() / raw.sum())


def cb_loss(logits: Tensor, target: Tensor, class_counts: Sequence[int], beta: float = 0.999) -> Tensor:
    """``(1 / N) sum_i w_{y_i} CE(z_i, y_i)`` with the weights of :func:`cb_weights` (a mean over the
    batch's rows, not over their weights: the weights are the loss's scale per class, as in Cui et al.),
    in fp32 or better. ``(N, K)`` logits with K = len(class_counts), ``(N,)`` class indices."""
    z = check.float_tensor(logits, "logits")
    check.ndim(z, "logits", 2, "(N, K)")
    y = check.labels(target, z.shape[0])
    w = cb_weights(class_counts, beta)
    if w.numel() != z.shape[1]:
        raise ValueError(f"class_counts has {w.numel()} classes but the logits have {z.shape[1]}")
    dtype = math_dtype(z)
    nll = -torch.log_softmax(z.to(dtype), dim=1).gather(1, y[:, None]).squeeze(1)
    return (w.to(device=z.device, dtype=dtype)[y] * nll).mean().to(check.out_dtype(z))


@register("cb")
class ClassBalanced(Distiller):
    """``w_ce * cb_loss``: the label term (``"ce"`` in ``.last``) is the class-balanced CE. It needs the
    training set's class counts (``class_counts``, e.g. ``--method-opt class_counts=(320,200,...)``);
    a loop that knows them passes them as the data fact ``class_counts``."""

    source = "Cui et al., CVPR 2019 (effective number of samples, beta 0.999)"
    family = "none"
    needs_teacher = False
    functions = (cb_loss,)
    main_weight = "beta"
    data_options = {"class_counts": "class_counts"}
    control_for: ClassVar[str] = "imbalance"
    search_values: ClassVar[tuple[float, ...]] = (0.9, 0.99, 0.999)

    def __init__(self, student: ModelSpec, teacher: Optional[ModelSpec] = None, w_ce: float = 1.0,
                 beta: float = 0.999, class_counts: Optional[Sequence[int]] = None) -> None:
        super().__init__(student, None, w_ce)
        if class_counts is None:
            raise ValueError("method 'cb' weights each class by its number of training samples: it needs "
                             "class_counts (one count per class, e.g. --method-opt class_counts=(320,200,...))")
        weights = cb_weights(class_counts, beta)
        if weights.numel() != student.num_classes:
            raise ValueError(f"class_counts has {weights.numel()} classes but the student has {student.num_classes}")
        self.beta, self.class_counts = float(beta), tuple(int(c) for c in class_counts)

    def forward(self, student, teacher, target, **context):
        self.check(student, teacher, context)
        return self._total({"ce": self.w_ce * cb_loss(student.logits, target, self.class_counts, self.beta)})

    def extra_repr(self) -> str:
        return f"w_ce={self.w_ce:g}, beta={self.beta:g}, classes={len(self.class_counts)}"

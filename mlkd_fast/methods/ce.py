"""Plain training: cross-entropy on the labels, no teacher (the baseline of every comparison)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..terms import cross_entropy
from .base import Distiller, ModelSpec
from .registry import register

__all__ = ["ce_loss", "CEOnly"]


def ce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of ``(N, C)`` logits against ``(N,)`` class indices, mean over rows, computed in
    the logits' precision and at least fp32 (fp64 logits stay fp64)."""
    return cross_entropy(logits, target)


@register("ce")
class CEOnly(Distiller):
    """Standard training: cross-entropy on the labels, no teacher."""

    source = "-"
    family = "none"
    needs_teacher = False
    is_baseline = True
    functions = (ce_loss,)

    def __init__(self, student: ModelSpec, teacher: Optional[ModelSpec] = None, w_ce: float = 1.0) -> None:
        super().__init__(student, None, w_ce)

    def loss_terms(self, student, teacher, target, **context):
        return {}

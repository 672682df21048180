"""Label smoothing (Szegedy et al., Rethinking the Inception Architecture, CVPR 2016): CE against
labels mixed with the uniform distribution, no teacher. A control of the KD study: the regularisation
a teacher's soft targets bring without the teacher's knowledge."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor

from .. import _checks as check
from ..ops import math_dtype
from .base import Distiller, ModelSpec
from .registry import register

__all__ = ["ls_loss", "LabelSmoothing"]


def ls_loss(logits: Tensor, target: Tensor, smoothing: float = 0.1) -> Tensor:
    """``(1 - eps) CE(z, y) + eps * mean_c(-log softmax(z)_c)``: the cross-entropy against the target
    ``(1 - eps) onehot(y) + eps / K`` (the same as ``F.cross_entropy(..., label_smoothing=eps)``),
    mean over rows, computed in fp32 or better. ``(N, K)`` logits, ``(N,)`` class indices,
    ``0 <= eps < 1``."""
    z = check.float_tensor(logits, "logits")
    check.ndim(z, "logits", 2, "(N, K)")
    y = check.labels(target, z.shape[0])
    eps = check.real(smoothing, "smoothing")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {eps}")
    logp = torch.log_softmax(z.to(math_dtype(z)), dim=1)
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    uniform = -logp.mean(dim=1)
    return ((1.0 - eps) * nll + eps * uniform).mean().to(check.out_dtype(z))


@register("ls")
class LabelSmoothing(Distiller):
    """``w_ce * ls_loss``: the label term (``"ce"`` in ``.last``) is CE against smoothed labels."""

    source = "Szegedy et al., CVPR 2016 (label smoothing, eps 0.1)"
    family = "none"
    needs_teacher = False
    functions = (ls_loss,)
    main_weight = "smoothing"
    #: the KD study's control trait: which corruption it is a control for ("any", "noise", "imbalance")
    control_for: ClassVar[str] = "any"
    #: the values of the main weight a study searches (its own range: eps < 1)
    search_values: ClassVar[tuple[float, ...]] = (0.05, 0.15, 0.4)

    def __init__(self, student: ModelSpec, teacher: Optional[ModelSpec] = None, w_ce: float = 1.0,
                 smoothing: float = 0.1) -> None:
        super().__init__(student, None, w_ce)
        if not 0.0 <= float(smoothing) < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)

    def forward(self, student, teacher, target, **context):
        self.check(student, teacher, context)
        return self._total({"ce": self.w_ce * ls_loss(student.logits, target, self.smoothing)})

    def extra_repr(self) -> str:
        return f"w_ce={self.w_ce:g}, smoothing={self.smoothing:g}"

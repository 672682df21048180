"""KD (Hinton et al., Distilling the Knowledge in a Neural Network, arXiv 1503.02531): the teacher's
softened outputs, on the fused KL."""
from __future__ import annotations

from torch import Tensor

from .. import _checks as check
from ..fused import kd_ce_loss, kd_kl_div
from ._common import require_teacher
from .base import Distiller, ModelSpec
from .registry import register

__all__ = ["kd_loss", "KD"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, *,
            backend: str = "auto") -> Tensor:
    """Hinton KD: ``T^2 KL(softmax(t / T) || softmax(s / T))``, summed over classes, mean over rows.

    Runs on the fused kernels (:func:`mlkd_fast.functional.kd_kl_div`, reduction ``"batchmean"``).
    Default ``T = 4`` as in RepDistiller and mdistiller. Logits of shape ``(N, C)`` (or ``(..., C)``:
    every leading index is a row). The teacher receives a gradient only if it requires grad.
    """
    s = check.float_tensor(student_logits, "student_logits")
    t = check.float_tensor(teacher_logits, "teacher_logits")
    loss = kd_kl_div(s, t, temperature, reduction="batchmean", backend=backend)
    return loss.to(check.out_dtype(s, t))


@register("kd")
class KD(Distiller):
    """``w_kd T^2 KL(softmax(t/T) || softmax(s/T))``, T = 4, on the fused KL."""

    source = "Hinton et al., arXiv 1503.02531; T = 4 as in RepDistiller / mdistiller"
    family = "outputs"
    functions = (kd_loss,)
    main_weight = "w_kd"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_kd: float = 1.0,
                 temperature: float = 4.0, backend: str = "auto") -> None:
        super().__init__(student, require_teacher(teacher, "kd"), w_ce)
        self.w_kd, self.temperature, self.backend = float(w_kd), float(temperature), backend

    def forward(self, student, teacher, target, **context):
        # CE and KD read the same logits: one op for both (one pass and one autograd node on the native
        # backend; the two terms elsewhere), the terms the base class's CE + loss_terms would give
        self.check(student, teacher, context)
        total, kd, ce = kd_ce_loss(student.logits, teacher.logits.detach(), target, self.temperature, w_kd=self.w_kd,
                                   w_ce=self.w_ce, backend=self.backend)
        self.last = {"ce": ce} if self.w_ce > 0 else {}
        self.last.update(kd=kd, total=total.detach())
        return total


"""Generalized cross-entropy (Zhang & Sabuncu, Generalized Cross Entropy Loss for Training Deep Neural
Networks with Noisy Labels, NeurIPS 2018): ``(1 - p_y^q) / q``, a noise-robust label loss between CE
(q -> 0) and MAE (q = 1), no teacher. A control of the KD study under label noise."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor

from .. import _checks as check
from ..ops import math_dtype
from .base import Distiller, ModelSpec
from .registry import register

__all__ = ["gce_loss", "GCE"]


def gce_loss(logits: Tensor, target: Tensor, q: float = 0.7) -> Tensor:
    """The L_q loss ``(1 - softmax(z)_y ** q) / q``, mean over rows, in fp32 or better (``p_y ** q`` as
    ``exp(q log p_y)``, finite for any logits). ``(N, K)`` logits, ``(N,)`` class indices, ``0 < q <= 1``
    (the paper's default 0.7; its truncated variant is not implemented)."""
    z = check.float_tensor(logits, "logits")
    check.ndim(z, "logits", 2, "(N, K)")
    y = check.labels(target, z.shape[0])
    q = check.real(q, "q")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    logp_y = torch.log_softmax(z.to(math_dtype(z)), dim=1).gather(1, y[:, None]).squeeze(1)
    return ((1.0 - torch.exp(q * logp_y)) / q).mean().to(check.out_dtype(z))


@register("gce")
class GCE(Distiller):
    """``w_ce * gce_loss``: the label term (``"ce"`` in ``.last``) is GCE in place of CE."""

    source = "Zhang & Sabuncu, NeurIPS 2018 (L_q, q 0.7)"
    family = "none"
    needs_teacher = False
    functions = (gce_loss,)
    main_weight = "q"
    control_for: ClassVar[str] = "noise"
    search_values: ClassVar[tuple[float, ...]] = (0.3, 0.5, 0.7)

    def __init__(self, student: ModelSpec, teacher: Optional[ModelSpec] = None, w_ce: float = 1.0,
                 q: float = 0.7) -> None:
        super().__init__(student, None, w_ce)
        if not 0.0 < float(q) <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {q}")
        self.q = float(q)

    def forward(self, student, teacher, target, **context):
        self.check(student, teacher, context)
        return self._total({"ce": self.w_ce * gce_loss(student.logits, target, self.q)})

    def extra_repr(self) -> str:
        return f"w_ce={self.w_ce:g}, q={self.q:g}"

"""AT (Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017): the spatial attention
maps of every stage pair."""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

from .. import _checks as check
from ..ops import math_dtype
from ._common import Maps, StagePairs, pooled_pair, stage_pairs
from .base import ModelSpec
from .registry import register

__all__ = ["attention_map", "at_loss", "AT"]


def _check_p(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not math.isfinite(float(p)) or float(p) <= 0:
        raise ValueError(f"p must be a finite number > 0, got {p!r}")
    return float(p)


def attention_map(feature_map: Tensor, p: float = 2.0) -> Tensor:
    """The spatial attention ``a = normalize(mean_c |f|^p)`` of a ``(B, C, ...)`` map, flattened to
    ``(B, prod(spatial))`` and L2-normalised per sample (``F.normalize``, eps 1e-12), in the math dtype.

    ``|f|^p`` is the paper's definition; RepDistiller writes ``f^p``, the same for even ``p`` and for
    the non-negative (post-ReLU) maps it feeds."""
    f = check.float_tensor(feature_map, "feature_map")
    check.ndim(f, "feature_map", 3, "(B, C, ...)", at_least=True)
    p = _check_p(p)
    f = f.to(math_dtype(f))
    a = (f * f if p == 2.0 else f.abs().pow(p)).mean(dim=1).flatten(1)
    return F.normalize(a, p=2.0, dim=1)


def at_loss(student_maps: Maps, teacher_maps: Maps, p: float = 2.0) -> Tensor:
    """Attention transfer: ``sum over stage pairs of mean((a_s - a_t)^2)`` with :func:`attention_map`.

    ``student_maps`` / ``teacher_maps``: one ``(B, C, H, W)`` map each, or equal-length sequences of
    them (one per stage). Channels may differ between the networks (they are averaged out). Where
    the spatial sizes of a pair differ, the larger map is average-pooled to the smaller one's size
    first, as RepDistiller and mdistiller do (:func:`~mlkd_fast.methods._common.pool_to_smaller`;
    a pair that is larger in one dimension and smaller in the other raises). No weight inside:
    RepDistiller and mdistiller weight the sum 1000, ``p = 2``.
    """
    p = _check_p(p)
    pairs = stage_pairs(student_maps, teacher_maps, "student_maps", "teacher_maps")
    for s, t, sn, tn in pairs:
        check.ndim(s, sn, 3, "(B, C, ...)", at_least=True)
        check.ndim(t, tn, 3, "(B, C, ...)", at_least=True)
        check.batch(s, t, sn, tn)
    tensors = [x for s, t, _, _ in pairs for x in (s, t)]
    dtype = math_dtype(*tensors)
    total = 0
    for s, t, sn, tn in pairs:
        s, t = pooled_pair(s.to(dtype), t.to(dtype), sn, tn)
        total = total + (attention_map(s, p) - attention_map(t, p)).square().mean()
    return total.to(check.out_dtype(*tensors))


@register("at")
class AT(StagePairs):
    """The L2-normalised spatial attention maps ``mean_c f^p`` of every stage pair, p 2, weight 1000
    (RepDistiller); maps of different sizes are pooled to the smaller one."""

    source = "Zagoruyko & Komodakis, ICLR 2017; RepDistiller (-b 1000, p 2)"
    family = "representations"
    functions = (attention_map, at_loss)
    main_weight = "w_at"
    scales_with = "positions"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_at: float = 1000.0,
                 p: float = 2.0, student_stages: Optional[Sequence[str]] = None,
                 teacher_stages: Optional[Sequence[str]] = None, min_size: int = 1) -> None:
        super().__init__(student, teacher, w_ce, student_stages, teacher_stages, min_size)
        self.w_at, self.p = float(w_at), float(p)

    def loss_terms(self, student, teacher, target, **context):
        s, t = self.maps(student, teacher)
        return {"at": self.w_at * at_loss(s, t, p=self.p)}

"""NST (Huang & Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, arXiv
1707.01219): the squared MMD of the channel activations."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks as check
from ..ops import math_dtype
from ._common import Maps, StagePairs, pooled_pair, stage_pairs
from .base import ModelSpec
from .registry import register

__all__ = ["nst_loss", "NST"]


def nst_loss(student_map: Maps, teacher_map: Maps) -> Tensor:
    """Neuron selectivity transfer: the squared MMD between the channel activations of the two maps
    with the polynomial kernel ``k(x, y) = (x^T y)^2``.

    Each channel's activations over the ``H W`` positions are one sample, L2-normalised; per image,
    ``MMD^2 = mean k(t_i, t_j) + mean k(s_i, s_j) - 2 mean k(s_i, t_j)`` over the channel pairs of
    each block (the networks' channel counts may differ), averaged over the batch, as RepDistiller
    computes it (its "full" loss; the teacher-teacher term is a constant when the teacher is
    detached). One map per network or equal-length sequences (summed over stages). Where the spatial
    sizes of a pair differ, the larger map is average-pooled to the smaller one's size first, as
    RepDistiller does. RepDistiller and mdistiller weight this term 50.
    """
    pairs = stage_pairs(student_map, teacher_map, "student_map", "teacher_map")
    for s, t, sn, tn in pairs:
        check.ndim(s, sn, 3, "(B, C, ...)", at_least=True)
        check.ndim(t, tn, 3, "(B, C, ...)", at_least=True)
        check.batch(s, t, sn, tn)
    tensors = [x for s, t, _, _ in pairs for x in (s, t)]
    dtype = math_dtype(*tensors)

    def kernel_mean(x: Tensor, y: Tensor) -> Tensor:
        return torch.bmm(x, y.transpose(1, 2)).square().mean()

    total = 0
    for s, t, sn, tn in pairs:
        s, t = pooled_pair(s.to(dtype), t.to(dtype), sn, tn)
        a_s = F.normalize(s.flatten(2), p=2.0, dim=2)
        a_t = F.normalize(t.flatten(2), p=2.0, dim=2)
        total = total + kernel_mean(a_t, a_t) + kernel_mean(a_s, a_s) - 2 * kernel_mean(a_s, a_t)
    return total.to(check.out_dtype(*tensors))


@register("nst")
class NST(StagePairs):
    """Squared MMD of the channel activations with the polynomial kernel, summed over every stage (the
    middle stages RepDistiller uses, ``feat[1:-1]``), weight 50 (RepDistiller); maps of different
    sizes are pooled to the smaller one; ``min_size`` leaves out stages smaller than that."""

    source = "Huang & Wang, arXiv 1707.01219; RepDistiller (-b 50, feat[1:-1])"
    family = "representations"
    functions = (nst_loss,)
    main_weight = "w_nst"
    scales_with = "positions"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_nst: float = 50.0,
                 student_stages: Optional[Sequence[str]] = None,
                 teacher_stages: Optional[Sequence[str]] = None, min_size: int = 1) -> None:
        super().__init__(student, teacher, w_ce, student_stages, teacher_stages, min_size)
        self.w_nst = float(w_nst)

    def loss_terms(self, student, teacher, target, **context):
        s, t = self.maps(student, teacher)
        return {"nst": self.w_nst * nst_loss(s, t)}

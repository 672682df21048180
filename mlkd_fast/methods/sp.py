"""SP (Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019): the batch similarity
of a stage's maps."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor

from .. import _checks as check
from ..ops import math_dtype
from ._common import StagePairs, default_rows, sum_over_row_blocks
from .base import ModelSpec
from .registry import register

__all__ = ["sp_loss", "SP"]


def sp_loss(student_feats: Union[Tensor, Sequence[Tensor]], teacher_feats: Union[Tensor, Sequence[Tensor]], *,
            chunk: Optional[int] = None) -> Tensor:
    """Similarity preserving: for each stage pair, ``G = F F^T`` of the maps flattened to ``(B, -1)``,
    each row L2-normalised (``F.normalize``, eps 1e-12), and ``||G_t - G_s||_F^2 / B^2``; summed
    over the pairs, as RepDistiller computes it. One tensor per network or equal-length sequences.
    RepDistiller and mdistiller weight the sum 3000. A batch of one sample gives exactly 0.

    A row's normalisation needs that row only, so the Gram matrices are built ``chunk`` rows at a
    time (default: as many as keep a block near 2^22 elements; all rows at small batch), each block
    recomputed in the backward: O(chunk * B) memory at any batch. ``chunk`` changes the result by
    float summation order only.
    """
    single = isinstance(student_feats, Tensor)
    if single != isinstance(teacher_feats, Tensor):
        raise TypeError("student_feats and teacher_feats must both be tensors or both be sequences of tensors")
    s_list = [student_feats] if single else list(student_feats)
    t_list = [teacher_feats] if single else list(teacher_feats)
    if len(s_list) != len(t_list) or not s_list:
        raise ValueError(f"student_feats and teacher_feats must pair up stage by stage: {len(s_list)} vs {len(t_list)}")
    pairs = []
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        sn, tn = ("student_feats", "teacher_feats") if single else (f"student_feats[{i}]", f"teacher_feats[{i}]")
        pairs.append(check.embeddings(s, t, sn, tn, flatten=True))
    tensors = [x for pair in pairs for x in pair]
    dtype = math_dtype(*tensors)
    b = pairs[0][0].shape[0]
    for i, (s, _) in enumerate(pairs):
        if s.shape[0] != b:
            raise ValueError(f"student_feats[{i}] has batch size {s.shape[0]} but student_feats[0] has {b}")
    check.chunk(chunk)
    if b == 1:
        return check.zero_loss(tensors, dtype).to(check.out_dtype(*tensors))
    total = None
    for s, t in pairs:
        s, t = s.to(dtype).flatten(1), t.to(dtype).flatten(1)
        rows = chunk or default_rows(b, max(s.shape[1], t.shape[1]))
        part = sum_over_row_blocks(_sp_block, b, rows, s, t) / (b * b)
        total = part if total is None else total + part
    return total.to(check.out_dtype(*tensors))


def _sp_block(start: int, stop: int, s: Tensor, t: Tensor) -> Tensor:
    g_s = F.normalize(s[start:stop] @ s.T, p=2.0, dim=1)
    g_t = F.normalize(t[start:stop] @ t.T, p=2.0, dim=1)
    return (g_t - g_s).square().sum()


@register("sp")
class SP(StagePairs):
    """Row-normalised batch Gram matrices of the last stage's maps, ``||G_t - G_s||_F^2 / B^2``,
    weight 3000 (RepDistiller)."""

    source = "Tung & Mori, ICCV 2019; RepDistiller (-b 3000)"
    family = "relations"
    default_stages = slice(-1, None)
    functions = (sp_loss,)
    main_weight = "w_sp"
    scales_with = "batch"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_sp: float = 3000.0,
                 student_stages: Optional[Sequence[str]] = None,
                 teacher_stages: Optional[Sequence[str]] = None, min_size: int = 1) -> None:
        super().__init__(student, teacher, w_ce, student_stages, teacher_stages, min_size)
        self.w_sp = float(w_sp)

    def loss_terms(self, student, teacher, target, **context):
        s, t = self.maps(student, teacher)
        return {"sp": self.w_sp * sp_loss(s, t)}

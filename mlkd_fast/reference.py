"""Pure-PyTorch reference of every fused op (docs/design.md §1): the tests' oracle and the
``backend="torch"`` path.

It is written for clarity and numerical stability (log-sum-exp, fp32 math for fp16/bf16 inputs, fp64
for fp64), not for speed or memory: the correlation here materialises the (M, N) similarity matrices.
Its row functions have the per-row signatures every backend implements (:mod:`mlkd_fast.backends`):
``kd_kl_rows(student, teacher, temperature, row_weight)`` and ``correlation_kl_rows(student_rows,
teacher_rows, student_cols, teacher_cols, tau, exclude_diagonal)``; the reduction lives in
:mod:`mlkd_fast.fused` and is shared by every backend.

The training-only terms of ``MLKDLoss`` (feature alignment, SupCon) live in :mod:`mlkd_fast.terms`;
they are re-exported here for the code and tests that import them from this module.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import NORM_EPS, math_dtype
from .terms import feature_alignment, supcon_loss

__all__ = ["kd_kl_rows", "correlation_kl_rows", "feature_alignment", "supcon_loss", "NORM_EPS"]


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise p (log p - log q) with 0 where p == 0, NaN kept where p is NaN.

    The masked branch is built from "safe" logs so that neither the value nor the gradient of a
    -inf teacher entry (p = 0) turns into NaN through 0 * inf.
    """
    p = log_p.exp()
    has_mass = p > 0
    safe_log_p = torch.where(has_mass, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(has_mass, log_q, torch.zeros_like(log_q))
    # p * 0 (not a literal 0) so that a NaN p stays NaN.
    return torch.where(has_mass, p * (safe_log_p - safe_log_q), p * 0)


def kd_kl_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    row_weight: Optional[Tensor] = None,
) -> Tensor:
    """Per-row ``w_i T^2 KL(softmax(t/T) || softmax(s/T))`` as an fp32 (or fp64) vector of length N.

    ``row_weight`` (length N; None means 1) is the row's weight w_i (docs/design.md §1.1): rows of
    weight 0 (masked rows) give exactly 0 with zero gradient, whatever they hold. Gradients reach
    the teacher logits only if they require grad (online / mutual distillation).
    """
    dtype = math_dtype(student_logits, teacher_logits)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    if row_weight is not None:
        # masked rows' logits replaced before the softmax: a NaN or inf there, or an all -inf
        # teacher row, would otherwise reach the gradient as 0 * NaN through log_softmax's backward
        kept = (row_weight != 0)[:, None]
        s = torch.where(kept, s, torch.zeros_like(s))
        t = torch.where(kept, t, torch.zeros_like(t))
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(t / temperature, dim=-1)
    rows = _kl_terms(log_p, log_q).sum(dim=-1) * (temperature * temperature)
    if row_weight is not None:
        rows = torch.where(row_weight != 0, rows, torch.zeros_like(rows)) * row_weight
    return rows


def _normalize_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    return F.normalize(x.to(dtype), p=2.0, dim=-1, eps=NORM_EPS)


def correlation_kl_rows(
    student_rows: Tensor,
    teacher_rows: Tensor,
    student_cols: Optional[Tensor] = None,
    teacher_cols: Optional[Tensor] = None,
    tau: float = 0.5,
    exclude_diagonal: Optional[bool] = None,
) -> Tensor:
    """Per-row KL between row-softmaxes of the teacher and student cosine-similarity matrices.

    ``S = normalize(rows) @ normalize(cols).T / tau`` for each network; ``l_i = KL(P_i || Q_i)``
    with ``P = softmax(S_t)``, ``Q = softmax(S_s)`` (docs/design.md §1.2). Without column features
    the matrix is square (columns = rows). ``exclude_diagonal`` leaves entry ``(i, i)`` out of row i:
    the self-similarity, in square mode or when the first columns are the rows themselves (one
    shard's rows against its whole batch); None (the default) excludes it in square mode only. The
    teacher is used as given: detach it beforehand if it must not receive gradient.
    """
    dtype = math_dtype(student_rows, teacher_rows)
    square = student_cols is None
    if exclude_diagonal is None:
        exclude_diagonal = square
    a_s = _normalize_rows(student_rows, dtype)
    a_t = _normalize_rows(teacher_rows, dtype)
    b_s = a_s if square else _normalize_rows(student_cols, dtype)
    b_t = a_t if square else _normalize_rows(teacher_cols, dtype)
    sim_s = a_s @ b_s.T / tau
    sim_t = a_t @ b_t.T / tau
    if exclude_diagonal:
        diag = torch.eye(*sim_s.shape, dtype=torch.bool, device=sim_s.device)
        sim_s = sim_s.masked_fill(diag, float("-inf"))
        sim_t = sim_t.masked_fill(diag, float("-inf"))
    log_q = torch.log_softmax(sim_s, dim=-1)
    log_p = torch.log_softmax(sim_t, dim=-1)
    return _kl_terms(log_p, log_q).sum(dim=-1)

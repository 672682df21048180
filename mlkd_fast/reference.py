"""Pure-PyTorch reference of every loss (SPEC section 2).

This module is the oracle for the Triton and native kernels and the ``backend="torch"`` path. It is
written for clarity and numerical stability (log-sum-exp, fp32 math for fp16/bf16 inputs), not for
speed or memory: the correlation here materialises the (M, N) similarity matrices.

The row-level functions (``kd_kl_rows``, ``correlation_kl_rows``) return one loss per row; the
reduction lives in :mod:`mlkd_fast.functional` and is shared by every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-8


def _math_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 stays fp64 (for gradcheck); everything else is computed in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
    row_mask: Optional[Tensor] = None,
) -> Tensor:
    """Per-row ``T^2 * KL(softmax(t/T) || softmax(s/T))`` as an fp32 (or fp64) vector of length N.

    Rows where ``row_mask`` is False give exactly 0 (and zero gradient). Gradients reach the teacher
    logits only if they require grad (online / mutual distillation).
    """
    dtype = _math_dtype(student_logits, teacher_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    rows = _kl_terms(log_p, log_q).sum(dim=-1) * (temperature * temperature)
    if row_mask is not None:
        rows = torch.where(row_mask, rows, torch.zeros_like(rows))
    return rows


def _normalize_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    return F.normalize(x.to(dtype), p=2.0, dim=-1, eps=NORM_EPS)


def correlation_kl_rows(
    student_rows: Tensor,
    teacher_rows: Tensor,
    student_cols: Optional[Tensor] = None,
    teacher_cols: Optional[Tensor] = None,
    tau: float = 0.5,
    keep_diagonal: bool = False,
    cols_start_with_rows: bool = False,
) -> Tensor:
    """Per-row KL between row-softmaxes of the teacher and student cosine-similarity matrices.

    ``S = normalize(rows) @ normalize(cols).T / tau`` for each network; ``l_i = KL(P_i || Q_i)``
    with ``P = softmax(S_t)``, ``Q = softmax(S_s)``. Without column features the matrix is square
    (columns = rows) and its diagonal is excluded unless ``keep_diagonal``. With column features
    whose first rows are the row features (``cols_start_with_rows``: one shard's rows against its
    whole batch) entry ``(i, i)`` is the self-similarity and is excluded the same way. The teacher is
    used as given: detach it beforehand if it must not receive gradient.
    """
    dtype = _math_dtype(student_rows, teacher_rows)
    square = student_cols is None
    a_s = _normalize_rows(student_rows, dtype)
    a_t = _normalize_rows(teacher_rows, dtype)
    b_s = a_s if square else _normalize_rows(student_cols, dtype)
    b_t = a_t if square else _normalize_rows(teacher_cols, dtype)
    sim_s = a_s @ b_s.T / tau
    sim_t = a_t @ b_t.T / tau
    if (square or cols_start_with_rows) and not keep_diagonal:
        diag = torch.eye(*sim_s.shape, dtype=torch.bool, device=sim_s.device)
        sim_s = sim_s.masked_fill(diag, float("-inf"))
        sim_t = sim_t.masked_fill(diag, float("-inf"))
    log_q = torch.log_softmax(sim_s, dim=-1)
    log_p = torch.log_softmax(sim_t, dim=-1)
    return _kl_terms(log_p, log_q).sum(dim=-1)


def feature_alignment(student_proj: Tensor, teacher_feats: Tensor) -> Tensor:
    """BYOL-style alignment ``mean_i (2 - 2 cos(student_proj_i, teacher_feats_i))`` (fp32 scalar)."""
    dtype = _math_dtype(student_proj, teacher_feats)
    a = _normalize_rows(student_proj, dtype)
    b = _normalize_rows(teacher_feats, dtype)
    return (2.0 - 2.0 * (a * b).sum(dim=-1)).mean()


def supcon_loss(embeddings: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "out" form) over L2-normalised rows.

    For every anchor i: ``-mean_{p in P(i)} log( exp(z_i.z_p/t) / sum_{a != i} exp(z_i.z_a/t) )``
    with P(i) the other rows of the same label. Anchors without a positive are left out of the mean.
    """
    dtype = _math_dtype(embeddings)
    z = _normalize_rows(embeddings, dtype)
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = torch.log_softmax(logits, dim=-1).masked_fill(self_mask, 0.0)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(dim=-1)
    per_anchor = -(log_prob * positives).sum(dim=-1) / n_pos.clamp_min(1)
    has_pos = n_pos > 0
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp_min(1)

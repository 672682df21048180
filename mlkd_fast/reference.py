"""Pure-PyTorch reference of every loss (SPEC section 2).

This module is the oracle for the Triton and native kernels and the ``backend="torch"`` path. It is
written for clarity and numerical stability (log-sum-exp, fp32 math for fp16/bf16 inputs), not for
speed or memory: the correlation here materialises the (M, N) similarity matrices.

The row-level functions (``kd_kl_rows``, ``correlation_kl_rows``) return one loss per row; the
reduction lives in :mod:`mlkd_fast.functional` and is shared by every backend.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-8
SUPCON_EPS = 1e-7  # inside the log of the SupCon denominator, as in the authors' code


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


def supcon_loss(
    embeddings: Tensor,
    labels: Tensor,
    temperature: float = 0.07,
    contrast: Optional[Tensor] = None,
    contrast_labels: Optional[Tensor] = None,
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "out" form) over L2-normalised rows, as
    the MLKD authors' released code computes it.

    For every anchor i: ``-mean_{p in P(i)} [ s_ip - log( sum_{a != i} exp(s_ia) + 1e-7 ) ]`` with
    ``s_ia = z_i.z_a / t - max_a' z_i.z_a' / t`` (the row maximum, self included, as a constant) and
    P(i) the other rows of the same label. The 1e-7 matters only for an anchor far from every other
    row: its denominator, relative to its self-similarity, is then 1e-7 or less, and the floor makes
    its positives' log-probabilities strongly negative (a large loss pulling it towards them) where a
    plain softmax would renormalise over the far rows.
    Anchors without a positive are left out of the mean (the authors' code divides 0 by 0 there; in
    ``MLKDLoss`` every anchor has one, the other network's embedding of the same image). Their code
    also scales the loss by ``temperature / 0.07``, which is 1 at the default temperature.

    ``contrast`` (N, D) with ``contrast_labels`` (N,): the anchors are contrasted with these rows
    instead of with each other; they must begin with the anchors themselves (row i of ``contrast``
    is anchor i, left out as self), e.g. one process's embeddings against the global batch's. Each
    shard's loss is then the mean over its own anchors; with as many anchors per shard, the mean
    over the shards is the loss of the whole batch.
    """
    dtype = _math_dtype(embeddings) if contrast is None else _math_dtype(embeddings, contrast)
    z = _normalize_rows(embeddings, dtype)
    if contrast is None:
        c, c_labels = z, labels
    else:
        if contrast_labels is None:
            raise ValueError("supcon_loss: contrast needs contrast_labels")
        if contrast.shape[0] < z.shape[0] or contrast_labels.shape[0] != contrast.shape[0]:
            raise ValueError(f"supcon_loss: contrast {tuple(contrast.shape)} with contrast_labels "
                             f"{tuple(contrast_labels.shape)} must start with the {z.shape[0]} anchors")
        c, c_labels = _normalize_rows(contrast, dtype), contrast_labels
    self_mask = torch.eye(z.shape[0], c.shape[0], dtype=torch.bool, device=z.device)
    sim = z @ c.T / temperature
    shifted = sim - sim.amax(dim=-1, keepdim=True).detach()
    others = torch.logsumexp(shifted.masked_fill(self_mask, float("-inf")), dim=-1, keepdim=True)
    log_prob = shifted - torch.logaddexp(others, others.new_tensor(math.log(SUPCON_EPS)))
    positives = (labels[:, None] == c_labels[None, :]) & ~self_mask
    n_pos = positives.sum(dim=-1)
    per_anchor = -torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=-1) / n_pos.clamp_min(1)
    has_pos = n_pos > 0
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp_min(1)

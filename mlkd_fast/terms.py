"""The training-only terms of ``MLKDLoss`` (docs/design.md §1.3): feature alignment and SupCon.

Unlike the ops of :mod:`mlkd_fast.reference`, these have no fused kernels: this plain PyTorch is
their only implementation, used by :class:`mlkd_fast.losses.MLKDLoss` in training.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import NORM_EPS, math_dtype

__all__ = ["feature_alignment", "supcon_loss", "SUPCON_EPS"]

SUPCON_EPS = 1e-7  # inside the log of the SupCon denominator, as in the authors' code


def _normalize_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    return F.normalize(x.to(dtype), p=2.0, dim=-1, eps=NORM_EPS)


def feature_alignment(student_proj: Tensor, teacher_feats: Tensor) -> Tensor:
    """BYOL-style alignment ``mean_i (2 - 2 cos(student_proj_i, teacher_feats_i))`` (fp32 scalar)."""
    dtype = math_dtype(student_proj, teacher_feats)
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
    dtype = math_dtype(embeddings) if contrast is None else math_dtype(embeddings, contrast)
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
    n = z.shape[0]
    # Only the denominator needs the N x M similarities; the positives' sum is a per-label sum:
    #   sum_{p in P(i)} s_ip = (z_i . G[y_i] - [y_i == y'_i] z_i . c_i) / t - |P(i)| m_i,
    # with G[k] the sum of the contrast rows of label k and m_i the (constant) row maximum. Three
    # passes over the matrix (max, the masked log-sum-exp and its backward) instead of the
    # authors' dozen, and no N x M mask.
    sim = z @ c.T / temperature
    with torch.no_grad():
        row_max = sim.amax(dim=-1)
    sim.diagonal().fill_(float("-inf"))  # the anchor itself (row i of the contrast) is no candidate
    others = torch.logsumexp(sim, dim=-1) - row_max
    log_denominator = torch.logaddexp(others, others.new_tensor(math.log(SUPCON_EPS)))
    # a label's id: its first position among the sorted labels. Fixed shapes: torch.unique's output
    # size depends on the data, which costs a device-to-host sync every call on CUDA
    keys = torch.sort(torch.cat([labels, c_labels])).values
    anchor_class, contrast_class = torch.searchsorted(keys, labels), torch.searchsorted(keys, c_labels)
    class_sums = c.new_zeros(keys.shape[0], c.shape[1]).index_add(0, contrast_class, c)
    class_counts = torch.zeros(keys.shape[0], dtype=torch.long, device=c.device).index_add_(
        0, contrast_class, torch.ones_like(contrast_class))
    self_is_positive = labels == c_labels[:n]
    n_pos = class_counts[anchor_class] - self_is_positive.long()
    self_dot = torch.where(self_is_positive, (z * c[:n]).sum(dim=-1), torch.zeros_like(row_max))
    positive_dots = ((z * class_sums[anchor_class]).sum(dim=-1) - self_dot) / temperature
    has_pos = n_pos > 0
    n_pos_f = n_pos.clamp_min(1).to(dtype)
    per_anchor = row_max + log_denominator - positive_dots / n_pos_f
    return torch.where(has_pos, per_anchor, torch.zeros_like(per_anchor)).sum() / has_pos.sum().clamp_min(1)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """CE in the logits' precision, at least fp32 (fp64 logits stay fp64)."""
    return F.cross_entropy(logits.to(math_dtype(logits)), target)

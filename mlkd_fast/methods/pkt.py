"""PKT (Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV
2018): conditional probabilities of the cosine kernel of the pooled features."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as check
from ..ops import math_dtype
from ._common import PooledFeatures, default_rows, sum_over_row_blocks
from .base import ModelSpec
from .registry import register

__all__ = ["pkt_loss", "PKT"]


def pkt_loss(f_s: Tensor, f_t: Tensor, eps: float = 1e-7, *, chunk: Optional[int] = None) -> Tensor:
    """Probabilistic knowledge transfer, exactly RepDistiller's ``PKT.cosine_similarity_loss`` (the
    authors' passalis/probabilistic_kt formula):

    ``x_hat = x / (||x|| + eps)``, ``K = (x_hat x_hat^T + 1) / 2``, ``P = K / rowsum(K)`` for each
    network, and ``mean over all B^2 entries of P_t log((P_t + eps) / (P_s + eps))``, diagonal kept.
    ``eps = 1e-7`` as there. RepDistiller replaces NaN entries of ``x_hat`` by 0; here a NaN input
    gives a NaN loss instead (never hidden). RepDistiller / mdistiller weight: 30000. A batch of one
    sample gives exactly 0.

    Row sums of ``K`` need no B x B matrix: ``sum_j K_ij = (x_hat_i . sum_j x_hat_j + B) / 2``. With
    them the loss is a sum over rows, built ``chunk`` rows at a time (default: all rows at small
    batch, blocks near 2^22 elements at large batch) and recomputed in the backward: O(chunk * B)
    memory. ``chunk`` changes the result by float summation order only.
    """
    s, t = check.embeddings(f_s, f_t, "f_s", "f_t")
    eps = check.real(eps, "eps", positive=True)
    check.chunk(chunk)
    dtype = math_dtype(s, t)
    b = s.shape[0]
    if b == 1:
        return check.zero_loss((s, t), dtype).to(check.out_dtype(s, t))

    def unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(dtype)
        x = x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)
        return x, (x @ x.sum(dim=0) + b) / 2.0

    (x_s, sums_s), (x_t, sums_t) = unit_rows(s), unit_rows(t)
    rows = chunk or default_rows(b, max(x_s.shape[1], x_t.shape[1]))
    total = sum_over_row_blocks(lambda i, j, *a: _pkt_block(i, j, eps, *a), b, rows, x_s, x_t, sums_s, sums_t)
    return (total / (b * b)).to(check.out_dtype(s, t))


def _pkt_block(start: int, stop: int, eps: float, x_s: Tensor, x_t: Tensor, sums_s: Tensor,
               sums_t: Tensor) -> Tensor:
    p_s = (x_s[start:stop] @ x_s.T + 1.0) / 2.0 / sums_s[start:stop, None]
    p_t = (x_t[start:stop] @ x_t.T + 1.0) / 2.0 / sums_t[start:stop, None]
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).sum()


@register("pkt")
class PKT(PooledFeatures):
    """The cosine-kernel conditional probabilities of the pooled features, KL, weight 30000
    (RepDistiller)."""

    source = "Passalis & Tefas, ECCV 2018; RepDistiller (-b 30000)"
    family = "relations"
    functions = (pkt_loss,)
    main_weight = "w_pkt"
    scales_with = "batch"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_pkt: float = 30000.0) -> None:
        super().__init__(student, teacher, w_ce)
        self.w_pkt = float(w_pkt)

    def loss_terms(self, student, teacher, target, **context):
        return {"pkt": self.w_pkt * pkt_loss(student.feats, teacher.feats.detach())}

"""CC (Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019): the batch
correlation matrices of embedded pooled features."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _checks as check
from ..ops import math_dtype
from ._common import Embed, PooledFeatures, default_rows, sum_over_row_blocks
from .base import ModelSpec
from .registry import register

__all__ = ["cc_correlation", "cc_loss", "cc_repdistiller_loss", "CC", "CC_WEIGHT", "CC_REPDISTILLER_WEIGHT"]

CC_REPDISTILLER_WEIGHT = 0.02  # RepDistiller's -b for its surrogate (cc_repdistiller_loss)
# the paper formula's weight that gives the student's embedding the push RepDistiller's 0.02 x surrogate
# gives it: the median ratio of their gradients over RepDistiller-style runs of the digits default
# (python benchmarks/cc_weight.py --out benchmarks/results/cc_weight.json; docs/design.md §6.3)
CC_WEIGHT = 0.28


def cc_correlation(emb: Tensor, gamma: float = 0.4, p_order: int = 2) -> Tensor:
    """The batch correlation matrix with the Taylor-expanded Gaussian RBF kernel of the CC paper:
    ``psi[i, j] = exp(-2 gamma) sum_{p=0..P} (2 gamma)^p / p! (e_i . e_j)^p`` (``(B, B)``, math dtype).

    It equals ``exp(-gamma ||e_i - e_j||^2)`` to order P when the embeddings have unit norm."""
    x = emb.to(math_dtype(emb))
    return _rbf_taylor(x @ x.T, gamma, p_order)


def _rbf_taylor(g: Tensor, gamma: float, p_order: int) -> Tensor:
    psi = torch.ones_like(g)
    power = torch.ones_like(g)
    for p in range(1, p_order + 1):
        power = power * g
        psi = psi + ((2.0 * gamma) ** p / math.factorial(p)) * power
    return math.exp(-2.0 * gamma) * psi


def cc_loss(emb_s: Tensor, emb_t: Tensor, gamma: float = 0.4, p_order: int = 2, *,
            chunk: Optional[int] = None) -> Tensor:
    """Correlation congruence: ``||psi(E_t) - psi(E_s)||_F^2 / B^2`` with :func:`cc_correlation`.

    ``gamma = 0.4, P = 2`` are the values of the CC authors' setting as torchdistill configures its
    ``CCKDLoss``. Notes on the references: the paper's loss is the squared Frobenius norm over B^2
    (used here); torchdistill divides the unsquared norm by B^2; RepDistiller's ``Correlation``
    ("restructured from the authors' code") computes a different surrogate,
    ``mean_i sum_d |f_s - f_t|_{i,d} |f_s - f_t|_{i+1,d}`` over consecutive samples, with no kernel.
    The embeddings (``(B, D)``, widths may differ) are used as given: the RBF reading needs unit
    norms, so L2-normalise them beforehand for it (torchdistill feeds raw linear outputs). A batch of
    one sample gives exactly 0.

    The kernel matrices are built ``chunk`` rows at a time (default: all rows at small batch, blocks
    near 2^22 elements at large batch), each block recomputed in the backward: O(chunk * B) memory.
    """
    s, t = check.embeddings(emb_s, emb_t, "emb_s", "emb_t")
    gamma = check.real(gamma, "gamma", positive=True)
    if isinstance(p_order, bool) or not isinstance(p_order, int) or p_order < 0:
        raise ValueError(f"p_order must be an int >= 0, got {p_order!r}")
    check.chunk(chunk)
    dtype = math_dtype(s, t)
    b = s.shape[0]
    if b == 1:
        return check.zero_loss((s, t), dtype).to(check.out_dtype(s, t))
    x_s, x_t = s.to(dtype), t.to(dtype)
    rows = chunk or default_rows(b, max(x_s.shape[1], x_t.shape[1]))

    def block(start: int, stop: int, x_s: Tensor, x_t: Tensor) -> Tensor:
        diff = (_rbf_taylor(x_t[start:stop] @ x_t.T, gamma, p_order)
                - _rbf_taylor(x_s[start:stop] @ x_s.T, gamma, p_order))
        return diff.square().sum()

    return (sum_over_row_blocks(block, b, rows, x_s, x_t) / (b * b)).to(check.out_dtype(s, t))


def cc_repdistiller_loss(emb_s: Tensor, emb_t: Tensor) -> Tensor:
    """RepDistiller's ``Correlation`` loss, the surrogate its CC runs use (weight 0.02 there):
    ``mean_i sum_d |e_s - e_t|_{i,d} |e_s - e_t|_{i+1,d}`` over consecutive samples of the batch, no
    kernel. It is not the paper's formula (:func:`cc_loss`); it is here so that a run switched from
    RepDistiller can keep its exact loss (``CC(..., formula="repdistiller")``). A batch of one
    sample gives exactly 0. ``(B, D)`` embeddings of the same width."""
    s, t = check.embeddings(emb_s, emb_t, "emb_s", "emb_t")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"emb_s and emb_t must have the same width: {s.shape[1]} vs {t.shape[1]}")
    dtype = math_dtype(s, t)
    if s.shape[0] == 1:
        return check.zero_loss((s, t), dtype).to(check.out_dtype(s, t))
    delta = (s.to(dtype) - t.to(dtype)).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean().to(check.out_dtype(s, t))


@register("cc")
class CC(PooledFeatures):
    """The batch correlation matrices (Gaussian RBF kernel, Taylor-expanded, gamma 0.4, order 2) of
    128-d embeddings of the pooled features (:func:`cc_loss`, the paper's formula), weight
    ``CC_WEIGHT``; ``formula="repdistiller"`` is RepDistiller's surrogate
    (:func:`cc_repdistiller_loss`) with its weight 0.02. The default ``w_cc`` follows ``formula``
    (docs/design.md: how the paper formula's weight was set)."""

    source = "Peng et al., ICCV 2019; 128-d embeddings as RepDistiller; weight: see docs/design.md"
    family = "relations"
    functions = (cc_correlation, cc_loss, cc_repdistiller_loss)
    main_weight = "w_cc"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_cc: Optional[float] = None,
                 embed_dim: int = 128, gamma: float = 0.4, p_order: int = 2, formula: str = "paper") -> None:
        super().__init__(student, teacher, w_ce)
        if formula not in ("paper", "repdistiller"):
            raise ValueError(f"method 'cc': formula must be 'paper' or 'repdistiller', got {formula!r}")
        if w_cc is None:
            w_cc = CC_WEIGHT if formula == "paper" else CC_REPDISTILLER_WEIGHT
        self.w_cc, self.gamma, self.p_order, self.formula = float(w_cc), float(gamma), int(p_order), formula
        self.embed_s = Embed(student.feature_dim, embed_dim)
        self.embed_t = Embed(teacher.feature_dim, embed_dim)

    def loss_terms(self, student, teacher, target, **context):
        e_s, e_t = self.embed_s(student.feats), self.embed_t(teacher.feats.detach())
        if self.formula == "repdistiller":
            return {"cc": self.w_cc * cc_repdistiller_loss(e_s, e_t)}
        return {"cc": self.w_cc * cc_loss(e_s, e_t, self.gamma, self.p_order)}

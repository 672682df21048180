"""RKD (Park et al., Relational Knowledge Distillation, CVPR 2019): the distances and angles between
samples of the pooled features."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import _checks as check
from ..ops import math_dtype
from ._common import PooledFeatures, default_rows, sum_over_row_blocks
from .base import ModelSpec
from .registry import register

__all__ = ["rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "RKD"]

_PDIST_EPS = 1e-12  # floor on squared distances (RKD authors / RepDistiller): keeps sqrt's gradient finite



def _distance_block(start: int, stop: int, e: Tensor, sq_norm: Tensor) -> Tensor:
    """Rows ``[start, stop)`` of the pairwise Euclidean distances of the (centred) rows ``e``, zero on
    the diagonal. Squared distances are floored at 1e-12 (keeps sqrt's gradient finite), so every
    off-diagonal entry is > 0 and the references' "mean over the non-zero distances" is the mean
    over the off-diagonal ones. Centring the rows first changes no distance and loses less of the
    Gram-matrix form to cancellation."""
    sq = (sq_norm[start:stop, None] + sq_norm[None, :] - 2.0 * (e[start:stop] @ e.T)).clamp_min(_PDIST_EPS)
    cols = torch.arange(e.shape[0], device=e.device)
    rows = torch.arange(start, stop, device=e.device)
    return torch.where(rows[:, None] != cols[None, :], sq.sqrt(), torch.zeros_like(sq))


def _distance_sum_block(start: int, stop: int, e: Tensor, sq_norm: Tensor) -> Tensor:
    return _distance_block(start, stop, e, sq_norm).sum()


def _rkd_distance_block(start: int, stop: int, e_s: Tensor, n_s: Tensor, mean_s: Tensor, e_t: Tensor, n_t: Tensor,
                        mean_t: Tensor) -> Tensor:
    d_s = _distance_block(start, stop, e_s, n_s) / mean_s
    d_t = _distance_block(start, stop, e_t, n_t) / mean_t
    return F.smooth_l1_loss(d_s, d_t, reduction="sum")


def rkd_distance_loss(f_s: Tensor, f_t: Tensor, *, chunk: Optional[int] = None) -> Tensor:
    """RKD's distance term: ``smooth_l1(d_s / mean d_s, d_t / mean d_t)`` averaged over all ``B^2``
    entries of the two distance matrices (zero diagonals included, as in the RKD authors' code and
    RepDistiller). Inputs ``(B, ...)`` are flattened per sample. A batch of one sample gives 0.

    Two passes over row blocks of ``chunk`` rows (default: all rows at small batch, blocks near 2^22
    elements at large batch), each block recomputed in the backward: the first sums the distances
    for the means, the second the Huber terms. O(chunk * B) memory; ``chunk`` changes the result by
    float summation order only."""
    s, t = check.embeddings(f_s, f_t, "f_s", "f_t", flatten=True)
    check.chunk(chunk)
    return _rkd_distance(s, t, chunk).to(check.out_dtype(s, t))


def _rkd_distance(s: Tensor, t: Tensor, chunk: Optional[int] = None) -> Tensor:
    dtype = math_dtype(s, t)
    b = s.shape[0]
    if b == 1:
        return check.zero_loss((s, t), dtype)
    parts = []
    for x in (s, t):
        e = x.to(dtype).flatten(1)
        e = e - e.mean(dim=0, keepdim=True)
        sq_norm = e.square().sum(dim=1)
        rows = chunk or default_rows(b, e.shape[1])
        mean = sum_over_row_blocks(_distance_sum_block, b, rows, e, sq_norm) / (b * (b - 1))
        parts += [e, sq_norm, mean]
    rows = chunk or default_rows(b, max(parts[0].shape[1], parts[3].shape[1]))
    return sum_over_row_blocks(_rkd_distance_block, b, rows, *parts) / (b * b)


def _vertex_cosines(e: Tensor, start: int, stop: int) -> Tensor:
    """``out[a, i, k] = cos(e_i - e_a, e_k - e_a)`` for the anchors ``a`` in ``[start, stop)``:
    shape ``(stop - start, B, B)``. A zero difference vector (``i == a``, or duplicate samples) is
    normalised to 0 (``F.normalize``, eps 1e-12), so its cosines are 0, as in the references."""
    diff = e[None, :, :] - e[start:stop, None, :]
    unit = F.normalize(diff, p=2.0, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2))


def _angle_chunk_sum(e_s: Tensor, e_t: Tensor, start: int, stop: int) -> Tensor:
    return F.smooth_l1_loss(_vertex_cosines(e_s, start, stop), _vertex_cosines(e_t, start, stop), reduction="sum")


def _default_angle_chunk(b: int, d: int) -> int:
    """Anchors per chunk: at most about 2^24 elements (64 MiB in fp32) of ``(chunk, B, D + B)`` work
    tensors per network, and at least one anchor."""
    return max(1, min(b, (1 << 24) // max(1, b * (b + d))))


def rkd_angle_loss(f_s: Tensor, f_t: Tensor, chunk: Optional[int] = None) -> Tensor:
    """RKD's angle term: ``smooth_l1`` between the student's and the teacher's cosines at every
    vertex of every triple, averaged over all ``B^3`` (anchor, i, k) entries, degenerate ones
    (``i`` or ``k`` equal to the anchor: cosine 0 on both sides; ``i == k``: 1 on both sides)
    included, as in the RKD authors' code and RepDistiller.

    Memory: the references build the ``(B, B, D)`` tensor of all difference vectors and the
    ``(B, B, B)`` cosine tensor at once. Here the anchors are taken ``chunk`` at a time (default: as
    many as keep a chunk's work tensors near 2^24 elements per network): a chunk holds
    ``chunk * B * (D + B)`` elements, i.e. O(B^2) for a fixed chunk size when ``D = O(B)``. Each chunk
    is recomputed in the backward (activation checkpointing) instead of being kept for it, so the
    memory held for the backward is the inputs only, not the ``B^3`` cosines. ``chunk`` does not
    change the result beyond float summation order. A batch of one sample gives exactly 0.
    """
    s, t = check.embeddings(f_s, f_t, "f_s", "f_t", flatten=True)
    check.chunk(chunk)
    return _rkd_angle(s, t, chunk).to(check.out_dtype(s, t))


def _rkd_angle(s: Tensor, t: Tensor, chunk: Optional[int]) -> Tensor:
    b = s.shape[0]
    dtype = math_dtype(s, t)
    if b == 1:
        return check.zero_loss((s, t), dtype)
    e_s = s.to(dtype).flatten(1)
    e_t = t.to(dtype).flatten(1)
    step = chunk or _default_angle_chunk(b, max(e_s.shape[1], e_t.shape[1]))
    needs_graph = torch.is_grad_enabled() and (e_s.requires_grad or e_t.requires_grad)
    total = e_s.new_zeros(())
    for start in range(0, b, step):
        stop = min(b, start + step)
        if needs_graph:
            part = checkpoint(_angle_chunk_sum, e_s, e_t, start, stop, use_reentrant=False)
        else:
            part = _angle_chunk_sum(e_s, e_t, start, stop)
        total = total + part
    return total / (b ** 3)


def rkd_loss(f_s: Tensor, f_t: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0, *,
             angle_chunk: Optional[int] = None, distance_chunk: Optional[int] = None) -> Tensor:
    """Relational KD: ``distance_weight * rkd_distance_loss + angle_weight * rkd_angle_loss``.

    Weights 25 and 50 are the RKD paper's, RepDistiller's and mdistiller's defaults (the method's
    own loss weight on top is 1 there). A weight of 0 skips that term's computation. Inputs
    ``(B, ...)`` are flattened per sample; widths may differ between the networks.
    """
    s, t = check.embeddings(f_s, f_t, "f_s", "f_t", flatten=True)
    distance_weight = check.real(distance_weight, "distance_weight")
    angle_weight = check.real(angle_weight, "angle_weight")
    check.chunk(angle_chunk, "angle_chunk")
    check.chunk(distance_chunk, "distance_chunk")
    total = check.zero_loss((s, t), math_dtype(s, t))
    if distance_weight != 0:
        total = total + distance_weight * _rkd_distance(s, t, distance_chunk)
    if angle_weight != 0:
        total = total + angle_weight * _rkd_angle(s, t, angle_chunk)
    return total.to(check.out_dtype(s, t))


@register("rkd")
class RKD(PooledFeatures):
    """Distance (25) and angle (50) potentials of the pooled features, smooth L1 (RepDistiller's weights
    inside the loss, method weight 1)."""

    source = "Park et al., CVPR 2019; RepDistiller (w_d 25, w_a 50)"
    family = "relations"
    functions = (rkd_distance_loss, rkd_angle_loss, rkd_loss)
    main_weight = "w_rkd"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_rkd: float = 1.0,
                 distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__(student, teacher, w_ce)
        self.w_rkd, self.distance_weight, self.angle_weight = float(w_rkd), float(distance_weight), float(angle_weight)

    def loss_terms(self, student, teacher, target, **context):
        return {"rkd": self.w_rkd * rkd_loss(student.feats, teacher.feats.detach(), self.distance_weight,
                                             self.angle_weight)}

"""Relational distillation losses of the zoo: SP, PKT, RKD, CC and CRD.

They compare how samples of a batch relate to each other (or, for CRD, to a memory bank) in the
student and in the teacher. Pure functions apart from :class:`CRDMemory`, the state CRD needs.
No loss weight inside: the reference weights (SP 3000, PKT 30000, CRD 0.8 in RepDistiller /
mdistiller; RKD's 25 and 50 are its own internal balance and are defaults here) are the caller's.
Teacher inputs are used as given (CRD and CC train a head on the teacher side, so nothing is
detached here): detach raw teacher features yourself.

Degenerate batches: with a single sample there is no relation between samples, and every in-batch
relational loss here returns exactly 0 with exactly zero gradients (NaN inputs still give NaN),
decided from the shapes alone.

Precision: fp32 math, fp64 when an input is fp64; results in the dtype the inputs promote to.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .logits import (_check_batch, _check_float, _check_labels, _check_ndim, _check_real, _math_dtype, _out_dtype,
                     _zero_loss)

__all__ = [
    "sp_loss",
    "pkt_loss",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "rkd_loss",
    "cc_correlation",
    "cc_loss",
    "CRDMemory",
    "crd_sample_indices",
    "crd_loss",
    "crd_inbatch_loss",
]


def _check_embeddings(f_s: object, f_t: object, s_name: str, t_name: str,
                      flatten: bool = False) -> tuple[Tensor, Tensor]:
    """(B, D) student / teacher rows (or (B, ...) flattened when ``flatten``); widths may differ."""
    s = _check_float(f_s, s_name)
    t = _check_float(f_t, t_name)
    layout = "(B, ...)" if flatten else "(B, D)"
    _check_ndim(s, s_name, 2, layout, at_least=flatten)
    _check_ndim(t, t_name, 2, layout, at_least=flatten)
    _check_batch(s, t, s_name, t_name)
    return s, t


def _check_chunk(chunk: object, name: str = "chunk") -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{name} must be a positive int or None, got {chunk!r}")


def _default_rows(b: int, width: int = 0) -> int:
    """Rows per block: a block's ``(rows, B)`` matrices and ``(rows, width)`` slices stay near 2^22
    elements each (16 MiB in fp32), at least one row."""
    return max(1, min(b, (1 << 22) // max(1, b + width)))


def _sum_over_row_blocks(block_sum, b: int, rows: Optional[int], *tensors: Tensor) -> Tensor:
    """``sum over [start, stop) of block_sum(start, stop, *tensors)``, the B x B relation matrices
    built ``rows`` rows at a time (docs/design.md §6). With a graph to build, each block is
    recomputed in the backward (activation checkpointing), so neither pass holds more than one
    block's ``(rows, B)`` matrices: memory O(rows * B + B * D) instead of O(B^2). One block covering
    every row is the plain computation."""
    if rows is None or rows >= b:
        return block_sum(0, b, *tensors)
    needs_graph = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    total = None
    for start in range(0, b, rows):
        stop = min(b, start + rows)
        part = (checkpoint(block_sum, start, stop, *tensors, use_reentrant=False) if needs_graph
                else block_sum(start, stop, *tensors))
        total = part if total is None else total + part
    return total


# ---------------------------------------------------------------------------------------------
# SP (Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019)
# ---------------------------------------------------------------------------------------------
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
        pairs.append(_check_embeddings(s, t, sn, tn, flatten=True))
    tensors = [x for pair in pairs for x in pair]
    dtype = _math_dtype(*tensors)
    b = pairs[0][0].shape[0]
    for i, (s, _) in enumerate(pairs):
        if s.shape[0] != b:
            raise ValueError(f"student_feats[{i}] has batch size {s.shape[0]} but student_feats[0] has {b}")
    _check_chunk(chunk)
    if b == 1:
        return _zero_loss(tensors, dtype).to(_out_dtype(*tensors))
    total = None
    for s, t in pairs:
        s, t = s.to(dtype).flatten(1), t.to(dtype).flatten(1)
        rows = chunk or _default_rows(b, max(s.shape[1], t.shape[1]))
        part = _sum_over_row_blocks(_sp_block, b, rows, s, t) / (b * b)
        total = part if total is None else total + part
    return total.to(_out_dtype(*tensors))


def _sp_block(start: int, stop: int, s: Tensor, t: Tensor) -> Tensor:
    g_s = F.normalize(s[start:stop] @ s.T, p=2.0, dim=1)
    g_t = F.normalize(t[start:stop] @ t.T, p=2.0, dim=1)
    return (g_t - g_s).square().sum()


# ---------------------------------------------------------------------------------------------
# PKT (Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018)
# ---------------------------------------------------------------------------------------------
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
    s, t = _check_embeddings(f_s, f_t, "f_s", "f_t")
    eps = _check_real(eps, "eps", positive=True)
    _check_chunk(chunk)
    dtype = _math_dtype(s, t)
    b = s.shape[0]
    if b == 1:
        return _zero_loss((s, t), dtype).to(_out_dtype(s, t))

    def unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(dtype)
        x = x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)
        return x, (x @ x.sum(dim=0) + b) / 2.0

    (x_s, sums_s), (x_t, sums_t) = unit_rows(s), unit_rows(t)
    rows = chunk or _default_rows(b, max(x_s.shape[1], x_t.shape[1]))
    total = _sum_over_row_blocks(lambda i, j, *a: _pkt_block(i, j, eps, *a), b, rows, x_s, x_t, sums_s, sums_t)
    return (total / (b * b)).to(_out_dtype(s, t))


def _pkt_block(start: int, stop: int, eps: float, x_s: Tensor, x_t: Tensor, sums_s: Tensor,
               sums_t: Tensor) -> Tensor:
    p_s = (x_s[start:stop] @ x_s.T + 1.0) / 2.0 / sums_s[start:stop, None]
    p_t = (x_t[start:stop] @ x_t.T + 1.0) / 2.0 / sums_t[start:stop, None]
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).sum()


# ---------------------------------------------------------------------------------------------
# RKD (Park et al., Relational Knowledge Distillation, CVPR 2019)
# ---------------------------------------------------------------------------------------------
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
    s, t = _check_embeddings(f_s, f_t, "f_s", "f_t", flatten=True)
    _check_chunk(chunk)
    return _rkd_distance(s, t, chunk).to(_out_dtype(s, t))


def _rkd_distance(s: Tensor, t: Tensor, chunk: Optional[int] = None) -> Tensor:
    dtype = _math_dtype(s, t)
    b = s.shape[0]
    if b == 1:
        return _zero_loss((s, t), dtype)
    parts = []
    for x in (s, t):
        e = x.to(dtype).flatten(1)
        e = e - e.mean(dim=0, keepdim=True)
        sq_norm = e.square().sum(dim=1)
        rows = chunk or _default_rows(b, e.shape[1])
        mean = _sum_over_row_blocks(_distance_sum_block, b, rows, e, sq_norm) / (b * (b - 1))
        parts += [e, sq_norm, mean]
    rows = chunk or _default_rows(b, max(parts[0].shape[1], parts[3].shape[1]))
    return _sum_over_row_blocks(_rkd_distance_block, b, rows, *parts) / (b * b)


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
    s, t = _check_embeddings(f_s, f_t, "f_s", "f_t", flatten=True)
    _check_chunk(chunk)
    return _rkd_angle(s, t, chunk).to(_out_dtype(s, t))


def _rkd_angle(s: Tensor, t: Tensor, chunk: Optional[int]) -> Tensor:
    b = s.shape[0]
    dtype = _math_dtype(s, t)
    if b == 1:
        return _zero_loss((s, t), dtype)
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
    s, t = _check_embeddings(f_s, f_t, "f_s", "f_t", flatten=True)
    distance_weight = _check_real(distance_weight, "distance_weight")
    angle_weight = _check_real(angle_weight, "angle_weight")
    _check_chunk(angle_chunk, "angle_chunk")
    _check_chunk(distance_chunk, "distance_chunk")
    total = _zero_loss((s, t), _math_dtype(s, t))
    if distance_weight != 0:
        total = total + distance_weight * _rkd_distance(s, t, distance_chunk)
    if angle_weight != 0:
        total = total + angle_weight * _rkd_angle(s, t, angle_chunk)
    return total.to(_out_dtype(s, t))


# ---------------------------------------------------------------------------------------------
# CC (Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019)
# ---------------------------------------------------------------------------------------------
def cc_correlation(emb: Tensor, gamma: float = 0.4, p_order: int = 2) -> Tensor:
    """The batch correlation matrix with the Taylor-expanded Gaussian RBF kernel of the CC paper:
    ``psi[i, j] = exp(-2 gamma) sum_{p=0..P} (2 gamma)^p / p! (e_i . e_j)^p`` (``(B, B)``, math dtype).

    It equals ``exp(-gamma ||e_i - e_j||^2)`` to order P when the embeddings have unit norm."""
    x = emb.to(_math_dtype(emb))
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
    s, t = _check_embeddings(emb_s, emb_t, "emb_s", "emb_t")
    gamma = _check_real(gamma, "gamma", positive=True)
    if isinstance(p_order, bool) or not isinstance(p_order, int) or p_order < 0:
        raise ValueError(f"p_order must be an int >= 0, got {p_order!r}")
    _check_chunk(chunk)
    dtype = _math_dtype(s, t)
    b = s.shape[0]
    if b == 1:
        return _zero_loss((s, t), dtype).to(_out_dtype(s, t))
    x_s, x_t = s.to(dtype), t.to(dtype)
    rows = chunk or _default_rows(b, max(x_s.shape[1], x_t.shape[1]))

    def block(start: int, stop: int, x_s: Tensor, x_t: Tensor) -> Tensor:
        diff = (_rbf_taylor(x_t[start:stop] @ x_t.T, gamma, p_order)
                - _rbf_taylor(x_s[start:stop] @ x_s.T, gamma, p_order))
        return diff.square().sum()

    return (_sum_over_row_blocks(block, b, rows, x_s, x_t) / (b * b)).to(_out_dtype(s, t))


# ---------------------------------------------------------------------------------------------
# CRD (Tian et al., Contrastive Representation Distillation, ICLR 2020)
# ---------------------------------------------------------------------------------------------
_NCE_EPS = 1e-7  # RepDistiller's ContrastLoss epsilon


class CRDMemory(nn.Module):
    """CRD's memory bank: one L2-normalised embedding per training sample for each network.

    Buffers (in ``state_dict``, moved by ``.to``): ``memory_s`` and ``memory_t`` of shape
    ``(num_data, dim)``, initialised uniformly in ``[-1/sqrt(dim/3), 1/sqrt(dim/3)]`` as RepDistiller
    does; ``z_s`` and ``z_t``, the NCE normalisation constants, -1 until :func:`crd_loss` sets them
    from its first batch (``mean(exp(score / tau)) * num_data``, RepDistiller's rule) and fixed after.
    ``momentum`` (0.5, RepDistiller's ``nce_m``) is the weight of the old entry in :meth:`update`.
    The bank knows nothing of processes: under data parallelism the CRD distiller writes the global
    batch into every process's bank, which keeps them equal.
    """

    def __init__(self, num_data: int, dim: int = 128, momentum: float = 0.5,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        for value, name in ((num_data, "num_data"), (dim, "dim")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        momentum = _check_real(momentum, "momentum")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_data, self.dim, self.momentum = num_data, dim, momentum
        bound = 1.0 / math.sqrt(dim / 3.0)
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(num_data, dim, generator=generator) * (2 * bound) - bound
            self.register_buffer(name, bank)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    def _check(self, indices: Tensor, emb: Tensor, name: str) -> None:
        _check_float(emb, name)
        _check_ndim(emb, name, 2, f"(B, {self.dim})")
        if emb.shape[1] != self.dim:
            raise ValueError(f"{name} must have the bank's width {self.dim}, got {emb.shape[1]}")
        if emb.shape[0] != indices.shape[0]:
            raise ValueError(f"{name} has {emb.shape[0]} rows but indices has {indices.shape[0]}")
        if emb.device != self.memory_s.device:
            raise ValueError(f"{name} is on {emb.device} but the memory bank is on {self.memory_s.device}")

    @torch.no_grad()
    def update(self, indices: Tensor, emb_s: Tensor, emb_t: Tensor) -> None:
        """``bank[i] = normalize(momentum * bank[i] + (1 - momentum) * emb)`` for both banks at the
        batch's dataset ``indices`` (``(B,)`` integers). The embeddings are L2-normalised first, as the
        CRD heads output them (a no-op for normalised ones). Duplicate indices: one of the rows wins."""
        if not isinstance(indices, Tensor) or indices.ndim != 1:
            got = getattr(indices, "shape", type(indices))
            raise ValueError(f"indices must be a (B,) tensor of dataset indices, got {got}")
        indices = _check_labels(indices, indices.shape[0], "indices")
        for bank, emb, name in ((self.memory_s, emb_s, "emb_s"), (self.memory_t, emb_t, "emb_t")):
            self._check(indices, emb, name)
            emb = F.normalize(emb.detach().to(bank.dtype), p=2.0, dim=1)
            mixed = bank.index_select(0, indices) * self.momentum + emb * (1.0 - self.momentum)
            bank.index_copy_(0, indices, F.normalize(mixed, p=2.0, dim=1))

    def extra_repr(self) -> str:
        return f"num_data={self.num_data}, dim={self.dim}, momentum={self.momentum}"


def crd_sample_indices(index: Tensor, num_data: int, k: int = 16384, generator: Optional[torch.Generator] = None, *,
                       target: Optional[Tensor] = None, data_labels: Optional[Tensor] = None) -> Tensor:
    """Contrast indices for :func:`crd_loss`: ``(B, k + 1)`` longs, column 0 the positive (``index``,
    the samples' own dataset indices), columns 1.. ``k`` negatives drawn uniformly with replacement.

    Without labels the negatives are uniform over the whole dataset (RepDistiller's in-memory
    sampler). With ``target`` (``(B,)`` labels of the batch) and ``data_labels`` (``(num_data,)``
    labels of the dataset) they are uniform over the samples of the other classes, like
    RepDistiller's CIFAR-100 "exact" mode (which draws without replacement when it can; with
    ``k = 16384`` of ~49500 candidates the difference is small). ``generator`` lives on the device of
    ``index`` and makes the draw reproducible.
    """
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"num_data must be a positive int, got {num_data!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(index, Tensor) or index.ndim != 1:
        raise ValueError(f"index must be a (B,) tensor of dataset indices, got {getattr(index, 'shape', type(index))}")
    index = _check_labels(index, index.shape[0], "index")
    b, device = index.shape[0], index.device
    if (target is None) != (data_labels is None):
        raise ValueError("target and data_labels must be given together (class-aware negatives) or not at all")
    if target is None:
        negatives = torch.randint(0, num_data, (b, k), generator=generator, device=device)
    else:
        target = _check_labels(target, b, "target")
        data_labels = _check_labels(data_labels, num_data, "data_labels")
        order = torch.argsort(data_labels, stable=True)
        num_classes = int(torch.maximum(data_labels.max(), target.max())) + 1
        counts = torch.bincount(data_labels, minlength=num_classes)
        starts = torch.cumsum(counts, 0) - counts
        own_start, own_count = starts[target][:, None], counts[target][:, None]
        if bool((own_count >= num_data).any()):
            raise ValueError("data_labels has no sample outside some batch sample's class: no negatives to draw")
        # Uniform position among the other classes' samples: skip over the own class's block of the
        # label-sorted order.
        u = torch.rand((b, k), generator=generator, device=device, dtype=torch.float64)
        pos = (u * (num_data - own_count)).long().clamp_max(num_data - own_count - 1).clamp_min(0)
        pos = torch.where(pos >= own_start, pos + own_count, pos)
        negatives = order[pos]
    return torch.cat((index[:, None], negatives), dim=1)


def _nce_loss(scores: Tensor, num_data: int) -> Tensor:
    """RepDistiller's ContrastLoss (the CRD paper's eq. 18): column 0 the positive, the others the
    ``m`` noise samples of probability ``Pn = 1 / num_data``;
    ``-(sum log(P_pos / (P_pos + m Pn + eps)) + sum log(m Pn / (P_neg + m Pn + eps))) / B``."""
    b, m = scores.shape[0], scores.shape[1] - 1
    noise = m / num_data
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + noise + _NCE_EPS))
    log_d0 = torch.log(noise / (scores[:, 1:] + noise + _NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / b


def crd_loss(emb_s: Tensor, emb_t: Tensor, index: Tensor, memory: CRDMemory, contrast_idx: Optional[Tensor] = None, *,
             tau: float = 0.07, k: int = 16384, generator: Optional[torch.Generator] = None,
             update: bool = True) -> Tensor:
    """CRD's symmetric NCE loss against the memory bank (RepDistiller's ``CRDLoss``, after the heads).

    ``emb_s`` / ``emb_t``: ``(B, dim)`` embeddings of the two heads (RepDistiller: Linear to 128,
    L2 norm; both trainable); they are L2-normalised here again, which changes neither a normalised
    value nor the gradient reaching the head. For each sample, the teacher embedding is scored
    against the student bank's entries ``contrast_idx`` (column 0 its own, then the negatives) and
    the student embedding against the teacher bank's: ``P = exp(e . m / tau) / Z``, with ``Z`` set
    once from the first batch (see :class:`CRDMemory`). The loss is the sum of the two NCE terms
    (:func:`_nce_loss`); the banks enter as constants. Then, if ``update``, the banks take the
    batch's embeddings (:meth:`CRDMemory.update`) after the scores are computed, as in RepDistiller.

    Defaults: ``tau = 0.07``, ``k = 16384`` negatives (RepDistiller's ``nce_t``, ``nce_k``); the loss
    weight 0.8 is the caller's. Without ``contrast_idx`` the indices come from
    :func:`crd_sample_indices` with ``generator`` (uniform negatives). ``index``: ``(B,)`` dataset
    indices of the batch.
    """
    if not isinstance(memory, CRDMemory):
        raise TypeError(f"memory must be a CRDMemory, got {type(memory).__name__}")
    s, t = _check_embeddings(emb_s, emb_t, "emb_s", "emb_t")
    index = _check_labels(index, s.shape[0], "index")
    memory._check(index, s, "emb_s")
    memory._check(index, t, "emb_t")
    tau = _check_real(tau, "tau", positive=True)
    if contrast_idx is None:
        contrast_idx = crd_sample_indices(index, memory.num_data, k, generator)
    elif (not isinstance(contrast_idx, Tensor) or contrast_idx.ndim != 2 or contrast_idx.shape[0] != s.shape[0]
          or contrast_idx.shape[1] < 2 or contrast_idx.is_floating_point()):
        got = tuple(contrast_idx.shape) if isinstance(contrast_idx, Tensor) else type(contrast_idx).__name__
        raise ValueError(f"contrast_idx must be a (B, 1 + K) integer tensor with B = {s.shape[0]}, K >= 1, got {got}")
    contrast_idx = contrast_idx.long()
    dtype = _math_dtype(s, t)
    e_s = F.normalize(s.to(dtype), p=2.0, dim=1)
    e_t = F.normalize(t.to(dtype), p=2.0, dim=1)
    b, cols = contrast_idx.shape

    def exp_scores(bank: Tensor, anchor: Tensor) -> Tensor:
        rows = bank.index_select(0, contrast_idx.reshape(-1)).to(dtype).reshape(b, cols, -1)
        return torch.exp(torch.bmm(rows, anchor[:, :, None]).squeeze(2) / tau)

    out_t = exp_scores(memory.memory_s, e_t)  # teacher anchor against the student bank
    out_s = exp_scores(memory.memory_t, e_s)  # student anchor against the teacher bank
    with torch.no_grad():
        # Set once, on the device and without a host read: -1 means "not set yet".
        for z, out in ((memory.z_s, out_s), (memory.z_t, out_t)):
            z.copy_(torch.where(z < 0, out.mean().to(z.dtype) * memory.num_data, z))
    # copies: the graph must not hold the buffers that a later call writes in place
    z_s, z_t = memory.z_s.to(dtype).clone(), memory.z_t.to(dtype).clone()
    loss = _nce_loss(out_s / z_s, memory.num_data) + _nce_loss(out_t / z_t, memory.num_data)
    if update:
        memory.update(index, e_s, e_t)
    return loss.to(_out_dtype(s, t))


def crd_inbatch_loss(emb_s: Tensor, emb_t: Tensor, tau: float = 0.07) -> Tensor:
    """CRD without a memory bank: symmetric InfoNCE over the batch.

    With ``S = normalize(emb_s) normalize(emb_t)^T / tau`` (``(B, B)``), the loss is the mean of the
    cross-entropies of the rows (student anchors, the teacher's own sample positive, the other
    samples negatives) and of the columns (teacher anchors), each a mean over the batch.
    ``emb_s`` / ``emb_t``: ``(B, D)``, same D. ``tau = 0.07`` as CRD. A batch of one sample gives
    exactly 0 (there are no negatives).
    """
    s, t = _check_embeddings(emb_s, emb_t, "emb_s", "emb_t")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"emb_s and emb_t must have the same width to be compared: {s.shape[1]} vs {t.shape[1]}")
    tau = _check_real(tau, "tau", positive=True)
    dtype = _math_dtype(s, t)
    b = s.shape[0]
    if b == 1:
        return _zero_loss((s, t), dtype).to(_out_dtype(s, t))
    logits = F.normalize(s.to(dtype), p=2.0, dim=1) @ F.normalize(t.to(dtype), p=2.0, dim=1).T / tau
    labels = torch.arange(b, device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss.to(_out_dtype(s, t))

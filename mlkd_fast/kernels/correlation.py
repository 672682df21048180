"""Batch-correlation KL (docs/design.md §1.2), tiled like flash attention: the (M, N) matrices never exist.

For each network, with inverse row norms r = 1 / max(||x||, eps):
    x_ij = (a_i . b_j) r^a_i r^b_j / tau            (student: x^s, teacher: x^t)
    l_i  = sum_j P_ij (log P_ij - log Q_ij),  P = softmax_j(x^t), Q = softmax_j(x^s)
         = A_i / Z^t_i - lse^t_i + lse^s_i,   A_i = sum_j e^(x^t_ij - m^t_i) (x^t_ij - x^s_ij)
The forward streams column tiles, keeping per row the online maxima, sums and A (O(M) state), and
stores l, lse^s, lse^t. With d loss / d l_i = g_i the student gradient is
    d loss / d x^s_ij = g_i (Q_ij - P_ij)
    d loss / d a^_i   = sum_j g_i (Q_ij - P_ij) / tau * b^_j          (row pass, programs over rows)
    d loss / d b^_j   = sum_i g_i (Q_ij - P_ij) / tau * a^_i          (column pass, no atomics)
with a^ = a r^a; both passes recompute the tiles of x^s and x^t from the saved lse's, and
d a = r (d a^ - a^ (a^ . d a^)) (while ||a|| > eps) finishes the normalisation in PyTorch.

Work: forward 2 M N (Ds + Dt) flops; backward 2x that for the recomputation plus 2 M N Ds per pass.
Memory read: each program of the forward reads its row block once and every column block once:
(M/BM) * N * (Ds + Dt) elements; extra memory is O(M + N) (lse's, norms) beyond the gradients.
Few row blocks (4096 rows: 64 programs on 132 SMs) would leave the GPU idle, so the streamed dimension
is split over program_id(1) in spans of >= 256 (_splits): the forward's partial statistics are merged
by _corr_fwd_merge_kernel, the backward's partial rows summed, both in a fixed order (deterministic);
extra memory then O(splits * M * Ds).
The fused kernels hold (rows x features) tiles on chip, which limits the widths they take (_config);
wider features go the tiled path: matmuls of all rows against column tiles in the features' own
dtype with fp32 accumulation (cuBLAS tensor cores for fp16/bf16), each tile then read once by a
Triton kernel that updates the rows' online statistics (forward) or forms the backward's two matmul
operands; extra memory a few tiles of TILED_ELEMENTS entries, never an M x N matrix.
Dtypes: fp32, fp16 and bf16 features run the fused kernels (or the tiled path) with fp32 math, the
student and the teacher each in its own dtype (the backward takes fp16 student rows scaled to a common
norm by powers of two, _unit_scaled, so that norms spread over many decades cannot underflow its
operands). fp64 anywhere makes every operand fp64 and takes the
tiled path with fp64 math throughout (torch's fp64 matmuls, the tile kernels in fp64): tl.dot has no
fp64 tensor-core tiles in the fused kernels' configurations, and fp64 inputs must keep fp64 math.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import ops
from ..ops import NORM_EPS
from ._device import sm_count


@triton.jit
def _host_scalar(x, ACC: tl.constexpr):
    """A float kernel argument declared ``tl.float64`` in the math dtype ACC. (tl.full, not tl.cast: under
    the interpreter the argument is a Python float, which tl.cast would round to fp32 first.)"""
    return tl.full([], x, ACC)


@triton.jit
def _sim_tile(
    A_ptr, A_stride, rows, row_ok, RA,  # row features (M, D), their (BM,) indices/mask/inverse norms
    B_ptr, B_stride, cols, col_ok, RB,  # column features (N, D)
    D, inv_tau,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """(BM, BN) tile of the scaled cosine similarities x_ij = a_i.b_j r_i r_j / tau (fp32)."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    a = tl.load(A_ptr + rows[:, None].to(tl.int64) * A_stride + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    b = tl.load(B_ptr + cols[:, None].to(tl.int64) * B_stride + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    dots = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return dots * (RA * inv_tau)[:, None] * RB[None, :]


@triton.jit
def _valid_tile(rows, cols, col_ok, EXCLUDE_DIAG: tl.constexpr):
    ok = col_ok[None, :] & (rows[:, None] >= 0)
    if EXCLUDE_DIAG:
        ok = ok & (rows[:, None] != cols[None, :])
    return ok


@triton.jit
def _absorb_tile(x_s, x_t, ok, m_s, z_s, m_t, z_t, acc):
    """The rows' online statistics (maxima m, sums Z, A) after one (BM, BN) tile of x^s and x^t; entries
    outside ``ok`` take no part."""
    x_s = tl.where(ok, x_s, -float("inf"))
    x_t = tl.where(ok, x_t, -float("inf"))
    new_m_s = tl.maximum(m_s, tl.max(x_s, axis=1))
    ref_s = tl.where(new_m_s == -float("inf"), 0.0, new_m_s)
    z_s = z_s * tl.exp(m_s - ref_s) + tl.sum(tl.exp(x_s - ref_s[:, None]), axis=1)
    new_m_t = tl.maximum(m_t, tl.max(x_t, axis=1))
    ref_t = tl.where(new_m_t == -float("inf"), 0.0, new_m_t)
    rescale = tl.exp(m_t - ref_t)
    e_t = tl.exp(x_t - ref_t[:, None])
    z_t = z_t * rescale + tl.sum(e_t, axis=1)
    acc = acc * rescale + tl.sum(tl.where(ok, e_t * (x_t - x_s), 0.0), axis=1)
    return new_m_s, z_s, new_m_t, z_t, acc


@triton.jit
def _store_rows(m_s, z_s, m_t, z_t, acc, rows, row_ok, Loss_ptr, LseS_ptr, LseT_ptr):
    """l = A / Z^t - lse^t + lse^s and both lse's from the final statistics."""
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    tl.store(Loss_ptr + rows, acc / z_t - lse_t + lse_s, mask=row_ok)
    tl.store(LseS_ptr + rows, lse_s, mask=row_ok)
    tl.store(LseT_ptr + rows, lse_t, mask=row_ok)


@triton.jit
def _corr_fwd_kernel(
    AS_ptr, AS_stride, AT_ptr, AT_stride,  # student (M, Ds), teacher (M, Dt) row features
    BS_ptr, BS_stride, BT_ptr, BT_stride,  # student (N, Ds), teacher (N, Dt) column features
    RAS_ptr, RAT_ptr, RBS_ptr, RBT_ptr,  # fp32 inverse norms (M,), (M,), (N,), (N,)
    Loss_ptr, LseS_ptr, LseT_ptr,  # (M,) fp32 outputs: l_i, lse^s_i, lse^t_i
    Part_ptr,  # (5, splits, M) fp32 partial m^s, Z^s, m^t, Z^t, A when SPLIT
    M, N, DS, DT, inv_tau, SPAN,  # columns [program_id(1) SPAN, + SPAN), SPAN a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ra_s = tl.load(RAS_ptr + rows, mask=row_ok, other=0.0)
    ra_t = tl.load(RAT_ptr + rows, mask=row_ok, other=0.0)
    m_s = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    m_t = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    z_s = tl.zeros((BLOCK_M,), tl.float32)
    z_t = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    col_begin = tl.program_id(1) * SPAN
    for start in range(col_begin, tl.minimum(N, col_begin + SPAN), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        rb_s = tl.load(RBS_ptr + cols, mask=col_ok, other=0.0)
        rb_t = tl.load(RBT_ptr + cols, mask=col_ok, other=0.0)
        x_s = _sim_tile(AS_ptr, AS_stride, rows, row_ok, ra_s, BS_ptr, BS_stride, cols, col_ok, rb_s,
                        DS, inv_tau, BLOCK_DS, PRECISION)
        x_t = _sim_tile(AT_ptr, AT_stride, rows, row_ok, ra_t, BT_ptr, BT_stride, cols, col_ok, rb_t,
                        DT, inv_tau, BLOCK_DT, PRECISION)
        ok = _valid_tile(rows, cols, col_ok, EXCLUDE_DIAG)
        m_s, z_s, m_t, z_t, acc = _absorb_tile(x_s, x_t, ok, m_s, z_s, m_t, z_t, acc)
    if SPLIT:
        plane = tl.num_programs(1) * M
        part = Part_ptr + tl.program_id(1) * M + rows
        tl.store(part, m_s, mask=row_ok)
        tl.store(part + plane, z_s, mask=row_ok)
        tl.store(part + 2 * plane, m_t, mask=row_ok)
        tl.store(part + 3 * plane, z_t, mask=row_ok)
        tl.store(part + 4 * plane, acc, mask=row_ok)
    else:
        _store_rows(m_s, z_s, m_t, z_t, acc, rows, row_ok, Loss_ptr, LseS_ptr, LseT_ptr)


@triton.jit
def _corr_fwd_merge_kernel(
    Part_ptr,  # (5, SPLITS, M) ACC partial m^s, Z^s, m^t, Z^t, A of each column span
    Loss_ptr, LseS_ptr, LseT_ptr,  # (M,) ACC outputs
    M, SPLITS,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """The spans' statistics rescaled to the overall maxima and summed: l, lse^s, lse^t per row."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    plane = SPLITS * M
    m_s = tl.full((BLOCK,), -float("inf"), ACC)
    m_t = tl.full((BLOCK,), -float("inf"), ACC)
    for z in range(0, SPLITS):
        m_s = tl.maximum(m_s, tl.load(Part_ptr + z * M + rows, mask=row_ok, other=-float("inf")))
        m_t = tl.maximum(m_t, tl.load(Part_ptr + 2 * plane + z * M + rows, mask=row_ok, other=-float("inf")))
    ref_s = tl.where(m_s == -float("inf"), 0.0, m_s)
    ref_t = tl.where(m_t == -float("inf"), 0.0, m_t)
    z_s = tl.zeros((BLOCK,), ACC)
    z_t = tl.zeros((BLOCK,), ACC)
    acc = tl.zeros((BLOCK,), ACC)
    for z in range(0, SPLITS):
        part = Part_ptr + z * M + rows
        z_s += tl.load(part + plane, mask=row_ok, other=0.0) * tl.exp(
            tl.load(part, mask=row_ok, other=-float("inf")) - ref_s)
        r_t = tl.exp(tl.load(part + 2 * plane, mask=row_ok, other=-float("inf")) - ref_t)
        z_t += tl.load(part + 3 * plane, mask=row_ok, other=0.0) * r_t
        acc += tl.load(part + 4 * plane, mask=row_ok, other=0.0) * r_t
    _store_rows(ref_s, z_s, ref_t, z_t, acc, rows, row_ok, Loss_ptr, LseS_ptr, LseT_ptr)


@triton.jit
def _corr_bwd_rows_kernel(
    AS_ptr, AS_stride, AT_ptr, AT_stride,  # row features
    BS_ptr, BS_stride, BT_ptr, BT_stride,  # column features
    RAS_ptr, RAT_ptr, RBS_ptr, RBT_ptr,  # inverse norms
    LseS_ptr, LseT_ptr, G_ptr,  # (M,) saved lse's and d loss / d l_i
    Scale_ptr,  # (1,) fp32 power of two: min(N, 1024) / max_j r^b_j
    DA_ptr, DA_stride, DA_split_stride,  # (splits, M, Ds) fp32 out: d loss / d a^ (normalised rows), per span
    M, N, DS, DT, inv_tau, SPAN,  # columns [program_id(1) SPAN, + SPAN)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ra_s = tl.load(RAS_ptr + rows, mask=row_ok, other=0.0)
    ra_t = tl.load(RAT_ptr + rows, mask=row_ok, other=0.0)
    lse_s = tl.load(LseS_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(LseT_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(G_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(Scale_ptr)
    d = tl.arange(0, BLOCK_DS)
    d_ok = d < DS
    acc = tl.zeros((BLOCK_M, BLOCK_DS), tl.float32)
    col_begin = tl.program_id(1) * SPAN
    for start in range(col_begin, tl.minimum(N, col_begin + SPAN), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        rb_s = tl.load(RBS_ptr + cols, mask=col_ok, other=0.0)
        rb_t = tl.load(RBT_ptr + cols, mask=col_ok, other=0.0)
        x_s = _sim_tile(AS_ptr, AS_stride, rows, row_ok, ra_s, BS_ptr, BS_stride, cols, col_ok, rb_s,
                        DS, inv_tau, BLOCK_DS, PRECISION)
        x_t = _sim_tile(AT_ptr, AT_stride, rows, row_ok, ra_t, BT_ptr, BT_stride, cols, col_ok, rb_t,
                        DT, inv_tau, BLOCK_DT, PRECISION)
        ok = _valid_tile(rows, cols, col_ok, EXCLUDE_DIAG)
        q = tl.where(ok, tl.exp(x_s - lse_s[:, None]), 0.0)
        p = tl.where(ok, tl.exp(x_t - lse_t[:, None]), 0.0)
        # d loss / d a^_i = g_i / tau * sum_j [(Q - P)_ij r^b_j] b_j; the bracket, scaled by a power of
        # two to about 1024 / N, is the matmul operand in the input dtype (unscaled it underflows fp16).
        w = (q - p) * (rb_s * scale)[None, :]
        b = tl.load(BS_ptr + cols[:, None].to(tl.int64) * BS_stride + d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(w.to(b.dtype), b, input_precision=PRECISION)
    acc = acc * (g * inv_tau / scale)[:, None]
    out = DA_ptr + tl.program_id(1).to(tl.int64) * DA_split_stride
    tl.store(out + rows[:, None].to(tl.int64) * DA_stride + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _corr_bwd_cols_kernel(
    AS_ptr, AS_stride, AT_ptr, AT_stride,  # row features
    BS_ptr, BS_stride, BT_ptr, BT_stride,  # column features
    RAS_ptr, RAT_ptr, RBS_ptr, RBT_ptr,  # inverse norms
    LseS_ptr, LseT_ptr, G_ptr,  # (M,) saved lse's and d loss / d l_i
    Scale_ptr,  # (1,) fp32 power of two: min(M, 1024) / max_i |g_i r^a_i / tau|
    DB_ptr, DB_stride, DB_split_stride,  # (splits, N, Ds) fp32 out: d loss / d b^ (normalised columns), per span
    M, N, DS, DT, inv_tau, SPAN,  # rows [program_id(1) SPAN, + SPAN)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rb_s = tl.load(RBS_ptr + cols, mask=col_ok, other=0.0)
    rb_t = tl.load(RBT_ptr + cols, mask=col_ok, other=0.0)
    scale = tl.load(Scale_ptr)
    d = tl.arange(0, BLOCK_DS)
    d_ok = d < DS
    acc = tl.zeros((BLOCK_N, BLOCK_DS), tl.float32)
    row_begin = tl.program_id(1) * SPAN
    for start in range(row_begin, tl.minimum(M, row_begin + SPAN), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ra_s = tl.load(RAS_ptr + rows, mask=row_ok, other=0.0)
        ra_t = tl.load(RAT_ptr + rows, mask=row_ok, other=0.0)
        lse_s = tl.load(LseS_ptr + rows, mask=row_ok, other=0.0)
        lse_t = tl.load(LseT_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(G_ptr + rows, mask=row_ok, other=0.0)
        x_s = _sim_tile(AS_ptr, AS_stride, rows, row_ok, ra_s, BS_ptr, BS_stride, cols, col_ok, rb_s,
                        DS, inv_tau, BLOCK_DS, PRECISION)
        x_t = _sim_tile(AT_ptr, AT_stride, rows, row_ok, ra_t, BT_ptr, BT_stride, cols, col_ok, rb_t,
                        DT, inv_tau, BLOCK_DT, PRECISION)
        ok = _valid_tile(rows, cols, col_ok, EXCLUDE_DIAG) & row_ok[:, None]
        q = tl.where(ok, tl.exp(x_s - lse_s[:, None]), 0.0)
        p = tl.where(ok, tl.exp(x_t - lse_t[:, None]), 0.0)
        # d loss / d b^_j = sum_i [g_i (Q - P)_ij / tau * r^a_i] a_i, the bracket scaled as in the row pass
        w = (g * inv_tau * ra_s * scale)[:, None] * (q - p)
        a = tl.load(AS_ptr + rows[:, None].to(tl.int64) * AS_stride + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(w.to(a.dtype)), a, input_precision=PRECISION)
    acc = acc / scale
    out = DB_ptr + tl.program_id(1).to(tl.int64) * DB_split_stride
    tl.store(out + cols[:, None].to(tl.int64) * DB_stride + d[None, :], acc, mask=col_ok[:, None] & d_ok[None, :])


@triton.jit
def _tile_stats_kernel(
    XS_ptr, XT_ptr, X_stride,  # (M, W) ACC raw dots a_i . b_j of one column tile (cuBLAS), student/teacher
    RAS_ptr, RAT_ptr, RBS_ptr, RBT_ptr,  # ACC inverse norms of the rows (M,) and of the tile's columns (W,)
    State_ptr,  # (5, M) ACC running m^s, Z^s, m^t, Z^t, A of each row, read and written back
    M, W, COL0, inv_tau: tl.float64,  # the tile holds columns [COL0, COL0 + W)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, ACC: tl.constexpr,
):
    """Tiled path, forward: absorbs one matmul tile into the rows' online statistics. Reads the two
    fp32 tiles once (8 B per entry) and 20 B of state per row: the statistics cost a fraction of the
    tile's matmuls instead of a dozen PyTorch passes over it."""
    inv_tau = _host_scalar(inv_tau, ACC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ra_s = tl.load(RAS_ptr + rows, mask=row_ok, other=0.0) * inv_tau
    ra_t = tl.load(RAT_ptr + rows, mask=row_ok, other=0.0) * inv_tau
    m_s = tl.load(State_ptr + rows, mask=row_ok, other=-float("inf"))
    z_s = tl.load(State_ptr + M + rows, mask=row_ok, other=0.0)
    m_t = tl.load(State_ptr + 2 * M + rows, mask=row_ok, other=-float("inf"))
    z_t = tl.load(State_ptr + 3 * M + rows, mask=row_ok, other=0.0)
    acc = tl.load(State_ptr + 4 * M + rows, mask=row_ok, other=0.0)
    row_off = rows.to(tl.int64) * X_stride
    for start in range(0, W, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < W
        tile_ok = row_ok[:, None] & col_ok[None, :]
        x_s = tl.load(XS_ptr + row_off[:, None] + cols[None, :], mask=tile_ok, other=0.0)
        x_t = tl.load(XT_ptr + row_off[:, None] + cols[None, :], mask=tile_ok, other=0.0)
        x_s = x_s * ra_s[:, None] * tl.load(RBS_ptr + cols, mask=col_ok, other=0.0)[None, :]
        x_t = x_t * ra_t[:, None] * tl.load(RBT_ptr + cols, mask=col_ok, other=0.0)[None, :]
        ok = _valid_tile(rows, COL0 + cols, col_ok, EXCLUDE_DIAG)
        m_s, z_s, m_t, z_t, acc = _absorb_tile(x_s, x_t, ok, m_s, z_s, m_t, z_t, acc)
    tl.store(State_ptr + rows, m_s, mask=row_ok)
    tl.store(State_ptr + M + rows, z_s, mask=row_ok)
    tl.store(State_ptr + 2 * M + rows, m_t, mask=row_ok)
    tl.store(State_ptr + 3 * M + rows, z_t, mask=row_ok)
    tl.store(State_ptr + 4 * M + rows, acc, mask=row_ok)


@triton.jit
def _tile_grad_operands_kernel(
    XS_ptr, XT_ptr, X_stride,  # (M, W) ACC raw dots of one column tile, student and teacher
    RAS_ptr, RAT_ptr, RBS_ptr, RBT_ptr,  # inverse norms: rows (M,), the tile's columns (W,)
    LseS_ptr, LseT_ptr, G_ptr,  # (M,) saved lse's and d loss / d l_i
    RowScale_ptr, ColScale_ptr,  # (1,) fp32 powers of two (operand_scale) of the two operands
    WR_ptr, WC_ptr, W_stride,  # (M, W) outputs in the features' dtype
    M, W, COL0, inv_tau: tl.float64,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, ACC: tl.constexpr,
):
    """Tiled path, backward: the matmul operands of one column tile from the recomputed dots,
        WR_ij = (Q - P)_ij r^b_j S_r                    (d a^ = g / (tau S_r) * WR b)
        WC_ij = (Q - P)_ij g_i r^a_i / tau S_c          (d b^ = WC^T a / S_c)
    as the fused row and column passes form them. Reads 8 B and writes 2 x 2 B (fp16/bf16) per entry."""
    inv_tau = _host_scalar(inv_tau, ACC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < W
    tile_ok = row_ok[:, None] & col_ok[None, :]
    ra_s = tl.load(RAS_ptr + rows, mask=row_ok, other=0.0) * inv_tau
    ra_t = tl.load(RAT_ptr + rows, mask=row_ok, other=0.0) * inv_tau
    rb_s = tl.load(RBS_ptr + cols, mask=col_ok, other=0.0)
    rb_t = tl.load(RBT_ptr + cols, mask=col_ok, other=0.0)
    lse_s = tl.load(LseS_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(LseT_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(G_ptr + rows, mask=row_ok, other=0.0)
    row_off = rows.to(tl.int64)[:, None] * X_stride + cols[None, :]
    x_s = tl.load(XS_ptr + row_off, mask=tile_ok, other=0.0) * ra_s[:, None] * rb_s[None, :]
    x_t = tl.load(XT_ptr + row_off, mask=tile_ok, other=0.0) * ra_t[:, None] * rb_t[None, :]
    ok = _valid_tile(rows, COL0 + cols, col_ok, EXCLUDE_DIAG) & row_ok[:, None]
    diff = tl.where(ok, tl.exp(x_s - lse_s[:, None]) - tl.exp(x_t - lse_t[:, None]), 0.0)
    w_rows = diff * (rb_s * tl.load(RowScale_ptr))[None, :]
    w_cols = diff * (g * ra_s * tl.load(ColScale_ptr))[:, None]
    out = rows.to(tl.int64)[:, None] * W_stride + cols[None, :]
    tl.store(WR_ptr + out, w_rows.to(WR_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(WC_ptr + out, w_cols.to(WC_ptr.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _inv_norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=ops.math_dtype(x)).clamp_min(NORM_EPS).reciprocal()


# (widest feature block, bytes per element) -> tile rows/columns, warps, pipeline stages. Chosen with
# tools/triton_build.py for sm_90 under Triton 3.6 and 3.8 (the versions CI compiles with): shared
# memory <= 134 KB (fits an A100's 163 KB too) and ptxas spills none or a few bytes. Larger tiles do
# not fit: 64-row tiles with 3 stages spill ~22 KB per thread in fp32 and overflow shared memory at
# 512 fp32 / 1024 fp16 features; fp32 features 128 wide need 16-row tiles (32-row ones spill
# 560-800 B under Triton 3.6). fp32 features multiply on tensor cores as three TF32 products
# ("tf32x3", about fp32 accuracy) instead of IEEE dots on the FMA units, which have ~1/7 of the TF32
# peak on an H100. Wider features need (rows x features) tiles beyond what an SM holds: they take the
# tiled path, no M x N matrix either.
_FUSED_CONFIGS = {
    2: ((128, 64, 4, 2), (256, 32, 4, 2), (512, 32, 4, 2)),
    4: ((64, 32, 8, 2), (128, 16, 4, 2)),
}


def _config(ds: int, dt: int, elem_bytes: int) -> Optional[dict]:
    """Launch configuration of the fused kernels, or None where the features are too wide for them."""
    block_ds = max(16, triton.next_power_of_2(ds))
    block_dt = max(16, triton.next_power_of_2(dt))
    for widest, block, warps, stages in _FUSED_CONFIGS[elem_bytes]:
        if max(block_ds, block_dt) <= widest:
            return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_DS=block_ds, BLOCK_DT=block_dt, num_warps=warps,
                        num_stages=stages)
    return None


MIN_SPLIT_SPAN = 256  # streamed rows/columns per program at least when split


def _splits(programs: int, streamed: int, block: int, device: torch.device) -> tuple[int, int]:
    """(splits, span) of the streamed dimension: about two programs per SM, spans >= MIN_SPLIT_SPAN
    and a multiple of the tile."""
    splits = min(2 * sm_count(device) // max(programs, 1), triton.cdiv(streamed, MIN_SPLIT_SPAN))
    if splits <= 1:
        return 1, max(streamed, 1)
    span = triton.cdiv(triton.cdiv(streamed, splits), block) * block
    return triton.cdiv(streamed, span), span


def _precision(*operands: Tensor) -> str:
    # Only fp32 operands read it: three TF32 products, about fp32 accuracy, on tensor cores.
    return "tf32x3" if any(x.dtype == torch.float32 for x in operands) else "tf32"


def _operands(a_s, a_t, b_s, b_t):
    """The features as the kernels read them: fp64 anywhere makes all four fp64 (the fp64 path);
    otherwise each network's rows and columns in one dtype (a tile's dot takes one), the student's
    and the teacher's each its own."""
    square = b_s is None
    given = (a_s, a_t) if square else (a_s, a_t, b_s, b_t)
    if ops.math_dtype(*given) == torch.float64:
        a_s, a_t, b_s, b_t = (None if x is None else x.to(torch.float64) for x in (a_s, a_t, b_s, b_t))
    elif not square:
        student, teacher = torch.promote_types(a_s.dtype, b_s.dtype), torch.promote_types(a_t.dtype, b_t.dtype)
        a_s, b_s = a_s.to(student), b_s.to(student)
        a_t, b_t = a_t.to(teacher), b_t.to(teacher)
    if square:
        b_s, b_t = a_s, a_t
    return square, a_s, a_t, b_s, b_t


def _math(a_s: Tensor) -> tuple[torch.dtype, object]:
    """(torch dtype, Triton dtype) of the statistics: fp64 on the fp64 path, else fp32."""
    math = ops.math_dtype(a_s)
    return math, (tl.float64 if math == torch.float64 else tl.float32)


def _fused_config(a_s: Tensor, a_t: Tensor, tiled: Optional[bool]) -> Optional[dict]:
    if tiled or a_s.dtype == torch.float64:  # fp64: the tiled path (see the module docstring)
        return None
    return _config(a_s.shape[1], a_t.shape[1], max(a_s.element_size(), a_t.element_size()))


TILED_ELEMENTS = 1 << 24  # entries of one (rows x columns) similarity tile on the tiled path
# aten::mm.dtype: fp16/bf16 operands, fp32 accumulation and output (cuBLAS; CUDA only, torch >= 2.8).
_MM_FP32_OUT = hasattr(torch.ops.aten.mm, "dtype")


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b accumulated and returned in fp32, operands as they are: what the fused kernels' tl.dot
    computes. On CUDA fp16/bf16 operands run on tensor cores; elsewhere they are widened to fp32 first,
    which gives the same products (exact in fp32) and the same fp32 sums. fp64 operands (the fp64
    path) multiply in fp64."""
    if a.dtype == torch.float64:
        return a @ b
    if a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16) and _MM_FP32_OUT:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


TILED_STATS_BLOCK = (16, 128)  # (rows, columns) per step of _tile_stats_kernel
TILED_GRAD_BLOCK = (32, 128)  # (rows, columns) per program of _tile_grad_operands_kernel


def _column_tiles(a_s, a_t, b_s, b_t):
    """The tiled path's column tiles: (slice, raw dots of the student, of the teacher), each dot tile
    (M, T) fp32 with T = TILED_ELEMENTS / M, from matmuls of the features in their own dtype."""
    m, n = a_s.shape[0], b_s.shape[0]
    width = max(1, min(n, TILED_ELEMENTS // max(m, 1)))
    for start in range(0, n, width):
        cols = slice(start, min(n, start + width))
        yield cols, _mm_fp32(a_s, b_s[cols].T), _mm_fp32(a_t, b_t[cols].T)


def _tiled_fwd(operands, tau: float, exclude_diagonal: bool):
    a_s, a_t, b_s, b_t, ra_s, ra_t, rb_s, rb_t = operands
    m = a_s.shape[0]
    math, acc = _math(a_s)
    # (5, 1, M): the running m^s, Z^s, m^t, Z^t, A, finished by the merge kernel as one span
    state = torch.zeros((5, 1, m), dtype=math, device=a_s.device)
    state[0].fill_(float("-inf"))
    state[2].fill_(float("-inf"))
    block_m, block_n = TILED_STATS_BLOCK
    for cols, x_s, x_t in _column_tiles(a_s, a_t, b_s, b_t):
        _tile_stats_kernel[(triton.cdiv(m, block_m),)](
            x_s, x_t, x_s.stride(0), ra_s, ra_t, rb_s[cols], rb_t[cols], state, m, x_s.shape[1], cols.start,
            1.0 / tau, BLOCK_M=block_m, BLOCK_N=block_n, EXCLUDE_DIAG=exclude_diagonal, ACC=acc)
    loss = torch.empty(m, dtype=math, device=a_s.device)
    lse_s, lse_t = torch.empty_like(loss), torch.empty_like(loss)
    _corr_fwd_merge_kernel[(triton.cdiv(m, 128),)](state, loss, lse_s, lse_t, m, 1, BLOCK=128, ACC=acc)
    return loss, lse_s, lse_t


def _tiled_bwd(g, operands, lse_s, lse_t, tau: float, exclude_diagonal: bool):
    """d loss / d a^ and d loss / d b^ (fp32) on the tiled path: per column tile the two matmul
    operands of the fused row and column passes (_tile_grad_operands_kernel, in the features' dtype,
    scaled against fp16 underflow by operand_scale), then two matmuls with fp32 accumulation."""
    a_s, _, b_s, _, ra_s, ra_t, rb_s, rb_t = operands
    m, n = a_s.shape[0], b_s.shape[0]
    math, acc = _math(a_s)
    row_scale, col_scale = operand_scale(rb_s, n), operand_scale(g * ra_s / tau, m)
    d_a_hat = torch.zeros((m, a_s.shape[1]), dtype=math, device=a_s.device)
    d_b_hat = torch.empty((n, b_s.shape[1]), dtype=math, device=a_s.device)
    block_m, block_n = TILED_GRAD_BLOCK
    for cols, x_s, x_t in _column_tiles(*operands[:4]):
        width = x_s.shape[1]
        w_rows = torch.empty((m, width), dtype=b_s.dtype, device=a_s.device)
        w_cols = torch.empty((m, width), dtype=a_s.dtype, device=a_s.device)
        _tile_grad_operands_kernel[(triton.cdiv(m, block_m), triton.cdiv(width, block_n))](
            x_s, x_t, x_s.stride(0), ra_s, ra_t, rb_s[cols], rb_t[cols], lse_s, lse_t, g, row_scale, col_scale,
            w_rows, w_cols, w_rows.stride(0), m, width, cols.start, 1.0 / tau,
            BLOCK_M=block_m, BLOCK_N=block_n, EXCLUDE_DIAG=exclude_diagonal, ACC=acc)
        d_a_hat += _mm_fp32(w_rows, b_s[cols])
        d_b_hat[cols] = _mm_fp32(w_cols.T, a_s)
    return d_a_hat * (g / (tau * row_scale))[:, None], d_b_hat / col_scale


def _launch_fwd(a_s, a_t, b_s, b_t, tau: float, exclude_diagonal: bool, tiled: Optional[bool] = None):
    """``tiled`` forces the tiled path (tests); by default it takes features too wide for the fused kernels."""
    square, a_s, a_t, b_s, b_t = _operands(a_s, a_t, b_s, b_t)
    m, n = a_s.shape[0], b_s.shape[0]
    ra_s, ra_t = _inv_norms(a_s), _inv_norms(a_t)
    rb_s, rb_t = (ra_s, ra_t) if square else (_inv_norms(b_s), _inv_norms(b_t))
    cfg = _fused_config(a_s, a_t, tiled)
    if cfg is None:
        return _tiled_fwd((a_s, a_t, b_s, b_t, ra_s, ra_t, rb_s, rb_t), tau, exclude_diagonal)
    loss = torch.empty(m, dtype=torch.float32, device=a_s.device)
    lse_s, lse_t = torch.empty_like(loss), torch.empty_like(loss)
    programs = triton.cdiv(m, cfg["BLOCK_M"])
    splits, span = _splits(programs, n, cfg["BLOCK_N"], a_s.device)
    # Unsplit, the kernel never touches the partials: any fp32 pointer will do.
    partials = torch.empty((5, splits, m), dtype=torch.float32, device=a_s.device) if splits > 1 else loss
    _corr_fwd_kernel[(programs, splits)](
        a_s, a_s.stride(0), a_t, a_t.stride(0), b_s, b_s.stride(0), b_t, b_t.stride(0),
        ra_s, ra_t, rb_s, rb_t, loss, lse_s, lse_t, partials,
        m, n, a_s.shape[1], a_t.shape[1], 1.0 / tau, span,
        EXCLUDE_DIAG=exclude_diagonal, PRECISION=_precision(a_s, a_t), SPLIT=splits > 1, **cfg,
    )
    if splits > 1:
        _corr_fwd_merge_kernel[(triton.cdiv(m, 128),)](partials, loss, lse_s, lse_t, m, splits, BLOCK=128,
                                                       ACC=tl.float32)
    return loss, lse_s, lse_t


def _norm_backward(x: Tensor, inv_norm: Tensor, d_hat: Tensor) -> Tensor:
    """Gradient through x^ = x / max(||x||, eps) given d loss / d x^ (in the math dtype)."""
    x_hat = x.to(d_hat.dtype) * inv_norm[:, None]
    radial = (x_hat * d_hat).sum(dim=1, keepdim=True) * (inv_norm < 1.0 / NORM_EPS)[:, None]
    return inv_norm[:, None] * (d_hat - x_hat * radial)


def operand_scale(factors: Tensor, count: int) -> Tensor:
    """(1,) fp32 power of two S with max |factors| * S about min(count, 1024), on the device (no sync).

    The backward's matmul operand (Q - P)_ij times a per-row or per-column factor is of size ~1/count
    times the factor; in fp16 it underflows at a few thousand rows (or large feature norms). Scaled by
    S it is ~1024 / count at most 1024, and the fp32 result is divided by S exactly.
    """
    peak = factors.abs().amax().clamp_min(1e-30)
    return torch.exp2(torch.floor(torch.log2(min(count, 1024) / peak))).reshape(1)


def _fused_bwd(cfg, g, a_s, a_t, b_s, b_t, ra_s, ra_t, rb_s, rb_t, lse_s, lse_t, tau: float, exclude_diagonal: bool):
    """d loss / d a^ and d loss / d b^ (fp32) from the row and column passes."""
    m, n, ds = a_s.shape[0], b_s.shape[0], a_s.shape[1]
    common = (a_s, a_s.stride(0), a_t, a_t.stride(0), b_s, b_s.stride(0), b_t, b_t.stride(0),
              ra_s, ra_t, rb_s, rb_t, lse_s, lse_t, g)
    sizes = (m, n, ds, a_t.shape[1], 1.0 / tau)
    precision = _precision(a_s, a_t)
    row_programs, col_programs = triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"])
    # Row pass: columns split; column pass: rows split; the spans' partial rows summed in order.
    splits, span = _splits(row_programs, n, cfg["BLOCK_N"], a_s.device)
    d_a_hat = torch.empty((splits, m, ds), dtype=torch.float32, device=a_s.device)
    _corr_bwd_rows_kernel[(row_programs, splits)](
        *common, operand_scale(rb_s, n), d_a_hat, d_a_hat.stride(1), d_a_hat.stride(0), *sizes, span,
        EXCLUDE_DIAG=exclude_diagonal, PRECISION=precision, **cfg)
    splits, span = _splits(col_programs, m, cfg["BLOCK_M"], a_s.device)
    d_b_hat = torch.empty((splits, n, ds), dtype=torch.float32, device=a_s.device)
    _corr_bwd_cols_kernel[(col_programs, splits)](
        *common, operand_scale(g * ra_s / tau, m), d_b_hat, d_b_hat.stride(1), d_b_hat.stride(0), *sizes, span,
        EXCLUDE_DIAG=exclude_diagonal, PRECISION=precision, **cfg)
    d_a_hat = d_a_hat[0] if d_a_hat.shape[0] == 1 else d_a_hat.sum(0)
    d_b_hat = d_b_hat[0] if d_b_hat.shape[0] == 1 else d_b_hat.sum(0)
    return d_a_hat, d_b_hat


def _pass_inv_norms(x: Tensor, inv_norm: Tensor) -> Tensor:
    """The student's inverse norms as the backward passes take them: 0 for all-zero rows. Such a row's
    similarities are 0 whatever its factor and its matmul contribution is exactly 0, but its clamped
    1 / eps would set the fp16/bf16 operand scale (operand_scale) and flush every other entry of the
    operands to zero (tests/test_op_correlation.py checks such rows). The normalisation backward keeps 1 / eps."""
    return inv_norm.masked_fill(x.abs().amax(dim=1) == 0, 0.0) if x.shape[1] else inv_norm


UNIT_NORM_EXPONENT = 7  # _unit_scaled: the fp16 operands' rows get norms in (2^7, 2^8]


def _unit_scaled(x: Tensor, inv_norm: Tensor) -> tuple[Tensor, Tensor]:
    """fp16 student features as the backward passes take them: every row times the power of two
    2^(e + 7) that gives it a norm in (2^7, 2^8] (e from r = m 2^e, m in [0.5, 1)), and its inverse norm
    divided by the same power, m 2^-7. The passes' similarities x^ r^a r^b are unchanged (exact powers
    of two), but their matmul operands (Q - P)_ij r^b_j (row pass) and g_i r^a_i (Q - P)_ij / tau (column
    pass) no longer carry the rows' norms: with the raw features, scaled only by one power of two for
    the largest inverse norm (operand_scale), the operand of a row whose norm is 1e6 times the smallest
    one is ~1e-6 of the others and underflows fp16, and its contribution to every gradient row is lost.
    Exact: an fp16 row scaled by a power of two to a norm above 128 only loses entries below 2^-24
    (< 2^-31 of its norm) to subnormal rounding. bf16 (fp32's exponent range) and wider dtypes pass unchanged."""
    if x.dtype != torch.float16:
        return x, inv_norm
    mantissa, exponent = torch.frexp(inv_norm.float())
    power = torch.exp2((exponent + UNIT_NORM_EXPONENT).float())
    scaled = (x * power[:, None]).to(x.dtype)
    return scaled, (mantissa * 2.0 ** -UNIT_NORM_EXPONENT).to(inv_norm.dtype)


def _launch_bwd(g, a_s, a_t, b_s, b_t, lse_s, lse_t, tau: float, exclude_diagonal: bool, tiled: Optional[bool] = None):
    orig_a, orig_b = a_s, b_s
    square, a_s, a_t, b_s, b_t = _operands(a_s, a_t, b_s, b_t)
    m, n = a_s.shape[0], b_s.shape[0]
    ra_s, ra_t = _inv_norms(a_s), _inv_norms(a_t)
    rb_s, rb_t = (ra_s, ra_t) if square else (_inv_norms(b_s), _inv_norms(b_t))
    g = g.to(_math(a_s)[0]).contiguous()
    cfg = _fused_config(a_s, a_t, tiled)
    op_a, pa_s = _unit_scaled(a_s, _pass_inv_norms(a_s, ra_s))
    op_b, pb_s = (op_a, pa_s) if square else _unit_scaled(b_s, _pass_inv_norms(b_s, rb_s))
    if cfg is None:
        d_a_hat, d_b_hat = _tiled_bwd(g, (op_a, a_t, op_b, b_t, pa_s, ra_t, pb_s, rb_t), lse_s, lse_t, tau,
                                      exclude_diagonal)
    else:
        d_a_hat, d_b_hat = _fused_bwd(cfg, g, op_a, a_t, op_b, b_t, pa_s, ra_t, pb_s, rb_t, lse_s, lse_t, tau,
                                      exclude_diagonal)
    if square:
        d_a = _norm_backward(a_s, ra_s, d_a_hat + d_b_hat).to(orig_a.dtype)
        return d_a, torch.empty(0, dtype=orig_a.dtype, device=orig_a.device)
    d_a = _norm_backward(a_s, ra_s, d_a_hat).to(orig_a.dtype)
    d_b = _norm_backward(b_s, rb_s, d_b_hat).to(orig_b.dtype)
    return d_a, d_b


# ---------------------------------------------------------------------------------------------
# the ops' implementations (mlkd_fast_triton::*, schemas in mlkd_fast.ops.SCHEMAS)
# ---------------------------------------------------------------------------------------------
def correlation_fwd(
    student_rows: Tensor, teacher_rows: Tensor, student_cols: Optional[Tensor], teacher_cols: Optional[Tensor],
    tau: float, exclude_diagonal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row correlation KL ``l_i`` and the row log-sum-exps of both similarity matrices (fp32; fp64
    when any feature tensor is fp64)."""
    return _launch_fwd(student_rows, teacher_rows, student_cols, teacher_cols, tau, exclude_diagonal)


def correlation_bwd(
    grad_rows: Tensor, student_rows: Tensor, teacher_rows: Tensor, student_cols: Optional[Tensor],
    teacher_cols: Optional[Tensor], lse_s: Tensor, lse_t: Tensor, tau: float, exclude_diagonal: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum_i grad_rows_i l_i`` for the student rows and columns (columns: empty in
    square mode, where the rows receive both)."""
    return _launch_bwd(grad_rows, student_rows, teacher_rows, student_cols, teacher_cols, lse_s, lse_t,
                       tau, exclude_diagonal)

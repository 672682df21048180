"""Temperature KL on raw logits (docs/design.md §1.1): loss and gradient in one pass over the data.

Per row, with u = t / T, v = s / T, p = softmax(u), q = softmax(v):
    l       = sum_c p_c (log p_c - log q_c)
            = A / Z_t + (m_s - m_t) + (log Z_s - log Z_t),   A = sum_c e^(u_c - m_t) (u_c - v_c)
with m the row maxima and Z = sum_c e^(x_c - m); every log-probability is formed as (x - m) - log Z,
never x - (m + log Z), which would round at the scale of the logits (1e4 and more).
    d(T^2 l)/ds = T (q - p)                        (student gradient, stored in the forward)
    d(T^2 l)/dt = T p (log p - log q - l)           (teacher gradient, online distillation only)
A -inf teacher logit has p = 0: its term of A and its teacher gradient are exactly 0 (never 0 * inf).
A, Z and the maxima m are accumulated online over column chunks, so rows of any length work.
The math runs in ACC: fp32, or fp64 when either input is fp64 (fp64 stays fp64); student and teacher
are each read in their own dtype (they may differ) and each gradient is stored in its input's dtype.
The loss rows and row weights are in ACC. T and 1 / T reach the kernels as fp64 arguments (a Python
float argument would be rounded to fp32) and are narrowed to ACC inside.

Bytes per element (bf16 in/out), row fits on chip (<= MAX_FUSED_BLOCK columns): read s, t (4) + write
grad_s (2) = 6 bytes, one pass; the teacher gradient adds 2 more. Longer rows, at least one per SM
(the looped path): one program sweeps its row twice, the second sweep last chunk first from L2, so
HBM still sees 6 bytes while the rows in flight fit in L2. Few long rows (the split path): a row over
several programs, a stats pass reading s, t (4), then a gradient pass reading them again and writing
the gradient (6), 10 bytes.
Row weights w_i (the reduction and the loss weight) are folded into the loss row and the stored
gradient, so that after `total.backward()` d loss / d row is exactly 1 and the backward, when autograd
frees the graph after it, reads one float per row and writes nothing; otherwise it multiplies the
stored gradient by d loss / d row (read 2 + write 2), on the device, without a host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import ops
from ._device import sm_count


# Longest row held on chip by one program: at 16384 columns (16 warps) ptxas spills 40-356 bytes
# per thread on sm_90 (tools/triton_build.py), at 8192 none.
MAX_FUSED_BLOCK = 8192
SPLIT_BLOCK = 4096  # column chunk of the looped and split paths
LOOPED_ROWS_IN_L2 = 40 << 20  # bytes of rows the looped path keeps in flight (H100 L2: 50 MB)


@triton.jit
def _host_scalar(x, ACC: tl.constexpr):
    """A float kernel argument declared ``tl.float64`` in the math dtype ACC. (tl.full, not tl.cast: under
    the interpreter the argument is a Python float, which tl.cast would round to fp32 first.)"""
    return tl.full([], x, ACC)


@triton.jit
def _narrow(x, DST: tl.constexpr):
    """x in the dtype DST of a store. 16-bit dtypes are reached through fp32: from fp64 math that is one
    extra rounding at most (as the C++ kernels do), and the interpreter converts fp64 -> bf16 wrongly."""
    if DST.primitive_bitwidth == 16:
        return x.to(tl.float32).to(DST)
    else:
        return x.to(DST)


@triton.jit
def _kd_kl_fused_kernel(
    Student_ptr, Student_stride,  # student logits (N, C), unit column stride
    Teacher_ptr, Teacher_stride,  # teacher logits (N, C)
    W_ptr,  # (N,) ACC row weights w_i, read only when HAS_WEIGHT
    Loss_ptr,  # (N,) ACC: w_i T^2 l_i
    GS_ptr, GS_stride,  # (N, C) student gradient, written when STUDENT_GRAD
    GT_ptr, GT_stride,  # (N, C) teacher gradient, written when TEACHER_GRAD
    C, inv_temp: tl.float64, temp: tl.float64,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < C
    inv_temp = _host_scalar(inv_temp, ACC)
    temp = _host_scalar(temp, ACC)
    row_w = 1.0
    if HAS_WEIGHT:
        row_w = tl.load(W_ptr + row)
    v = tl.load(Student_ptr + row * Student_stride + cols, mask=in_row, other=-float("inf")).to(ACC) * inv_temp
    u = tl.load(Teacher_ptr + row * Teacher_stride + cols, mask=in_row, other=-float("inf")).to(ACC) * inv_temp

    # Shift by the row maxima before anything else: m + log z rounds at the scale of the logits.
    m_s = tl.max(v, axis=0)
    m_s = tl.where(m_s == -float("inf"), 0.0, m_s)
    e_s = tl.exp(v - m_s)
    z_s = tl.sum(e_s, axis=0)
    m_t = tl.max(u, axis=0)
    m_t = tl.where(m_t == -float("inf"), 0.0, m_t)
    e_t = tl.exp(u - m_t)
    z_t = tl.sum(e_t, axis=0)
    a = tl.sum(tl.where(u == -float("inf"), 0.0, e_t * (u - v)), axis=0)
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    kl = a / z_t + (m_s - m_t) + (log_z_s - log_z_t)
    # weight 0 (a masked row): exactly 0, whatever the row holds (NaN, all -inf)
    tl.store(Loss_ptr + row, tl.where(row_w == 0.0, 0.0, kl * temp * temp * row_w))

    p = e_t / z_t
    if STUDENT_GRAD:
        g_s = tl.where(row_w == 0.0, 0.0, temp * (e_s / z_s - p) * row_w)
        tl.store(GS_ptr + row * GS_stride + cols, _narrow(g_s, GS_ptr.dtype.element_ty), mask=in_row)
    if TEACHER_GRAD:
        log_ratio = ((u - m_t) - log_z_t) - ((v - m_s) - log_z_s)
        g_t = tl.where(u == -float("inf"), 0.0, temp * p * (log_ratio - kl) * row_w)
        g_t = tl.where(row_w == 0.0, 0.0, g_t)
        tl.store(GT_ptr + row * GT_stride + cols, _narrow(g_t, GT_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _online_row_stats(Student_row, Teacher_row, lo, hi, inv_temp, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """m_s, Z_s, m_t, Z_t, A of columns [lo, hi) of one row, online over BLOCK-column chunks; each Z
    and A relative to its maximum (to 0 while that maximum is -inf)."""
    m_s = tl.full([], -float("inf"), ACC)  # typed: the loop carries them in ACC
    z_s = tl.full([], 0.0, ACC)
    m_t = tl.full([], -float("inf"), ACC)
    z_t = tl.full([], 0.0, ACC)
    a = tl.full([], 0.0, ACC)
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < hi
        v = tl.load(Student_row + cols, mask=ok, other=-float("inf")).to(ACC) * inv_temp
        u = tl.load(Teacher_row + cols, mask=ok, other=-float("inf")).to(ACC) * inv_temp
        new_m_s = tl.maximum(m_s, tl.max(v, axis=0))
        ref_s = tl.where(new_m_s == -float("inf"), 0.0, new_m_s)
        z_s = z_s * tl.exp(m_s - ref_s) + tl.sum(tl.exp(v - ref_s), axis=0)
        m_s = new_m_s
        new_m_t = tl.maximum(m_t, tl.max(u, axis=0))
        ref_t = tl.where(new_m_t == -float("inf"), 0.0, new_m_t)
        rescale = tl.exp(m_t - ref_t)
        e_t = tl.exp(u - ref_t)
        z_t = z_t * rescale + tl.sum(e_t, axis=0)
        a = a * rescale + tl.sum(tl.where(u == -float("inf"), 0.0, e_t * (u - v)), axis=0)
        m_t = new_m_t
    return m_s, z_s, m_t, z_t, a


@triton.jit
def _write_row_grads(
    Student_row, Teacher_row, GS_row, GT_row, lo, hi,
    m_s, log_z_s, m_t, log_z_t, kl, row_w, inv_temp, temp,
    BLOCK: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, REVERSE: tl.constexpr,
    ACC: tl.constexpr,
):
    """The gradients of columns [lo, hi) of one row from its final statistics (m: the finite maxima
    the log Z are relative to); REVERSE walks the chunks last to first."""
    n_chunks = tl.cdiv(hi - lo, BLOCK)
    for i in range(0, n_chunks):
        if REVERSE:
            start = lo + (n_chunks - 1 - i) * BLOCK
        else:
            start = lo + i * BLOCK
        cols = start + tl.arange(0, BLOCK)
        ok = cols < hi
        v = tl.load(Student_row + cols, mask=ok, other=-float("inf")).to(ACC) * inv_temp
        u = tl.load(Teacher_row + cols, mask=ok, other=-float("inf")).to(ACC) * inv_temp
        log_p = (u - m_t) - log_z_t
        log_q = (v - m_s) - log_z_s
        p = tl.exp(log_p)
        if STUDENT_GRAD:
            g_s = tl.where(row_w == 0.0, 0.0, temp * (tl.exp(log_q) - p) * row_w)
            tl.store(GS_row + cols, _narrow(g_s, GS_row.dtype.element_ty), mask=ok)
        if TEACHER_GRAD:
            g_t = tl.where(u == -float("inf"), 0.0, temp * p * (log_p - log_q - kl) * row_w)
            g_t = tl.where(row_w == 0.0, 0.0, g_t)
            tl.store(GT_row + cols, _narrow(g_t, GT_row.dtype.element_ty), mask=ok)


@triton.jit
def _kd_kl_looped_kernel(
    Student_ptr, Student_stride,  # student logits (N, C), unit column stride
    Teacher_ptr, Teacher_stride,  # teacher logits (N, C)
    W_ptr,  # (N,) ACC row weights w_i, read only when HAS_WEIGHT
    Loss_ptr,  # (N,) ACC: w_i T^2 l_i
    GS_ptr, GS_stride,  # (N, C) student gradient, written when STUDENT_GRAD
    GT_ptr, GT_stride,  # (N, C) teacher gradient, written when TEACHER_GRAD
    N, C, inv_temp: tl.float64, temp: tl.float64,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    ACC: tl.constexpr,
):
    # Rows too long to hold on chip, and enough of them to fill the GPU: a few programs per SM walk
    # the rows (persistent), each row in two sweeps. The second sweep runs last chunk first, so that
    # it starts on the bytes the first sweep read last, the most likely to be still in L2: with the
    # rows of all programs in flight fitting in L2, HBM sees each input byte once.
    inv_temp = _host_scalar(inv_temp, ACC)
    temp = _host_scalar(temp, ACC)
    for r in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):  # int64: r * stride may pass 2^31
        s_row = Student_ptr + r * Student_stride
        t_row = Teacher_ptr + r * Teacher_stride
        m_s, z_s, m_t, z_t, a = _online_row_stats(s_row, t_row, 0, C, inv_temp, BLOCK, ACC)
        m_s = tl.where(m_s == -float("inf"), 0.0, m_s)
        m_t = tl.where(m_t == -float("inf"), 0.0, m_t)
        log_z_s = tl.log(z_s)
        log_z_t = tl.log(z_t)
        kl = a / z_t + (m_s - m_t) + (log_z_s - log_z_t)
        row_w = 1.0
        if HAS_WEIGHT:
            row_w = tl.load(W_ptr + r)
        tl.store(Loss_ptr + r, tl.where(row_w == 0.0, 0.0, kl * temp * temp * row_w))
        if STUDENT_GRAD or TEACHER_GRAD:
            _write_row_grads(s_row, t_row, GS_ptr + r * GS_stride, GT_ptr + r * GT_stride, 0, C,
                             m_s, log_z_s, m_t, log_z_t, kl, row_w, inv_temp, temp,
                             BLOCK, STUDENT_GRAD, TEACHER_GRAD, True, ACC)


@triton.jit
def _kd_kl_stats_kernel(
    Student_ptr, Student_stride,  # student logits (N, C)
    Teacher_ptr, Teacher_stride,  # teacher logits (N, C)
    Stats_ptr,  # (N, SPLITS, 5) ACC partials: m_s, z_s, m_t, z_t, A (each relative to its own max)
    C, span, inv_temp: tl.float64,
    BLOCK: tl.constexpr, SPLITS: tl.constexpr, ACC: tl.constexpr,
):
    inv_temp = _host_scalar(inv_temp, ACC)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * span
    hi = tl.minimum(lo + span, C)
    m_s, z_s, m_t, z_t, a = _online_row_stats(Student_ptr + row * Student_stride, Teacher_ptr + row * Teacher_stride,
                                              lo, hi, inv_temp, BLOCK, ACC)
    out = Stats_ptr + (row * SPLITS + split) * 5
    tl.store(out + 0, tl.where(m_s == -float("inf"), 0.0, m_s))
    tl.store(out + 1, z_s)
    tl.store(out + 2, tl.where(m_t == -float("inf"), 0.0, m_t))
    tl.store(out + 3, z_t)
    tl.store(out + 4, a)


@triton.jit
def _kd_kl_grad_kernel(
    Student_ptr, Student_stride,  # student logits (N, C)
    Teacher_ptr, Teacher_stride,  # teacher logits (N, C)
    Row_ptr,  # (N, 6) ACC: m_s, log z_s, m_t, log z_t, l_i, row_w
    GS_ptr, GS_stride,  # (N, C) student gradient
    GT_ptr, GT_stride,  # (N, C) teacher gradient, when TEACHER_GRAD
    C, span, inv_temp: tl.float64, temp: tl.float64,
    BLOCK: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, ACC: tl.constexpr,
):
    inv_temp = _host_scalar(inv_temp, ACC)
    temp = _host_scalar(temp, ACC)
    row = tl.program_id(0).to(tl.int64)
    lo = tl.program_id(1) * span
    hi = tl.minimum(lo + span, C)
    stats = Row_ptr + row * 6
    _write_row_grads(Student_ptr + row * Student_stride, Teacher_ptr + row * Teacher_stride, GS_ptr + row * GS_stride,
                     GT_ptr + row * GT_stride, lo, hi,
                     tl.load(stats + 0), tl.load(stats + 1), tl.load(stats + 2), tl.load(stats + 3),
                     tl.load(stats + 4), tl.load(stats + 5), inv_temp, temp,
                     BLOCK, STUDENT_GRAD, TEACHER_GRAD, False, ACC)


@triton.jit
def _scale_rows_kernel(
    X_ptr, X_stride,  # (N, C) stored gradient
    G_ptr,  # (N,) d loss / d l_i, fp32 (fp64 for fp64 X): the math dtype
    Out_ptr, Out_stride,  # (N, C) out = X * G[:, None]
    C,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < C
    g = tl.load(G_ptr + row)
    x = tl.load(X_ptr + row * X_stride + cols, mask=ok, other=0.0).to(G_ptr.dtype.element_ty)
    tl.store(Out_ptr + row * Out_stride + cols, (x * g).to(Out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scale_rows_inplace_kernel(
    X_ptr, X_stride,  # (N, C) stored gradient, scaled in place
    G_ptr,  # (N,) d loss / d l_i, fp32 (fp64 for fp64 X): the math dtype
    C,
    BLOCK: tl.constexpr,
):
    # Rows with g == 1 (all of them after `total.backward()`: the weights are folded into the stored
    # gradient) are left alone: 4 bytes read per row instead of 2 x the row.
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(G_ptr + row)
    if g != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < C
        x = tl.load(X_ptr + row * X_stride + cols, mask=ok, other=0.0).to(G_ptr.dtype.element_ty)
        tl.store(X_ptr + row * X_stride + cols, (x * g).to(X_ptr.dtype.element_ty), mask=ok)


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _plan(n: int, c: int, device: torch.device) -> str:
    """"fused" (one program holds a row), "looped" (rows too long for that, at least one per SM) or
    "split" (few long rows: each over several programs, so that the GPU fills)."""
    many_rows = n >= sm_count(device)
    if c <= MAX_FUSED_BLOCK and (many_rows or c <= SPLIT_BLOCK):
        return "fused"
    return "looped" if many_rows else "split"


def _looped_programs(n: int, row_bytes: int, device: torch.device) -> int:
    # Two programs per SM while their rows fit in L2 together (the second sweep then reads from L2);
    # one per SM beyond that. A first guess from the arithmetic, to be tuned on the GPU.
    sms = sm_count(device)
    return min(n, (2 if 2 * sms * row_bytes <= LOOPED_ROWS_IN_L2 else 1) * sms)


def _launch_kd_kl(
    s: Tensor, t: Tensor, row_weight: Optional[Tensor], temperature: float,
    student_grad: bool, teacher_grad: bool,
    path: Optional[str] = None, block: Optional[int] = None, splits: Optional[int] = None,
    programs: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs the kernels. ``path`` ("fused", "looped", "split"), ``block`` (the row block or column
    chunk), ``splits`` and ``programs`` override the heuristics (tests use them)."""
    n, c = s.shape
    dev = s.device
    math = ops.math_dtype(s, t)  # fp64 stays fp64
    acc = tl.float64 if math == torch.float64 else tl.float32
    if row_weight is not None and row_weight.dtype != math:
        row_weight = row_weight.to(math)
    rows = torch.empty(n, dtype=math, device=dev)
    grad_s = torch.empty((n, c), dtype=s.dtype, device=dev) if student_grad else s.new_empty(0)
    grad_t = torch.empty((n, c), dtype=t.dtype, device=dev) if teacher_grad else t.new_empty(0)
    gs_stride = grad_s.stride(0) if student_grad else 0
    gt_stride = grad_t.stride(0) if teacher_grad else 0
    weight = row_weight.contiguous() if row_weight is not None else rows  # dummy pointer if no weights
    path = path or _plan(n, c, dev)
    if path == "fused":
        block = block or triton.next_power_of_2(c)
        if block < c:
            raise ValueError(f"the fused path holds a whole row: block {block} < {c} columns")
        _kd_kl_fused_kernel[(n,)](
            s, s.stride(0), t, t.stride(0), weight, rows,
            grad_s, gs_stride, grad_t, gt_stride,
            c, 1.0 / temperature, temperature,
            BLOCK=block, HAS_WEIGHT=row_weight is not None, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad,
            ACC=acc, num_warps=_num_warps(block),
        )
        return rows, grad_s, grad_t

    chunk = block or min(SPLIT_BLOCK, triton.next_power_of_2(c))
    if path == "looped":
        programs = programs or _looped_programs(n, c * (s.element_size() + t.element_size()), dev)
        _kd_kl_looped_kernel[(programs,)](
            s, s.stride(0), t, t.stride(0), weight, rows,
            grad_s, gs_stride, grad_t, gt_stride,
            n, c, 1.0 / temperature, temperature,
            BLOCK=chunk, HAS_WEIGHT=row_weight is not None, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad,
            ACC=acc, num_warps=_num_warps(chunk),
        )
        return rows, grad_s, grad_t

    n_chunks = triton.cdiv(c, chunk)
    if splits is None:
        splits = max(1, min(n_chunks, triton.cdiv(4 * sm_count(dev), n)))
    span = triton.cdiv(n_chunks, splits) * chunk
    splits = triton.cdiv(c, span)
    stats = torch.empty((n, splits, 5), dtype=math, device=dev)
    _kd_kl_stats_kernel[(n, splits)](
        s, s.stride(0), t, t.stride(0), stats, c, span, 1.0 / temperature,
        BLOCK=chunk, SPLITS=splits, ACC=acc, num_warps=_num_warps(chunk),
    )
    # Merge the partial statistics of each row's splits (tiny: N x SPLITS).
    m_s, z_s, m_t, z_t, a = stats.unbind(-1)
    top_s = m_s.amax(dim=1, keepdim=True)
    top_t = m_t.amax(dim=1, keepdim=True)
    w_t = torch.exp(m_t - top_t)
    log_z_s = torch.log((z_s * torch.exp(m_s - top_s)).sum(dim=1))
    z_t_row = (z_t * w_t).sum(dim=1)
    log_z_t = torch.log(z_t_row)
    top_s, top_t = top_s.squeeze(1), top_t.squeeze(1)
    kl = (a * w_t).sum(dim=1) / z_t_row + (top_s - top_t) + (log_z_s - log_z_t)
    row_w = torch.ones_like(kl) if row_weight is None else row_weight
    rows.copy_(torch.where(row_w == 0, 0.0, kl * (temperature * temperature) * row_w))
    if student_grad or teacher_grad:
        row_stats = torch.stack([top_s, log_z_s, top_t, log_z_t, kl, row_w], dim=1).contiguous()
        _kd_kl_grad_kernel[(n, splits)](
            s, s.stride(0), t, t.stride(0), row_stats,
            grad_s, gs_stride, grad_t, gt_stride,
            c, span, 1.0 / temperature, temperature,
            BLOCK=chunk, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad, ACC=acc, num_warps=_num_warps(chunk),
        )
    return rows, grad_s, grad_t


def _launch_scale_rows(x: Tensor, g: Tensor, inplace: bool) -> Optional[Tensor]:
    n, c = x.shape
    g32 = g.to(ops.math_dtype(x)).contiguous()  # the math dtype
    block = min(triton.next_power_of_2(c), 4096)
    grid = (n, triton.cdiv(c, block))
    if inplace:
        _scale_rows_inplace_kernel[grid](x, x.stride(0), g32, c, BLOCK=block, num_warps=_num_warps(block))
        return None
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    _scale_rows_kernel[grid](x, x.stride(0), g32, out, out.stride(0), c, BLOCK=block, num_warps=_num_warps(block))
    return out


# ---------------------------------------------------------------------------------------------
# the ops' implementations (mlkd_fast_triton::*, schemas in mlkd_fast.ops.SCHEMAS)
# ---------------------------------------------------------------------------------------------
def kd_kl(
    student: Tensor, teacher: Tensor, row_weight: Optional[Tensor], temperature: float,
    student_grad: bool, teacher_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``w_i T^2 KL`` (fp32; fp64 when an input is fp64) and the stored gradients
    ``w_i d(T^2 l_i)/ds``, ``w_i d(T^2 l_i)/dt`` in their inputs' dtypes (empty when not requested);
    ``w`` = ``row_weight`` (length N, in the math dtype) or 1."""
    return _launch_kd_kl(student, teacher, row_weight, temperature, student_grad, teacher_grad)


def scale_rows(x: Tensor, g: Tensor) -> Tensor:
    """``x * g[:, None]`` with fp32 math (fp64 for fp64 ``x``), stored in ``x.dtype`` (the KL backward)."""
    return _launch_scale_rows(x, g, inplace=False)


def scale_rows_(x: Tensor, g: Tensor) -> None:
    """``x *= g[:, None]`` in place, fp32 math; rows with ``g == 1`` are not touched."""
    _launch_scale_rows(x, g, inplace=True)

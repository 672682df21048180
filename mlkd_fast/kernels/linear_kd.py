"""The row math of the fused lm_head + divergence loss (mlkd_fast/linear_kd.py, SPEC §9, docs/lm.md) as
a Triton kernel: one chunk's fp32 logits in, the per-token divergence and CE out, and d(total)/d(z_s)
written over the student's logits (the chunk's buffer, owned by the caller) so that nothing of
(rows x V) is allocated here: extra memory O(rows).

Same contract and results as :func:`mlkd_fast.divergences.token_rows` (the oracle; its docstring
derives the buckets and QG). Per row, z the student's and y the teacher's logits, c the softcap
(c tanh(x / c), -inf kept), T the temperature, V the ids the divergence covers (the first ``vocab``)
and V_s the student's whole vocabulary:

    u = c_s(z) / T,  w = c_t(y) / T  over j < V;   log q = (u - m_u) - log Z_u,  log p = (w - m_w) - log Z_w
    kd  = sum_j l(p_j, q_j)                         (the divergence's per-id term, table below)
    ce  = (m_c + log Z_c) - c_s(z)_label            (over all V_s ids, untempered; label -1: 0)
    d total / d z_j = c_s'(z_j) [ (k / T) (QG_j - q_j S) [j < V] + e (softmax(c_s(z))_j - [j = label]) ]
    S = sum_j QG_j,   k, e the row's kd and CE weights; 0 for the whole row when k = e = 0,
    c_s'(z) = 1 - (c_s(z) / c)^2 (0 at z = -inf)

with m the row maxima and Z = sum exp(x - m); log-probabilities are formed as (x - m) - log Z, never
x - (m + log Z) (which rounds at the scale of the logits). Per id, P = p_j, Q = q_j:

  divergence        l(P, Q)                                 QG_j
  forward_kl        P (log P - log Q)                       -P           (S = -1: no second pass)
  reverse_kl        Q (log Q - log P)                       l + Q
  jsd (b)           b P log(P/M) + (1-b) Q log(Q/M)         (1-b) Q log(Q/M),   M = b P + (1-b) Q
  skew_forward_kl   P log(P/M), M = a P + (1-a) Q           -(1-a) P Q / M
  skew_reverse_kl   Q log(Q/M), M = a Q + (1-a) P           Q log(Q/M) + Q (1 - a Q / M)

A weight of 0 (P = 0 where P weighs, Q = 0 where Q weighs) makes its term exactly 0, so -inf teacher
logits never give a NaN. The forward KL's row comes from pass 1 alone, as in kd_kl.py:
kd = A / Z_w + (m_u - m_w) + (log Z_u - log Z_w), A = sum_j exp(w_j - m_w) (w_j - u_j) (0 where w = -inf).

Passes. One program per row (rows of a chunk: ~1000 at V = 128256 under the CUDA chunk budget), each
over BLOCK_V-column tiles, all accumulation in fp32 (the online maxima and sums rescaled per tile):
  1. m_u, Z_u, m_w, Z_w (and A for the forward KL) over the first V ids; m_c, Z_c over all V_s ids
     when there are labels; the student's label logit read once (before pass 3 overwrites it).
  2. (not forward_kl) the row's divergence and S = sum_j QG_j, from the pass-1 statistics.
  3. (want_grad) the gradient, over all V_s ids, stored over z_s tile by tile.
Bytes per row, fp32 (4 B a logit), V_s = V_t = V, with want_grad: read z_s, y (8 V) in pass 1, again
in pass 2 (8 V; forward_kl skips it), read them and write the gradient in pass 3 (12 V): 20 V bytes
for the forward KL, 28 V for the others (28 V = 3.6 MB a row at V = 128256), against 4 V + 4 V
of the logits themselves: the kernel is memory bound, a few exp a byte. Without want_grad: 8 V
(forward KL) or 16 V. These are HBM bytes: at 80 registers a thread (tools/triton_build.py, sm_90)
an SM holds 3 programs, ~400 rows in flight with 1 MB of logits each at V = 128256, far past the
50 MB L2, so passes 2 and 3 re-read from HBM. At 1024 x 128256 that is 2.6 GB (forward KL) to
3.7 GB a chunk, 0.8-1.1 ms at 3.35 TB/s, against ~6 ms of the chunk's four bf16 GEMMs (live
teacher, H = 4096, ~700 TFLOP/s). A persistent grid with ~40 rows in flight (kd_kl.py's looped
path) would let passes 2-3 hit L2: to measure on a GPU first. Labels, weights and the two output
rows: O(rows).

The teacher's logits may also be bf16 or fp16 (a dense teacher's stored logits, read without an fp32
copy of the chunk: 2 B a logit instead of 4 in each pass); they are widened to fp32 on load, so the
results are those of the torch function on ``z_t.float()``.

Not here yet (fall back to the torch row function, the same results):
- the sparse top-k teacher (``topk_indices`` given): the bucket gather/tail math stays in PyTorch;
- fp64 logits: Triton fp64 math is slow on GPUs and the fp64 path exists for gradchecks: the torch
  function is used (so fp64 results are the oracle's own);
- CPU tensors without TRITON_INTERPRET=1 (Triton cannot run them).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import divergences

# The vocabulary tile of one program's loops (a power of two; tests lower it to cross tile edges).
# 2048 fp32 columns over 8 warps: 8 per thread for each live tile value (tools/triton_build.py
# reports registers and spills for sm_90).
BLOCK_V = 2048
NUM_WARPS = 8
# divergence codes (constexpr DIV)
CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3, "skew_reverse_kl": 4}
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _softcap(x, cap):
    """cap * tanh(x / cap), -inf kept. tanh from exp (no libdevice: the same code runs under the
    interpreter): sign(t) (1 - e) / (1 + e), e = exp(-2|t|); a short series below |t| = 1/8, where
    1 - e would lose the relative precision."""
    t = x / cap
    a = tl.abs(t)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    t2 = a * a
    small = a * (1.0 + t2 * (-1.0 / 3.0 + t2 * (2.0 / 15.0 + t2 * (-17.0 / 315.0))))
    th = tl.where(a < 0.125, small, big)
    th = tl.where(t < 0.0, -th, th)
    return tl.where(x == -float("inf"), x, cap * th)


@triton.jit
def _online(m, z, x):
    """(max, sum exp(x - max)) of the columns so far and a new tile x; the sum is kept relative to
    the maximum (relative to 0 while that maximum is -inf). Returns the new max, the new sum, the
    tile's exp(x - ref) and the factor the old sums were rescaled by."""
    new_m = tl.maximum(m, tl.max(x, axis=0))
    ref = tl.where(new_m == -float("inf"), 0.0, new_m)
    rescale = tl.exp(m - ref)
    e = tl.exp(x - ref)
    return new_m, z * rescale + tl.sum(e, axis=0), e, rescale


@triton.jit
def _logaddexp(x, y):
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    return tl.where(hi == -float("inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def _terms(lp, lq, coef, log_a, log_b, DIV: tl.constexpr):
    """Per id: the divergence's term l(P, Q) and QG (module docstring), from log P and log Q.
    coef is beta (jsd) or alpha (skew); log_a = log coef, log_b = log(1 - coef)."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    if DIV == 0:  # forward_kl
        term = tl.where(p > 0.0, p * (lp - lq), 0.0)
        qg = -p
    elif DIV == 1:  # reverse_kl
        term = tl.where(q > 0.0, q * (lq - lp), 0.0)
        qg = term + q
    elif DIV == 2:  # jsd
        lm = _logaddexp(lp + log_a, lq + log_b)
        kl_q = tl.where(q > 0.0, q * (lq - lm), 0.0)
        kl_p = tl.where(p > 0.0, p * (lp - lm), 0.0)
        term = coef * kl_p + (1.0 - coef) * kl_q
        qg = (1.0 - coef) * kl_q
    elif DIV == 3:  # skew_forward_kl: M = a P + (1 - a) Q
        lm = _logaddexp(lp + log_a, lq + log_b)
        term = tl.where(p > 0.0, p * (lp - lm), 0.0)
        qg = -(1.0 - coef) * tl.where(lm > -float("inf"), tl.exp(lp + lq - lm), 0.0)
    else:  # skew_reverse_kl: M = a Q + (1 - a) P
        lm = _logaddexp(lq + log_a, lp + log_b)
        term = tl.where(q > 0.0, q * (lq - lm), 0.0)
        qg = term + q * (1.0 - coef * tl.where(lm > -float("inf"), tl.exp(lq - lm), 0.0))
    return term, qg


@triton.jit
def _linear_kd_rows_kernel(
    Zs_ptr, Zs_stride,  # (rows, V_s) fp32 student logits, unit column stride; the gradient is written over them
    Zt_ptr, Zt_stride,  # (rows, >= V) teacher logits (fp32, bf16 or fp16: widened on load), when HAS_TEACHER
    Labels_ptr,  # (rows,) int64, -1 = ignored; read when HAS_LABELS
    Kw_ptr, Cw_ptr,  # (rows,) fp32 kd and CE row weights
    Kd_ptr, Ce_ptr,  # (rows,) fp32 outputs
    V_s, V, temperature, coef, log_a, log_b, s_cap, t_cap,
    DIV: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_LABELS: tl.constexpr, S_CAP: tl.constexpr,
    T_CAP: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2^31
    zs_row = Zs_ptr + row * Zs_stride
    zt_row = Zt_ptr + row * Zt_stride
    NEG: tl.constexpr = -float("inf")
    m_u = tl.full([], NEG, tl.float32)
    z_u = tl.full([], 0.0, tl.float32)
    m_w = tl.full([], NEG, tl.float32)
    z_w = tl.full([], 0.0, tl.float32)
    a_fw = tl.full([], 0.0, tl.float32)
    m_c = tl.full([], NEG, tl.float32)
    z_c = tl.full([], 0.0, tl.float32)

    # ---- pass 1: the row statistics -----------------------------------------------------------
    for start in range(0, V_s, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_s = cols < V_s
        in_kd = cols < V
        zc = tl.load(zs_row + cols, mask=in_s, other=NEG)
        if S_CAP:
            zc = _softcap(zc, s_cap)
        if HAS_LABELS:
            m_c, z_c, _e, _r = _online(m_c, z_c, zc)
        if HAS_TEACHER:
            u = tl.where(in_kd, zc / temperature, NEG)
            m_u, z_u, _e, _r = _online(m_u, z_u, u)
            w = tl.load(zt_row + cols, mask=in_kd, other=NEG).to(tl.float32)
            if T_CAP:
                w = _softcap(w, t_cap)
            w = w / temperature
            m_w, z_w, e_w, rescale = _online(m_w, z_w, w)
            if DIV == 0:
                a_fw = a_fw * rescale + tl.sum(tl.where(w == NEG, 0.0, e_w * (w - u)), axis=0)

    kd_w = tl.load(Kw_ptr + row)
    ce_w = tl.load(Cw_ptr + row)
    counted = (kd_w != 0.0) | (ce_w != 0.0)
    m_u = tl.where(m_u == NEG, 0.0, m_u)
    m_w = tl.where(m_w == NEG, 0.0, m_w)
    m_c = tl.where(m_c == NEG, 0.0, m_c)
    log_z_u = tl.log(z_u)
    log_z_w = tl.log(z_w)
    log_z_c = tl.log(z_c)

    label = -1
    ce = 0.0
    if HAS_LABELS:
        label = tl.load(Labels_ptr + row)
        valid = label >= 0
        z_label = tl.load(zs_row + tl.where(valid, label, 0))  # read before pass 3 writes over it
        if S_CAP:
            z_label = _softcap(z_label, s_cap)
        ce = tl.where(valid, (m_c + log_z_c) - z_label, 0.0)
    tl.store(Ce_ptr + row, ce)

    # ---- pass 2: the divergence and S = sum QG (the forward KL has both from pass 1) ---------------
    kd = 0.0
    qg_sum = -1.0
    if HAS_TEACHER:
        if DIV == 0:
            kd = a_fw / z_w + (m_u - m_w) + (log_z_u - log_z_w)
        else:
            kd_acc = tl.zeros([BLOCK_V], tl.float32)
            qg_acc = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                in_kd = cols < V
                zc = tl.load(zs_row + cols, mask=in_kd, other=NEG)
                if S_CAP:
                    zc = _softcap(zc, s_cap)
                w = tl.load(zt_row + cols, mask=in_kd, other=NEG).to(tl.float32)
                if T_CAP:
                    w = _softcap(w, t_cap)
                lq = (zc / temperature - m_u) - log_z_u
                lp = (w / temperature - m_w) - log_z_w
                term, qg = _terms(lp, lq, coef, log_a, log_b, DIV)
                kd_acc += tl.where(in_kd, term, 0.0)
                qg_acc += tl.where(in_kd, qg, 0.0)
            kd = tl.sum(kd_acc, axis=0)
            qg_sum = tl.sum(qg_acc, axis=0)
    tl.store(Kd_ptr + row, kd)

    # ---- pass 3: the gradient, over z_s ---------------------------------------------------------
    if WANT_GRAD:
        kd_scale = kd_w / temperature
        for start in range(0, V_s, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_s = cols < V_s
            in_kd = cols < V
            z = tl.load(zs_row + cols, mask=in_s, other=NEG)
            zc = z
            if S_CAP:
                zc = _softcap(z, s_cap)
            g = tl.zeros([BLOCK_V], tl.float32)
            if HAS_TEACHER:
                w = tl.load(zt_row + cols, mask=in_kd, other=NEG).to(tl.float32)
                if T_CAP:
                    w = _softcap(w, t_cap)
                lq = (zc / temperature - m_u) - log_z_u
                lp = (w / temperature - m_w) - log_z_w
                _term, qg = _terms(lp, lq, coef, log_a, log_b, DIV)
                g = tl.where(in_kd, (qg - tl.exp(lq) * qg_sum) * kd_scale, 0.0)
            if HAS_LABELS:
                soft = tl.exp((zc - m_c) - log_z_c) - tl.where(cols == label, 1.0, 0.0)
                g += tl.where(label >= 0, soft * ce_w, 0.0)
            if S_CAP:
                r = zc / s_cap
                g *= tl.where(z == NEG, 0.0, 1.0 - r * r)
            g = tl.where(counted, g, 0.0)
            tl.store(zs_row + cols, g, mask=in_s)


def _fallback(z_s: Tensor, z_t: Optional[Tensor], topk_indices: Optional[Tensor]) -> bool:
    if topk_indices is not None:  # sparse teacher: not in Triton yet
        return True
    if z_s.dtype != torch.float32 or (z_t is not None and z_t.dtype not in (torch.float32, torch.bfloat16,
                                                                           torch.float16)):
        return True  # fp64 (gradchecks): the torch function, exact to fp64
    return z_s.device.type != "cuda" and not INTERPRET


def token_rows(z_s: Tensor, *, z_t: Optional[Tensor], topk_indices: Optional[Tensor],
               topk_logprobs: Optional[Tensor], labels: Optional[Tensor], kd_weight: Tensor, ce_weight: Tensor,
               divergence: str, coef: float, temperature: float, student_softcap: float, teacher_softcap: float,
               vocab: int, topk_tail: bool, want_grad: bool, topk_rest: Optional[Tensor] = None
               ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """:func:`mlkd_fast.divergences.token_rows` as a Triton kernel: (kd rows, ce rows, d total/d z_s).

    The gradient is written over ``z_s`` (the caller's fresh fp32 chunk; its logits are gone after the
    call when ``want_grad``) and returned; nothing of (rows x V) is allocated. ``divergence`` is
    already :func:`mlkd_fast.divergences.resolve`'d. A sparse teacher, fp64 logits and CPU tensors
    without the interpreter run the torch function (module docstring); ``topk_rest`` (a top-k
    teacher's stored log-mass outside its k ids) only matters there."""
    if _fallback(z_s, z_t, topk_indices):
        rest = {} if topk_rest is None else {"topk_rest": topk_rest}
        return divergences.token_rows(
            z_s, z_t=z_t, topk_indices=topk_indices, topk_logprobs=topk_logprobs, labels=labels, kd_weight=kd_weight,
            ce_weight=ce_weight, divergence=divergence, coef=coef, temperature=temperature,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap, vocab=vocab, topk_tail=topk_tail,
            want_grad=want_grad, **rest)
    kd, ce = _launch(z_s, z_t, labels, kd_weight, ce_weight, divergence, coef, temperature, student_softcap,
                     teacher_softcap, vocab, want_grad)
    return kd, ce, (z_s if want_grad else None)


def _launch(z_s: Tensor, z_t: Optional[Tensor], labels: Optional[Tensor], kd_weight: Tensor, ce_weight: Tensor,
            divergence: str, coef: float, temperature: float, student_softcap: float, teacher_softcap: float,
            vocab: int, want_grad: bool, block: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Runs the kernel on fp32 logits with unit column stride (``z_s`` is overwritten by the gradient
    when ``want_grad``); returns the kd and ce rows. ``block`` overrides :data:`BLOCK_V`."""
    if divergence not in CODES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, CODES))}; got {divergence!r}")
    if z_s.stride(1) != 1 or (z_t is not None and z_t.stride(1) != 1):
        raise ValueError("the row kernel needs logits with unit column stride")
    rows, v_s = z_s.shape
    has_teacher = z_t is not None
    if has_teacher and z_t.shape[1] < vocab:
        raise ValueError(f"z_t has {z_t.shape[1]} columns, fewer than vocab = {vocab}")
    kd = torch.empty(rows, dtype=torch.float32, device=z_s.device)
    ce = torch.empty(rows, dtype=torch.float32, device=z_s.device)
    kd_w = kd_weight.to(torch.float32).contiguous()
    ce_w = ce_weight.to(torch.float32).contiguous()
    lab = kd if labels is None else labels.to(torch.int64).contiguous()  # any pointer when unused
    zt = z_t if has_teacher else z_s
    coef = float(coef)
    # log coef and log(1 - coef) in fp64 on the host (jsd's beta and the skews' alpha lie in (0, 1))
    log_a = math.log(coef) if 0.0 < coef < 1.0 else 0.0
    log_b = math.log1p(-coef) if 0.0 < coef < 1.0 else 0.0
    block = block or min(BLOCK_V, triton.next_power_of_2(v_s))
    _linear_kd_rows_kernel[(rows,)](
        z_s, z_s.stride(0), zt, zt.stride(0), lab, kd_w, ce_w, kd, ce,
        v_s, int(vocab), float(temperature), coef, log_a, log_b,
        float(student_softcap) or 1.0, float(teacher_softcap) or 1.0,
        DIV=CODES[divergence], HAS_TEACHER=has_teacher, HAS_LABELS=labels is not None,
        S_CAP=student_softcap != 0.0, T_CAP=teacher_softcap != 0.0, WANT_GRAD=bool(want_grad), BLOCK_V=block,
        num_warps=NUM_WARPS if block >= 1024 else 4,
    )
    return kd, ce

"""The token divergences of language-model distillation and their gradients, in closed form, on one
chunk of fp32 logits (docs/lm.md §1; SPEC §9). The pure-PyTorch rows of :mod:`mlkd_fast.linear_kd`.

Everything is written over *buckets*: a distribution P (teacher) and Q (student) over B buckets, given
as log-probabilities. A dense teacher has one bucket per vocabulary id; a sparse top-k teacher has its
k ids and, in ``"bucket"`` mode, one more for the rest of the vocabulary (the student's share of it is
``1 - sum`` of its probabilities on the k ids). For each divergence L(P, Q) we form, per bucket,

    QG_b = Q_b * dL/dQ_b          (the mass-weighted derivative: finite wherever L is)

because the gradient with respect to the student's tempered logits u (q = softmax(u), each vocabulary
id j in bucket b(j), Q_b the sum of its ids' q_j) is

    dL/du_j = q_j dL/dQ_b(j) - q_j sum_b QG_b = (q_j / Q_b(j)) QG_b(j) - q_j sum_b QG_b.

For a one-id bucket the first term is QG_b itself, so a dense teacher needs no division at all.

  divergence          L                                    QG_b
  forward_kl          sum P log(P / Q)                     -P_b
  reverse_kl          sum Q log(Q / P)                     Q_b (log Q_b - log P_b + 1)
  jsd (beta)          beta KL(P||M) + (1-beta) KL(Q||M),   (1 - beta) Q_b (log Q_b - log M_b)
                      M = beta P + (1 - beta) Q
  skew_forward_kl     KL(P || M), M = a P + (1 - a) Q      -(1 - a) P_b Q_b / M_b
  skew_reverse_kl     KL(Q || M), M = a Q + (1 - a) P      Q_b (log Q_b - log M_b + 1 - a Q_b / M_b)

(the jsd's derivative: beta and (1 - beta) M-terms cancel, leaving (1 - beta) log(Q_b / M_b)). jsd at
beta = 0 and 1 is the forward and the reverse KL exactly, as TRL's ``generalized_jsd_loss`` defines it
(the formula above would give 0 there). Terms with P_b = 0 (or Q_b = 0 where Q weighs) contribute
exactly 0, so ``-inf`` teacher logits never make a NaN; a reverse KL against a teacher that gives an id
probability 0 where the student does not is +inf, as it is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


def _times_log_ratio(weight_log: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """exp(weight_log) * (log_a - log_b), 0 where the weight is 0 (whatever the logs are)."""
    w = weight_log.exp()
    return torch.where(w > 0, w * (log_a - log_b), torch.zeros_like(w))


def _log_mix(coef: float, log_a: Tensor, log_b: Tensor) -> Tensor:
    """log(coef * a + (1 - coef) * b) for 0 < coef < 1."""
    return torch.logaddexp(log_a + math.log(coef), log_b + math.log1p(-coef))


def resolve(divergence: str, coef: float) -> str:
    """The divergence as computed: jsd at beta 0 / 1 is the forward / reverse KL (TRL), a skew KL at
    alpha 0 the plain one."""
    if divergence == "jsd":
        return "forward_kl" if coef == 0.0 else "reverse_kl" if coef == 1.0 else "jsd"
    if divergence in ("skew_forward_kl", "skew_reverse_kl") and coef == 0.0:
        return divergence[len("skew_"):]
    return divergence


def bucket_terms(log_p: Tensor, log_q: Tensor, divergence: str, coef: float, want_grad: bool
                 ) -> tuple[Tensor, Optional[Tensor]]:
    """Per-row divergence over buckets and, when ``want_grad``, QG_b (see the module docstring).

    ``log_p``, ``log_q``: ``(rows, B)`` log-probabilities (each row sums to 1 over its buckets).
    ``divergence`` is already :func:`resolve`'d; ``coef`` is beta (jsd) or alpha (skew)."""
    zero = torch.zeros((), dtype=log_q.dtype, device=log_q.device)
    if divergence == "forward_kl":
        rows = _times_log_ratio(log_p, log_p, log_q).sum(-1)
        return rows, (-log_p.exp() if want_grad else None)
    if divergence == "reverse_kl":
        terms = _times_log_ratio(log_q, log_q, log_p)
        rows = terms.sum(-1)
        return rows, (terms + log_q.exp() if want_grad else None)
    if divergence == "jsd":
        log_m = _log_mix(coef, log_p, log_q)
        kl_q = _times_log_ratio(log_q, log_q, log_m)
        rows = coef * _times_log_ratio(log_p, log_p, log_m).sum(-1) + (1.0 - coef) * kl_q.sum(-1)
        return rows, ((1.0 - coef) * kl_q if want_grad else None)
    if divergence == "skew_forward_kl":
        log_m = _log_mix(coef, log_p, log_q)
        rows = _times_log_ratio(log_p, log_p, log_m).sum(-1)
        if not want_grad:
            return rows, None
        ratio = torch.where(torch.isfinite(log_m), (log_p + log_q - log_m).exp(), zero)
        return rows, -(1.0 - coef) * ratio
    if divergence == "skew_reverse_kl":
        log_m = _log_mix(coef, log_q, log_p)
        terms = _times_log_ratio(log_q, log_q, log_m)
        rows = terms.sum(-1)
        if not want_grad:
            return rows, None
        q_over_m = torch.where(torch.isfinite(log_m), (log_q - log_m).exp(), zero)
        return rows, terms + log_q.exp() * (1.0 - coef * q_over_m)
    raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}; got {divergence!r}")


def softcap(z: Tensor, cap: float) -> Tensor:
    """c tanh(z / c), keeping -inf (a masked id stays masked)."""
    if cap == 0.0:
        return z
    return torch.where(z == -math.inf, z, cap * torch.tanh(z / cap))


def _tail_log(log_mass_k: Tensor) -> Tensor:
    """log(1 - sum exp(log_mass_k)) per row, 0 mass (-inf) where the k entries hold everything."""
    total = torch.logsumexp(log_mass_k, dim=-1, keepdim=True).clamp(max=0.0)
    return torch.log(-torch.expm1(total))


def token_rows(z_s: Tensor, *, z_t: Optional[Tensor], topk_indices: Optional[Tensor],
               topk_logprobs: Optional[Tensor], topk_rest: Optional[Tensor] = None, labels: Optional[Tensor], kd_weight: Tensor, ce_weight: Tensor,
               divergence: str, coef: float, temperature: float, student_softcap: float, teacher_softcap: float,
               vocab: int, topk_tail: bool, want_grad: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One chunk's per-token divergence and CE, and d(total)/d(z_s) when ``want_grad``.

    ``z_s``: ``(rows, V_s)`` student logits in the math dtype, before softcap and temperature; the
    teacher as ``z_t`` (``(rows, V_t)`` logits, same convention) or top-k (``(rows, k)`` ids and the
    log-probabilities stored for them, and optionally ``topk_rest``, the stored log-mass outside them,
    which the tail bucket then uses instead of log(1 - sum)). ``vocab``: the ids the divergence covers (the first ``vocab``);
    CE covers the student's whole vocabulary. total = sum(kd_weight * kd) + sum(ce_weight * ce); rows
    whose two weights are 0 get a zero gradient whatever their logits. Returns (kd, ce, grad)."""
    zc = softcap(z_s, student_softcap)
    log_q = torch.log_softmax(zc[:, :vocab] / temperature, dim=-1)
    if z_t is None and topk_indices is None:  # no teacher (kd_weight 0): CE only
        kd, grad_u = torch.zeros(zc.shape[0], dtype=zc.dtype, device=zc.device), None
        if want_grad:
            grad_u = torch.zeros_like(log_q)
    elif z_t is not None:
        log_p = torch.log_softmax(softcap(z_t[:, :vocab], teacher_softcap) / temperature, dim=-1)
        kd, qg = bucket_terms(log_p, log_q, divergence, coef, want_grad)
        grad_u = None if qg is None else qg - log_q.exp() * qg.sum(-1, keepdim=True)
    else:
        kd, grad_u = _sparse_rows(log_q, topk_indices, topk_logprobs, topk_rest, divergence, coef, temperature,
                                  topk_tail, want_grad)
    counted = (kd_weight != 0) | (ce_weight != 0)
    if labels is not None:
        valid = labels >= 0
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        lse = torch.logsumexp(zc, dim=-1)
        ce = torch.where(valid, lse - zc.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse))
    else:
        ce = torch.zeros_like(kd)
    if not want_grad:
        return kd, ce, None
    grad = torch.zeros_like(zc)
    grad[:, :vocab] = grad_u * (kd_weight / temperature)[:, None]
    if labels is not None:
        soft = torch.softmax(zc, dim=-1) * torch.where(valid, ce_weight, torch.zeros_like(ce_weight))[:, None]
        soft.scatter_add_(1, safe[:, None], torch.where(valid, -ce_weight, torch.zeros_like(ce_weight))[:, None])
        grad += soft
    if student_softcap != 0.0:
        # d softcap / dz = 1 - tanh^2; 0 at a -inf logit (kept -inf, it carries no gradient)
        grad *= torch.where(zc == -math.inf, torch.zeros_like(zc), 1.0 - (zc / student_softcap) ** 2)
    grad = torch.where(counted[:, None], grad, torch.zeros_like(grad))
    return kd, ce, grad


def _sparse_rows(log_q: Tensor, idx: Tensor, lp: Tensor, rest: Optional[Tensor], divergence: str, coef: float, temperature: float,
                 tail: bool, want_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The divergence against a top-k teacher, over k (+ tail) buckets, and dL/du over the vocabulary."""
    log_q_k = log_q.gather(1, idx)
    if tail:
        # the student's rest from its own entries outside the k ids (precise where they hold little)
        outside = log_q.scatter(1, idx, -math.inf)
        log_q_b = torch.cat([log_q_k, torch.logsumexp(outside, dim=-1, keepdim=True)], dim=-1)
        log_p_b = torch.cat([lp, _tail_log(lp) if rest is None else rest[:, None]], dim=-1)
        if temperature != 1.0:  # re-tempered over the stored buckets only: an approximation (docs/lm.md)
            log_p_b = torch.log_softmax(log_p_b / temperature, dim=-1)
    else:
        log_s = torch.logsumexp(log_q_k, dim=-1, keepdim=True)
        log_q_b = log_q_k - log_s
        log_p_b = torch.log_softmax(lp / temperature, dim=-1)
    kd, qg = bucket_terms(log_p_b, log_q_b, divergence, coef, want_grad)
    if qg is None:
        return kd, None
    if tail:
        # dL/du_j = (q_j / Q_b) QG_b - q_j sum QG: the tail's ids share QG_tail in proportion to q_j
        log_tail = log_q_b[:, -1:]
        share = torch.where(torch.isfinite(log_tail), (log_q - log_tail).exp(), torch.zeros_like(log_q))  # <= 1
        grad = share * qg[:, -1:] - log_q.exp() * qg.sum(-1, keepdim=True)
        grad.scatter_(1, idx, qg[:, :-1] - log_q_k.exp() * qg.sum(-1, keepdim=True))
        return kd, grad
    # renormalised over the k ids: dL/du_j = Qn_j (Gn_j - <Qn, Gn>) = QGn_j - Qn_j sum QGn, 0 elsewhere
    grad = torch.zeros_like(log_q)
    grad.scatter_(1, idx, qg - log_q_b.exp() * qg.sum(-1, keepdim=True))
    return kd, grad

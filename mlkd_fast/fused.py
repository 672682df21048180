"""The fused ops as functions: input checks (docs/design.md §4), backend dispatch, and the shared
reduction. Users reach them as :mod:`mlkd_fast.functional` ``.kd_kl_div`` / ``.correlation_kl``.

Every backend computes per-row losses; the reduction below is plain PyTorch on a length-N vector, so
it is identical for all backends, needs no host synchronisation and traces under ``torch.compile``.
Each call resolves its backend once (:func:`mlkd_fast.backends.resolve`) and calls that backend's
per-row function.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from . import _checks as check
from . import backends
from ._checks import REDUCTIONS
from .ops import KD_CE_NAMESPACE, eager_autograd_applies, math_dtype
from .terms import cross_entropy

__all__ = ["kd_kl_div", "kd_ce_loss", "correlation_kl", "explain", "REDUCTIONS"]


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
def _last_dim_contiguous(x: Tensor) -> Tensor:
    """Kernels take any row stride; they copy only when the last stride is not 1."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.stride(-1) != 1:  # a width-1 last dimension counts as contiguous whatever its stride
        x = x.as_strided(x.shape, (*x.stride()[:-1], 1))
    return x


def _real(value: object, name: str, positive: bool) -> float:
    """check.real, with the common case (a finite Python float) decided without its isinstance(Real)."""
    if type(value) is float and math.isfinite(value) and (value > 0 or not positive):
        return value
    return check.real(value, name, positive=positive)


_CONSTANT_ROWS: dict = {}


def _constant_rows(n: int, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.full((n,), value)``, kept for the next call with the same arguments (a step's batchmean
    weights are the same every step; the kernels only read them). Traced calls build it in the graph."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():  # inference tensors stay out
        return torch.full((n,), value, dtype=dtype, device=device)
    key = (n, value, dtype, device)
    w = _CONSTANT_ROWS.get(key)
    if w is None:
        if len(_CONSTANT_ROWS) >= 64:
            _CONSTANT_ROWS.clear()
        w = _CONSTANT_ROWS[key] = torch.full((n,), value, dtype=dtype, device=device)
    return w


# ---------------------------------------------------------------------------------------------
# temperature KL (docs/design.md §1.1)
# ---------------------------------------------------------------------------------------------
def kd_kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    reduction: str = "batchmean",
    row_mask: Optional[Tensor] = None,
    backend: str = "auto",
    weight: float = 1.0,
) -> Tensor:
    """Hinton KD loss ``T^2 * KL(softmax(t/T) || softmax(s/T))`` on raw logits.

    Args:
        student_logits: ``(..., C)`` logits of the student: fp32, fp16, bf16 or fp64.
        teacher_logits: same shape as ``student_logits``, any of those dtypes (it may differ from the
            student's: each is read in its own dtype, each gradient comes back in it). It receives a gradient only if it
            requires grad (online / mutual distillation); detach it otherwise. ``-inf`` entries are
            masked classes (probability 0, contribute exactly 0).
        temperature: T > 0.
        reduction: ``"batchmean"`` (sum / number of counted rows, default), ``"sum"``, ``"mean"``
            (sum / (rows * C), as ``torch.nn.functional.kl_div``) or ``"none"`` (per-row losses of
            shape ``(...)``, already times ``T^2``).
        row_mask: optional bool tensor of shape ``(...)``; False rows (padding tokens, say) give 0 and
            are not counted by ``batchmean``/``mean``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (see :mod:`mlkd_fast.backends`).
        weight: multiplies the result. Prefer it to multiplying afterwards: the fused backends fold
            it (and the reduction) into the gradient they store in the forward, so that the backward
            of ``total = ce + kd_kl_div(..., weight=w); total.backward()`` costs nothing (for fp32 and
            bf16 logits; fp16 ones keep the stored gradient scaled up against underflow, and their
            backward rescales it in one pass).

    Returns:
        An fp32 scalar, or the per-row vector for ``reduction="none"``; fp64 when either input is
        fp64 (the math is then fp64 on every backend; otherwise fp32, whatever the input dtypes).
    """
    s = check.float_tensor(student_logits, "student_logits")
    t = check.float_tensor(teacher_logits, "teacher_logits")
    if s.ndim < 2:
        raise ValueError(f"student_logits must have shape (N, C) (or (..., C)), got ndim {s.ndim}")
    if t.ndim != s.ndim:
        raise ValueError(f"teacher_logits must have shape {tuple(s.shape)} like student_logits, got ndim {t.ndim}")
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"student_logits and teacher_logits disagree on the rows N: {tuple(s.shape)} vs {tuple(t.shape)}")
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"student_logits and teacher_logits disagree on the classes C: {s.shape[-1]} vs {t.shape[-1]}")
    if s.numel() == 0:
        raise ValueError(f"empty batch: student_logits has shape {tuple(s.shape)}")
    temperature = _real(temperature, "temperature", True)
    reduction = check.reduction(reduction)
    weight = _real(weight, "weight", False)
    if row_mask is not None:
        if not isinstance(row_mask, Tensor):
            raise TypeError(f"row_mask must be a bool torch.Tensor, got {type(row_mask).__name__}")
        if row_mask.dtype != torch.bool:
            raise TypeError(f"row_mask must have dtype torch.bool, got {row_mask.dtype}")
        if row_mask.shape != s.shape[:-1]:
            raise ValueError(f"row_mask must have shape {tuple(s.shape[:-1])} (the rows N), got {tuple(row_mask.shape)}")
    device = s.device
    if t.device != device or (row_mask is not None and row_mask.device != device):
        device = check.same_device({"student_logits": s, "teacher_logits": t, "row_mask": row_mask})
    impl = backends.resolve(backend, device, op="kd_kl")

    lead_shape = s.shape[:-1]
    num_classes = s.shape[-1]
    s2 = _last_dim_contiguous(s if s.ndim == 2 else s.reshape(-1, num_classes))
    t2 = _last_dim_contiguous(t if t.ndim == 2 else t.reshape(-1, num_classes))
    mask = None if row_mask is None else row_mask.reshape(-1)

    # every backend takes its row weights in the math dtype: fp64 when an input is fp64, else fp32
    row_weight = _kd_row_weights(mask, s2.shape[0], num_classes, reduction, weight, math_dtype(s2, t2), device)
    rows = impl.kd_kl_rows(s2, t2, temperature, row_weight)
    return rows.reshape(lead_shape) if reduction == "none" else rows.sum()


def _kd_row_weights(mask: Optional[Tensor], n: int, c: int, reduction: str, weight: float, dtype: torch.dtype,
                    device: torch.device) -> Optional[Tensor]:
    """w_i with loss = sum_i w_i T^2 l_i (or the vector w_i T^2 l_i): the mask, the reduction's divisor
    and the loss weight in one length-N vector, computed on the device (no host sync); None means 1."""
    divisor = c if reduction == "mean" else 1
    if mask is None:
        scale = weight / (n * divisor) if reduction in ("batchmean", "mean") else weight
        return None if scale == 1.0 else _constant_rows(n, scale, dtype, device)
    w = mask.to(dtype)
    if reduction in ("batchmean", "mean"):
        return w * (weight / divisor) / mask.sum().to(dtype).clamp_min(1)
    return w if weight == 1.0 else w * weight


# ---------------------------------------------------------------------------------------------
# the KD method's whole loss: CE and the temperature KL in one pass (docs/design.md §1.1)
# ---------------------------------------------------------------------------------------------
_ONE_PASS_TEACHER = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _one_pass_available() -> bool:
    """Whether the compiled library is loaded and has the kd_ce kernel (an older build has not)."""
    from . import _native

    return _native.LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"{KD_CE_NAMESPACE}::kd_ce", "CPU")


def kd_ce_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    w_kd: float = 1.0,
    w_ce: float = 1.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """The KD method's whole loss, ``w_ce CE(s, y) + w_kd T^2 KL(softmax(t/T) || softmax(s/T))``, each
    term a mean over the rows, in one pass over the logits where it can be.

    Args:
        student_logits: ``(N, C)`` logits of the student (fp32, fp16, bf16 or fp64).
        teacher_logits: ``(N, C)`` logits of the teacher, any of those dtypes; constants (no gradient
            reaches them: detach them, or use :func:`kd_kl_div` for a teacher that trains).
            ``-inf`` entries are masked classes, as in :func:`kd_kl_div`.
        target: ``(N,)`` integer class indices in ``[0, C)`` (an index out of range raises an
            IndexError, as ``F.cross_entropy`` does).
        temperature: T > 0.
        w_kd, w_ce: the terms' weights (finite reals).
        backend: as for :func:`kd_kl_div`.

    Returns:
        ``(total, kd, ce)``: the fp32 scalar loss (fp64 for fp64 logits), differentiable with respect
        to ``student_logits``, and its two weighted terms, detached (for logging).

    Where the backend is ``native`` and the student's logits are fp32 on the CPU (outside
    ``torch.compile``), one compiled op computes both terms and the gradient in one sweep of each row
    (csrc/cpu/kd_ce.cpp) and records one autograd node written in C++, whose backward hands back the
    stored gradient: at classification sizes the Python around a loss, not its arithmetic, is what a
    CPU step pays for it. Everywhere else the two terms are :func:`mlkd_fast.terms.cross_entropy` and
    :func:`kd_kl_div`, the same values to rounding.
    """
    s, t = student_logits, teacher_logits
    if (eager_autograd_applies(s, t, target) and s.dtype == torch.float32 and t.dtype in _ONE_PASS_TEACHER
            and s.ndim == 2 and t.shape == s.shape and target.ndim == 1 and target.shape[0] == s.shape[0]
            and s.numel() > 0 and s.device.type == "cpu" and t.device.type == "cpu" and target.device.type == "cpu"
            and not target.is_floating_point() and target.dtype != torch.bool and _one_pass_available()
            and backends.resolve(backend, s.device, op="kd_kl").name == "native"):
        return getattr(torch.ops, KD_CE_NAMESPACE).kd_ce(s, t.detach(), target, _real(temperature, "temperature", True),
                                                         _real(w_kd, "w_kd", False), _real(w_ce, "w_ce", False))
    s, t = check.logit_pair(s, t)
    target = check.labels(target, s.shape[0])
    temperature = _real(temperature, "temperature", True)
    w_kd, w_ce = _real(w_kd, "w_kd", False), _real(w_ce, "w_ce", False)
    kd = kd_kl_div(s, t.detach(), temperature, weight=w_kd, backend=backend)
    if w_ce == 0.0:
        return kd, kd.detach(), torch.zeros((), dtype=kd.dtype, device=kd.device)
    ce = cross_entropy(s, target)
    if w_ce != 1.0:
        ce = w_ce * ce
    return ce + kd, kd.detach(), ce.detach()


# ---------------------------------------------------------------------------------------------
# correlation KL (docs/design.md §1.2)
# ---------------------------------------------------------------------------------------------
def correlation_kl(
    student_feats: Tensor,
    teacher_feats: Tensor,
    student_cols: Optional[Tensor] = None,
    teacher_cols: Optional[Tensor] = None,
    tau: float = 0.5,
    reduction: str = "batchmean",
    keep_diagonal: bool = False,
    scale_by_tau_sq: bool = False,
    backend: str = "auto",
    cols_start_with_rows: bool = False,
) -> Tensor:
    """KL between the row-softmaxes of the teacher and student batch cosine-similarity matrices.

    ``S = normalize(rows) @ normalize(cols).T / tau`` for each network, ``P = softmax_row(S_t)``,
    ``Q = softmax_row(S_s)``, ``l_i = KL(P_i || Q_i)``.

    Args:
        student_feats: ``(M, Ds)`` student row features (gets the gradient); fp32, fp16, bf16 or fp64.
        teacher_feats: ``(M, Dt)`` teacher row features; always treated as constants (detached). Any
            of those dtypes, which may differ from the student's (the gradient comes back in each
            student tensor's own dtype).
        student_cols, teacher_cols: optional ``(N, Ds)`` / ``(N, Dt)`` column features
            (rectangular mode, e.g. rotated rows vs plain columns). Both or neither. Without them
            the matrix is square (columns = rows).
        tau: similarity temperature > 0.
        reduction: ``"batchmean"`` (sum / M, default), ``"sum"``, ``"mean"`` (sum / (M * counted
            columns)), ``"none"`` (per-row vector of length M).
        keep_diagonal: keep the self-similarity column (excluded by default) in square mode or
            with ``cols_start_with_rows``; there is none to exclude otherwise.
        scale_by_tau_sq: multiply the loss by ``tau^2`` (SSKD style).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.
        cols_start_with_rows: rectangular mode where the first M columns are the M rows themselves
            (student and teacher alike): one shard of a larger batch against the whole batch, its own
            rows first (``N >= M``). Row i then leaves out column i, as in square mode, and its loss
            equals row i's of the square loss over the whole batch; with every shard's rows taken
            once, the shards' losses make up the square one (how MLKDLoss splits a global-batch
            correlation over DDP processes). Not checked: the caller places the rows first.

    Returns:
        An fp32 scalar (or per-row vector), fp64 when any feature tensor is fp64 (the math is then
        fp64; otherwise fp32 or better, whatever the input dtypes).

    Degenerate batches: when each row has fewer than 2 columns to compare with (a square batch of
    1 or 2 rows with the diagonal excluded, 1 row with it kept, a shard of such a batch, or a single
    column), every row's softmax is a one-point distribution and its KL is exactly 0. The loss is
    then exactly 0 with exactly zero gradients on every backend (NaN features still give NaN), so
    that a small last batch never stops training. No columns at all (an empty column tensor) is an
    error.
    """
    a_s = check.float_tensor(student_feats, "student_feats")
    a_t = check.float_tensor(teacher_feats, "teacher_feats")
    for x, name in ((a_s, "student_feats"), (a_t, "teacher_feats")):
        if x.ndim != 2:
            raise ValueError(f"{name} must have shape (M, D), got ndim {x.ndim}")
    if a_s.shape[0] != a_t.shape[0]:
        raise ValueError(f"student_feats and teacher_feats disagree on the rows M: {a_s.shape[0]} vs {a_t.shape[0]}")
    if (student_cols is None) != (teacher_cols is None):
        raise ValueError("student_cols and teacher_cols must be given together (rectangular mode) or not at all")
    square = student_cols is None
    if not square:
        b_s = check.float_tensor(student_cols, "student_cols")
        b_t = check.float_tensor(teacher_cols, "teacher_cols")
        for x, name in ((b_s, "student_cols"), (b_t, "teacher_cols")):
            if x.ndim != 2:
                raise ValueError(f"{name} must have shape (N, D), got ndim {x.ndim}")
        if b_s.shape[0] != b_t.shape[0]:
            raise ValueError(f"student_cols and teacher_cols disagree on the columns N: {b_s.shape[0]} vs {b_t.shape[0]}")
        if b_s.shape[1] != a_s.shape[1]:
            raise ValueError(f"student_cols must have Ds = {a_s.shape[1]} features like student_feats, got {b_s.shape[1]}")
        if b_t.shape[1] != a_t.shape[1]:
            raise ValueError(f"teacher_cols must have Dt = {a_t.shape[1]} features like teacher_feats, got {b_t.shape[1]}")
    else:
        b_s = b_t = None
    if a_s.shape[0] == 0:
        raise ValueError("empty batch: student_feats and teacher_feats have no rows (M = 0)")
    if b_s is not None and b_s.shape[0] == 0:
        raise ValueError("student_cols and teacher_cols have no rows: a correlation needs at least one column (N = 0)")
    if a_s.shape[1] == 0 or a_t.shape[1] == 0:
        raise ValueError("student_feats and teacher_feats need at least one feature column")
    tau = _real(tau, "tau", True)
    reduction = check.reduction(reduction)
    device = check.same_device(
        {"student_feats": a_s, "teacher_feats": a_t, "student_cols": b_s, "teacher_cols": b_t}
    )
    n_cols = a_s.shape[0] if square else b_s.shape[0]
    if not square and cols_start_with_rows and n_cols < a_s.shape[0]:
        raise ValueError(f"cols_start_with_rows: the columns must hold the M = {a_s.shape[0]} rows first, "
                         f"but there are only N = {n_cols}")
    rows_in_cols = square or bool(cols_start_with_rows)  # row i is column i: (i, i) is its self-similarity
    exclude_diagonal = rows_in_cols and not keep_diagonal
    counted_cols = n_cols - 1 if exclude_diagonal else n_cols
    impl = backends.resolve(backend, device, op="correlation")
    if counted_cols < 2:
        # One-point (or empty) row distributions: KL exactly 0. Decided by the shapes alone (no host sync).
        rows = _zero_rows(a_s, None if square else b_s, math_dtype(a_s, a_t, b_s, b_t))
        return _correlation_reduce(rows, reduction, tau, scale_by_tau_sq, max(counted_cols, 1))

    a_s = _last_dim_contiguous(a_s)
    a_t = _last_dim_contiguous(a_t.detach())
    if not square:
        b_s = _last_dim_contiguous(b_s)
        b_t = _last_dim_contiguous(b_t.detach())
    rows = impl.correlation_rows(a_s, a_t, b_s, b_t, tau, exclude_diagonal)

    return _correlation_reduce(rows, reduction, tau, scale_by_tau_sq, counted_cols)


def _zero_rows(student_rows: Tensor, student_cols: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Per-row losses of a degenerate correlation: exactly 0, and exactly zero gradients for the student
    features (x * 0 keeps a NaN input NaN, never hides it; summed after the product, so no overflow)."""
    rows = student_rows.to(dtype).mul(0).sum(dim=-1)
    if student_cols is not None:
        rows = rows + student_cols.to(dtype).mul(0).sum()
    return rows


def _correlation_reduce(rows: Tensor, reduction: str, tau: float, scale_by_tau_sq: bool, counted_cols: int) -> Tensor:
    if scale_by_tau_sq:
        rows = rows * (tau * tau)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / rows.shape[0]
    return total / (rows.shape[0] * counted_cols)



# ---------------------------------------------------------------------------------------------
# which backend and path a call takes (docs/design.md §5.1)
# ---------------------------------------------------------------------------------------------
def explain(op, *args, **kwargs) -> backends.Choice:
    """Which backend and path ``op(*args, **kwargs)`` would take, and why, without running it.

    ``op`` is :func:`kd_kl_div` or :func:`correlation_kl` (or its name); the arguments are the call's
    own: the real tensors, or ``torch.empty`` ones of the same shapes on the same device (the choice
    reads only shapes, the device and the environment, never values). Returns a
    :class:`mlkd_fast.backends.Choice` (``backend``, ``path``, ``reason``; ``str()`` reads as a sentence):

    >>> import torch, mlkd_fast
    >>> f = torch.randn(64, 512)
    >>> mlkd_fast.explain("correlation_kl", f, f).path in ("dense", "materialised")
    True
    """
    import inspect

    name = getattr(op, "__name__", op)
    if name not in ("kd_kl_div", "correlation_kl"):
        raise ValueError(f"explain: op must be kd_kl_div or correlation_kl, got {op!r}")
    fn = kd_kl_div if name == "kd_kl_div" else correlation_kl
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if name == "kd_kl_div":
        s = check.float_tensor(a["student_logits"], "student_logits")
        rows = s.numel() // max(s.shape[-1], 1) if s.ndim else 0
        return backends.choose("kd_kl", s.device, rows, backend=a["backend"])
    f = check.float_tensor(a["student_feats"], "student_feats")
    cols_t = a["student_cols"]
    square = cols_t is None
    rows, cols = f.shape[0], (f.shape[0] if square else cols_t.shape[0])
    exclude = (square or bool(a["cols_start_with_rows"])) and not a["keep_diagonal"]
    choice = backends.choose("correlation", f.device, rows, cols, backend=a["backend"])
    if (cols - 1 if exclude else cols) < 2:
        return backends.Choice("correlation", choice.backend, "zero",
                               "fewer than 2 columns to compare each row with: the loss is exactly 0, no kernel runs")
    return choice

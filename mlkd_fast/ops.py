"""The contract of the fused ops (docs/design.md §3), defined once for every op namespace.

Two backends implement these ops with their own kernels, both under the schemas of
:data:`SCHEMAS` and nowhere else: the compiled ``csrc/`` library in the namespace ``mlkd_fast``
(:func:`define_schemas` declares them, then the library registers its kernels) and the Triton kernels
in ``mlkd_fast_triton`` (:func:`define_ops`). This module holds what
both share: the schemas, the constants, the fake (meta) implementations, the autograd, and the
Python side of calling the ops (:func:`fused_kd_kl_rows`, :func:`fused_correlation_rows`). It
imports nothing of the package, so that every other module may import it.

Dtypes: inputs fp32/fp16/bf16/fp64 in any student/teacher combination; loss rows, log-sum-exps and
row weights in the math dtype (:func:`math_dtype`); each gradient in its input's dtype.
``kd_kl`` returns the per-row loss with the gradients already computed (the loss is final, so the
forward knows them), both times the row weights w_i (the reduction and the loss weight, folded in by
:mod:`mlkd_fast.fused`). Its backward only scales them by d loss / d row on the device: in
place when autograd frees the graph after this backward, where rows with d loss / d row = 1 (all of
them after ``total.backward()``) cost nothing; out of place when the graph is kept
(``retain_graph``, ``create_graph``) or traced by ``torch.compile``.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

NATIVE_NAMESPACE = "mlkd_fast"
TRITON_NAMESPACE = "mlkd_fast_triton"

# Rows are normalised as x / max(||x||, NORM_EPS) (docs/design.md §1.2). The compiled library holds
# the same value in C++ (kNormEps).
NORM_EPS = 1e-8

# The schema of every fused op, as ``str(torch.ops.<namespace>.<op>.default._schema)`` prints it
# without the namespace. ``scale_rows_`` scales ``x`` in place and leaves the rows with g == 1 untouched.
SCHEMAS: dict[str, str] = {
    "kd_kl": "kd_kl(Tensor student, Tensor teacher, Tensor? row_weight, float temperature, bool student_grad, "
             "bool teacher_grad) -> (Tensor, Tensor, Tensor)",
    "scale_rows": "scale_rows(Tensor x, Tensor g) -> Tensor",
    "scale_rows_": "scale_rows_(Tensor(a!) x, Tensor g) -> ()",
    "correlation_fwd": "correlation_fwd(Tensor student_rows, Tensor teacher_rows, Tensor? student_cols, "
                       "Tensor? teacher_cols, float tau, bool exclude_diagonal) -> (Tensor, Tensor, Tensor)",
    "correlation_bwd": "correlation_bwd(Tensor grad_rows, Tensor student_rows, Tensor teacher_rows, "
                       "Tensor? student_cols, Tensor? teacher_cols, Tensor lse_s, Tensor lse_t, float tau, "
                       "bool exclude_diagonal) -> (Tensor, Tensor)",
}


# The compiled library's materialised correlation (docs/design.md §5.1), CPU only, in a namespace of its
# own (the table above is the contract every fused backend implements; these two ops are one backend's
# path): the forward returns the loss rows and, when ``student_grad``, the gradient operand
# ``G0 = (Q - P) / tau`` (M x N, 0 on an excluded diagonal), which its backward multiplies by the
# features. Declared with the native namespace (:func:`define_schemas`), their fakes and autograd
# registered with its own (:func:`register_fakes_and_autograd`).
DENSE_NAMESPACE = "mlkd_fast_dense"
DENSE_SCHEMAS: dict[str, str] = {
    "correlation_fwd": "correlation_fwd(Tensor student_rows, Tensor teacher_rows, Tensor? student_cols, "
                       "Tensor? teacher_cols, float tau, bool exclude_diagonal, bool student_grad) -> (Tensor, Tensor)",
    "correlation_bwd": "correlation_bwd(Tensor grad_rows, Tensor grad_operand, Tensor student_rows, "
                       "Tensor? student_cols) -> (Tensor, Tensor)",
}

# The compiled library's row function of the fused lm_head + divergence loss (mlkd_fast/linear_kd.py, the
# ``native`` backend; csrc/cpu/linear_kd_rows.cpp), CPU only, in a namespace of its own: one chunk's fp32
# student logits ``z_s`` (rows, V_s), overwritten by d(total)/d(z_s) when ``want_grad``, and the teacher's
# (rows, >= vocab; fp32, bf16 or fp16) in; the fp32 kd and ce rows out (the contract of
# :func:`mlkd_fast.divergences.token_rows`, dense teacher). Called inside the linear_kd op's forward, so it
# has no autograd of its own. Declared with the native namespace (:func:`define_schemas`).
LM_NAMESPACE = "mlkd_fast_lm_native"
LM_SCHEMAS: dict[str, str] = {
    "token_rows": "token_rows(Tensor(a!) z_s, Tensor? z_t, Tensor? labels, Tensor kd_weight, Tensor ce_weight, "
                  "str divergence, float coef, float temperature, float student_softcap, float teacher_softcap, "
                  "int vocab, bool want_grad) -> (Tensor, Tensor)",
}

# The compiled library's KD method loss in one pass (csrc/cpu/kd_ce.cpp; :func:`mlkd_fast.fused.kd_ce_loss`),
# CPU only, in a namespace of its own: ``w_ce`` CE + ``w_kd T^2`` KL, each a mean over the rows, of fp32
# student logits (N, C), the teacher's (fp32, bf16 or fp16) and integer targets. ``kd_ce_fwd`` returns
# the fp32 total, kd and ce terms and, with ``student_grad``, d(total)/d(student) ((0,) otherwise);
# ``kd_ce`` returns the three terms, its autograd registered in C++ (one node, no Python on an eager
# step's path). Declared with the native namespace (:func:`define_schemas`).
KD_CE_NAMESPACE = "mlkd_fast_kd_ce"
KD_CE_SCHEMAS: dict[str, str] = {
    "kd_ce_fwd": "kd_ce_fwd(Tensor student, Tensor teacher, Tensor target, float temperature, float w_kd, "
                 "float w_ce, bool student_grad) -> (Tensor, Tensor, Tensor, Tensor)",
    "kd_ce": "kd_ce(Tensor student, Tensor teacher, Tensor target, float temperature, float w_kd, float w_ce) "
             "-> (Tensor, Tensor, Tensor)",
}


def math_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype of the loss rows, statistics and row weights: fp64 when any input is fp64 (so that
    fp64 inputs keep fp64 math, e.g. for gradcheck), else fp32. ``None`` entries are skipped."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


# ---------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes and dtypes only
# ---------------------------------------------------------------------------------------------
def _fake_kd_kl(student, teacher, row_weight, temperature, student_grad, teacher_grad):
    n, c = student.shape
    rows = student.new_empty(n, dtype=math_dtype(student, teacher))
    grad_s = student.new_empty((n, c)) if student_grad else student.new_empty(0)
    grad_t = teacher.new_empty((n, c)) if teacher_grad else teacher.new_empty(0)
    return rows, grad_s, grad_t


def _fake_scale_rows(x, g):
    return x.new_empty(x.shape)


def _fake_scale_rows_inplace(x, g):
    return None


def _fake_correlation_fwd(a_s, a_t, b_s, b_t, tau, exclude_diagonal):
    return tuple(a_s.new_empty(a_s.shape[0], dtype=math_dtype(a_s, a_t, b_s, b_t)) for _ in range(3))


def _fake_correlation_bwd(g, a_s, a_t, b_s, b_t, lse_s, lse_t, tau, exclude_diagonal):
    return a_s.new_empty(a_s.shape), (b_s.new_empty(b_s.shape) if b_s is not None else a_s.new_empty(0))


def _fake_dense_correlation_fwd(a_s, a_t, b_s, b_t, tau, exclude_diagonal, student_grad):
    dtype = math_dtype(a_s, a_t, b_s, b_t)
    n = a_s.shape[0] if b_s is None else b_s.shape[0]
    rows = a_s.new_empty(a_s.shape[0], dtype=dtype)
    return rows, (a_s.new_empty((a_s.shape[0], n), dtype=dtype) if student_grad else a_s.new_empty(0, dtype=dtype))


def _fake_dense_correlation_bwd(g, grad_operand, a_s, b_s):
    return a_s.new_empty(a_s.shape), (b_s.new_empty(b_s.shape) if b_s is not None else a_s.new_empty(0))


def _fake_lm_token_rows(z_s, z_t, labels, kd_weight, ce_weight, divergence, coef, temperature, student_softcap,
                        teacher_softcap, vocab, want_grad):
    return z_s.new_empty(z_s.shape[0]), z_s.new_empty(z_s.shape[0])


def _fake_kd_ce_fwd(student, teacher, target, temperature, w_kd, w_ce, student_grad):
    scalars = tuple(student.new_empty((), dtype=torch.float32) for _ in range(3))
    return (*scalars, student.new_empty(student.shape) if student_grad else student.new_empty(0))


def _fake_kd_ce(student, teacher, target, temperature, w_kd, w_ce):
    return tuple(student.new_empty((), dtype=torch.float32) for _ in range(3))


DENSE_FAKES: dict[str, Callable] = {
    "correlation_fwd": _fake_dense_correlation_fwd,
    "correlation_bwd": _fake_dense_correlation_bwd,
}


FAKES: dict[str, Callable] = {
    "kd_kl": _fake_kd_kl,
    "scale_rows": _fake_scale_rows,
    "scale_rows_": _fake_scale_rows_inplace,
    "correlation_fwd": _fake_correlation_fwd,
    "correlation_bwd": _fake_correlation_bwd,
}


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------
def graph_freed_after_this_backward(grad_rows: Tensor) -> bool:
    """Whether the running backward is plain eager autograd and the last use of the saved tensors (no
    ``retain_graph`` or ``create_graph``; not traced by torch.compile, AOTAutograd or any dispatch
    mode), so that a stored gradient may be scaled in place and handed on. Unknown means no."""
    if torch.compiler.is_compiling() or type(grad_rows) is not torch.Tensor:
        return False
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None:
        return False
    try:
        return not keep_graph()
    except RuntimeError:  # not inside an autograd graph task
        return False


def _stored_kd_kl_grads(ops, stored: tuple, flags: tuple, grad_rows: Tensor) -> list:
    """The KL's backward: its stored gradients scaled by d loss / d row, in place when autograd frees the
    graph after this backward (rows with factor 1 untouched), else as copies; None where not wanted."""
    wanted = tuple(zip(stored, flags))
    if graph_freed_after_this_backward(grad_rows):
        grads = []
        for x, flag in wanted:
            if flag:
                ops.scale_rows_(x, grad_rows)
            grads.append(x.detach() if flag else None)
        return grads
    return [ops.scale_rows(x, grad_rows) if flag else None for x, flag in wanted]


_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def eager_autograd_applies(*tensors: Tensor) -> bool:
    """Whether :class:`_EagerKdKl` may stand in for the registered autograd: plain tensors in plain eager
    autograd (not traced, no functorch transform, no tensor subclass)."""
    return (_BELOW_AUTOGRAD is not None and not torch.compiler.is_compiling() and not _FUNCTORCH_ACTIVE()
            and all(type(x) is Tensor for x in tensors))


class _EagerKdKl(torch.autograd.Function):
    """A namespace's ``kd_kl`` with the same backward as its registered autograd, for eager calls:
    the kernel is called below autograd directly, without the Python wrapper of
    ``torch.library.register_autograd`` (which refills the schema's defaults and redispatches on every
    call: ~30 us, a quarter of a (64, 100) KL's forward + backward). Under torch.compile the op is
    called as registered (:func:`fused_kd_kl_rows` picks)."""

    @staticmethod
    def forward(ctx, student, teacher, row_weight, temperature, student_grad, teacher_grad, namespace):
        ops = getattr(torch.ops, namespace)
        with _BELOW_AUTOGRAD():
            rows, grad_s, grad_t = ops.kd_kl.default(student, teacher, row_weight, temperature, student_grad,
                                                     teacher_grad)
        ctx.set_materialize_grads(False)
        ctx.namespace, ctx.flags = namespace, (student_grad, teacher_grad)
        ctx.save_for_backward(grad_s, grad_t)
        ctx.mark_non_differentiable(grad_s, grad_t)
        return rows, grad_s, grad_t

    @staticmethod
    def backward(ctx, grad_rows, _grad_s, _grad_t):
        if grad_rows is None:
            return None, None, None, None, None, None, None
        ops = getattr(torch.ops, ctx.namespace)
        return (*_stored_kd_kl_grads(ops, ctx.saved_tensors, ctx.flags, grad_rows), None, None, None, None, None)


def register_fakes_and_autograd(namespace: str) -> None:
    """Registers the fakes of ``namespace``'s ops and the autograd of its ``kd_kl`` and
    ``correlation_fwd`` (whose backwards call its ``scale_rows``/``scale_rows_`` and ``correlation_bwd``)."""
    ops = getattr(torch.ops, namespace)

    def kd_kl_setup_context(ctx, inputs, output):
        # The stored-gradient outputs never receive a gradient; without this autograd would fill an
        # (N, C) tensor of zeros for each of them on every backward (a full extra pass over memory).
        ctx.set_materialize_grads(False)
        ctx.student_grad, ctx.teacher_grad = inputs[4], inputs[5]
        ctx.save_for_backward(output[1], output[2])

    def kd_kl_backward(ctx, grad_rows, _grad_s, _grad_t):
        if grad_rows is None:
            return None, None, None, None, None, None
        return (*_stored_kd_kl_grads(ops, ctx.saved_tensors, (ctx.student_grad, ctx.teacher_grad), grad_rows),
                None, None, None, None)

    def corr_setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        a_s, a_t, b_s, b_t, tau, exclude_diagonal = inputs
        ctx.tau, ctx.exclude_diagonal, ctx.square = tau, exclude_diagonal, b_s is None
        if ctx.square:
            ctx.save_for_backward(a_s, a_t, output[1], output[2])
        else:
            ctx.save_for_backward(a_s, a_t, b_s, b_t, output[1], output[2])

    def corr_backward(ctx, grad_rows, _grad_lse_s, _grad_lse_t):
        if grad_rows is None:  # only the statistics were used: they carry no gradient (as in kd_kl)
            return None, None, None, None, None, None
        if ctx.square:
            a_s, a_t, lse_s, lse_t = ctx.saved_tensors
            b_s = b_t = None
        else:
            a_s, a_t, b_s, b_t, lse_s, lse_t = ctx.saved_tensors
        d_a, d_b = ops.correlation_bwd(grad_rows, a_s, a_t, b_s, b_t, lse_s, lse_t, ctx.tau, ctx.exclude_diagonal)
        return d_a, None, (None if ctx.square else d_b), None, None, None

    for name, fake in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
    torch.library.register_autograd(f"{namespace}::kd_kl", kd_kl_backward, setup_context=kd_kl_setup_context)
    torch.library.register_autograd(f"{namespace}::correlation_fwd", corr_backward, setup_context=corr_setup_context)
    if namespace == NATIVE_NAMESPACE:
        _register_dense_fakes_and_autograd()
        torch.library.register_fake(f"{LM_NAMESPACE}::token_rows", _fake_lm_token_rows)
        torch.library.register_fake(f"{KD_CE_NAMESPACE}::kd_ce_fwd", _fake_kd_ce_fwd)
        torch.library.register_fake(f"{KD_CE_NAMESPACE}::kd_ce", _fake_kd_ce)


def _register_dense_fakes_and_autograd() -> None:
    """The fakes and the autograd of the materialised correlation (:data:`DENSE_SCHEMAS`): the backward
    multiplies the stored gradient operand by the student features; nothing is recomputed."""
    dense = getattr(torch.ops, DENSE_NAMESPACE)

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        a_s, _a_t, b_s, _b_t, _tau, _exclude_diagonal, _student_grad = inputs
        ctx.square = b_s is None
        ctx.save_for_backward(output[1], a_s, *(() if ctx.square else (b_s,)))

    def backward(ctx, grad_rows, _grad_operand):
        if grad_rows is None:
            return None, None, None, None, None, None, None
        grad_operand, a_s, *cols = ctx.saved_tensors
        d_a, d_b = dense.correlation_bwd(grad_rows, grad_operand, a_s, cols[0] if cols else None)
        return d_a, None, (None if ctx.square else d_b), None, None, None, None

    for name, fake in DENSE_FAKES.items():
        torch.library.register_fake(f"{DENSE_NAMESPACE}::{name}", fake)
    torch.library.register_autograd(f"{DENSE_NAMESPACE}::correlation_fwd", backward, setup_context=setup_context)


def define_ops(namespace: str, impls: Mapping[str, Callable]) -> None:
    """Defines every op of :data:`SCHEMAS` in ``namespace`` with ``impls[name]`` as its CPU and CUDA
    kernel, then registers the fakes and the autograd. For backends whose kernels are Python
    functions (Triton)."""
    missing = set(SCHEMAS) - set(impls)
    if missing:
        raise ValueError(f"define_ops({namespace!r}): no implementation for {', '.join(sorted(missing))}")
    define_schemas(namespace)
    for name in SCHEMAS:
        torch.library.impl(f"{namespace}::{name}", ("CPU", "CUDA"), impls[name])
    register_fakes_and_autograd(namespace)


_DECLARED: set[str] = set()


def define_schemas(namespace: str) -> None:
    """Declares every op of :data:`SCHEMAS` in ``namespace``, without kernels (once per process): the
    Triton backend adds Python ones (:func:`define_ops`), the compiled library its C++ and CUDA ones
    when loaded."""
    if namespace in _DECLARED:
        return
    for name, schema in SCHEMAS.items():
        torch.library.define(f"{namespace}::{name}", schema[len(name):])
    if namespace == NATIVE_NAMESPACE:  # the compiled library's own materialised correlation
        for name, schema in DENSE_SCHEMAS.items():
            torch.library.define(f"{DENSE_NAMESPACE}::{name}", schema[len(name):])
        for name, schema in LM_SCHEMAS.items():  # and the LM loss's row function
            torch.library.define(f"{LM_NAMESPACE}::{name}", schema[len(name):])
        for name, schema in KD_CE_SCHEMAS.items():  # and the KD method's one-pass loss
            torch.library.define(f"{KD_CE_NAMESPACE}::{name}", schema[len(name):])
    _DECLARED.add(namespace)


# ---------------------------------------------------------------------------------------------
# calling the ops: the per-row functions of the fused backends (docs/design.md §1)
# ---------------------------------------------------------------------------------------------
def fp16_gradient_scale(s: Tensor, t: Tensor, row_weight: Optional[Tensor], temperature: float) -> Optional[Tensor]:
    """Per-row powers of two S_i when a gradient stored in the forward is fp16, else None.

    The kernels store w_i d(T^2 l_i)/ds = w_i T (q - p) in the input dtype. In fp16 with w_i = 1/N
    most entries would be subnormal, and a GradScaler's factor, which reaches the KL only in the
    backward, cannot bring back the lost bits (at N = 512, 64% of the entries would be off by more
    than 0.2%). So the kernels get w_i S_i, with S_i making the largest possible student entry
    ~1024, and the loss rows are divided by S_i exactly: the backward then rescales the stored
    gradient by g_i / S_i (a pass that bf16 and fp32 do not need). The teacher gradient has no such
    bound (it grows with the logit gap), so when it is stored too S_i only undoes w_i: the gradients
    are stored unweighted. Each gradient is stored in its input's dtype, so an fp16 student beside an
    fp32 or fp64 teacher needs S_i as much as two fp16 inputs do."""
    if not torch.is_grad_enabled():
        return None
    if not ((s.requires_grad and s.dtype == torch.float16) or (t.requires_grad and t.dtype == torch.float16)):
        return None
    w = torch.ones(s.shape[0], dtype=math_dtype(s, t), device=s.device) if row_weight is None else row_weight
    bound = 1.0 / w.abs() if t.requires_grad else 1024.0 / (temperature * w.abs())
    exponent = torch.floor(torch.log2(bound)).clamp(-60.0, 60.0)
    return torch.where(w != 0, torch.exp2(exponent), torch.ones_like(w))


def fused_kd_kl_rows(namespace: str) -> Callable[[Tensor, Tensor, float, Optional[Tensor]], Tensor]:
    """The per-row KL of ``namespace``'s ``kd_kl`` op: ``(student, teacher, temperature, row_weight)``
    -> ``w_i T^2 l_i`` with autograd, the gradients computed in the forward only for the inputs that
    will need them (fp16 ones stored scaled, see :func:`fp16_gradient_scale`)."""

    def kd_kl_rows(student: Tensor, teacher: Tensor, temperature: float, row_weight: Optional[Tensor] = None) -> Tensor:
        grad_on = torch.is_grad_enabled()
        flags = (grad_on and student.requires_grad, grad_on and teacher.requires_grad)
        if flags[0] or flags[1]:
            scale = fp16_gradient_scale(student, teacher, row_weight, temperature)
            if scale is not None:
                row_weight = scale if row_weight is None else row_weight * scale
        else:
            scale = None
        if (flags[0] or flags[1]) and eager_autograd_applies(student, teacher):
            rows = _EagerKdKl.apply(student, teacher, row_weight, float(temperature), *flags, namespace)[0]
        else:
            rows = getattr(torch.ops, namespace).kd_kl(student, teacher, row_weight, float(temperature), *flags)[0]
        return rows if scale is None else rows / scale

    kd_kl_rows.__qualname__ = f"fused_kd_kl_rows({namespace!r})"
    return kd_kl_rows


def fused_correlation_rows(namespace: str) -> Callable[..., Tensor]:
    """The per-row correlation KL of ``namespace``'s ``correlation_fwd`` op: ``(student_rows,
    teacher_rows, student_cols, teacher_cols, tau, exclude_diagonal)`` -> ``l_i`` with autograd to the
    student features; the teacher features are constants."""

    def correlation_rows(student_rows: Tensor, teacher_rows: Tensor, student_cols: Optional[Tensor],
                         teacher_cols: Optional[Tensor], tau: float, exclude_diagonal: bool) -> Tensor:
        op = getattr(torch.ops, namespace).correlation_fwd
        return op(student_rows, teacher_rows.detach(), student_cols,
                  None if teacher_cols is None else teacher_cols.detach(), float(tau), bool(exclude_diagonal))[0]

    correlation_rows.__qualname__ = f"fused_correlation_rows({namespace!r})"
    return correlation_rows


def dense_correlation_rows(student_rows: Tensor, teacher_rows: Tensor, student_cols: Optional[Tensor],
                           teacher_cols: Optional[Tensor], tau: float, exclude_diagonal: bool) -> Tensor:
    """The per-row correlation KL of the compiled library's materialised path (:data:`DENSE_SCHEMAS`),
    with autograd to the student features; the gradient operand is stored only when they need one."""
    grad = torch.is_grad_enabled() and (student_rows.requires_grad or
                                        (student_cols is not None and student_cols.requires_grad))
    op = getattr(torch.ops, DENSE_NAMESPACE).correlation_fwd
    return op(student_rows, teacher_rows.detach(), student_cols,
              None if teacher_cols is None else teacher_cols.detach(), float(tau), bool(exclude_diagonal), grad)[0]

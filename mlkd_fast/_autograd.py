"""Fake implementations and autograd of the fused ops, shared by every op namespace.

The Triton ops (``mlkd_fast_triton::*``, in ``kernels/``) and the compiled ops (``mlkd_fast::*``, in
``csrc/``) have the same schemas and dtypes: inputs fp32/fp16/bf16/fp64 in any student/teacher
combination; loss rows, log-sum-exps and row weights in the math dtype (fp64 when an input is fp64,
else fp32); each gradient in its input's dtype:
  kd_kl(student, teacher, row_weight?, temperature, student_grad, teacher_grad) -> (rows, grad_s, grad_t)
  scale_rows(x, g) -> x * g[:, None]
  scale_rows_(x!, g) -> None: x *= g[:, None] in place, rows with g == 1 untouched
  correlation_fwd(a_s, a_t, b_s?, b_t?, tau, exclude_diagonal) -> (rows, lse_s, lse_t)
  correlation_bwd(g, a_s, a_t, b_s?, b_t?, lse_s, lse_t, tau, exclude_diagonal) -> (d_a_s, d_b_s)
``kd_kl`` returns the per-row loss with the gradients already computed (the loss is final, so the
forward knows them), both times the row weights w_i (the reduction and the loss weight, folded in by
``mlkd_fast.functional``). Its backward only scales them by d loss / d row on the device: in place
when autograd frees the graph after this backward, where rows with d loss / d row = 1 (all of them
after ``total.backward()``) cost nothing; out of place when the graph is kept (``retain_graph``,
``create_graph``) or traced by ``torch.compile``.
"""
from __future__ import annotations

import torch


def _math_dtype(*tensors) -> torch.dtype:
    """The dtype of the ops' loss rows and statistics: fp64 when any input is fp64, else fp32."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def _fake_kd_kl(student, teacher, row_weight, temperature, student_grad, teacher_grad):
    n, c = student.shape
    rows = student.new_empty(n, dtype=_math_dtype(student, teacher))
    grad_s = student.new_empty((n, c)) if student_grad else student.new_empty(0)
    grad_t = teacher.new_empty((n, c)) if teacher_grad else teacher.new_empty(0)
    return rows, grad_s, grad_t


def _fake_scale_rows(x, g):
    return x.new_empty(x.shape)


def _fake_scale_rows_inplace(x, g):
    return None


def _graph_freed_after_this_backward(grad_rows: torch.Tensor) -> bool:
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


def _fake_correlation_fwd(a_s, a_t, b_s, b_t, tau, exclude_diagonal):
    return tuple(a_s.new_empty(a_s.shape[0], dtype=_math_dtype(a_s, a_t, b_s, b_t)) for _ in range(3))


def _fake_correlation_bwd(g, a_s, a_t, b_s, b_t, lse_s, lse_t, tau, exclude_diagonal):
    return a_s.new_empty(a_s.shape), (b_s.new_empty(b_s.shape) if b_s is not None else a_s.new_empty(0))


def register(namespace: str) -> None:
    """Registers the fakes and the autograd of ``namespace``'s ops."""
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
        stored_s, stored_t = ctx.saved_tensors
        wanted = ((stored_s, ctx.student_grad), (stored_t, ctx.teacher_grad))
        if _graph_freed_after_this_backward(grad_rows):
            grads = []
            for stored, flag in wanted:
                if flag:
                    ops.scale_rows_(stored, grad_rows)
                grads.append(stored.detach() if flag else None)
        else:
            grads = [ops.scale_rows(stored, grad_rows) if flag else None for stored, flag in wanted]
        return grads[0], grads[1], None, None, None, None

    def corr_setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        a_s, a_t, b_s, b_t, tau, exclude_diag = inputs
        ctx.tau, ctx.exclude_diag, ctx.square = tau, exclude_diag, b_s is None
        if ctx.square:
            ctx.save_for_backward(a_s, a_t, output[1], output[2])
        else:
            ctx.save_for_backward(a_s, a_t, b_s, b_t, output[1], output[2])

    def corr_backward(ctx, grad_rows, _grad_lse_s, _grad_lse_t):
        if ctx.square:
            a_s, a_t, lse_s, lse_t = ctx.saved_tensors
            b_s = b_t = None
        else:
            a_s, a_t, b_s, b_t, lse_s, lse_t = ctx.saved_tensors
        d_a, d_b = ops.correlation_bwd(grad_rows, a_s, a_t, b_s, b_t, lse_s, lse_t, ctx.tau, ctx.exclude_diag)
        return d_a, None, (None if ctx.square else d_b), None, None, None

    for name, fake in (("kd_kl", _fake_kd_kl), ("scale_rows", _fake_scale_rows),
                       ("scale_rows_", _fake_scale_rows_inplace),
                       ("correlation_fwd", _fake_correlation_fwd), ("correlation_bwd", _fake_correlation_bwd)):
        torch.library.register_fake(f"{namespace}::{name}", fake)
    torch.library.register_autograd(f"{namespace}::kd_kl", kd_kl_backward, setup_context=kd_kl_setup_context)
    torch.library.register_autograd(f"{namespace}::correlation_fwd", corr_backward, setup_context=corr_setup_context)

"""Fake implementations and autograd of the fused ops, shared by every op namespace.

The Triton ops (``mlkd_fast_triton::*``, in ``kernels/``) and the compiled ops (``mlkd_fast::*``, in
``csrc/``) have the same schemas:
  kd_kl(student, teacher, row_mask?, temperature, student_grad, teacher_grad) -> (rows, grad_s, grad_t)
  scale_rows(x, g) -> x * g[:, None]
  correlation_fwd(a_s, a_t, b_s?, b_t?, tau, exclude_diagonal) -> (rows, lse_s, lse_t)
  correlation_bwd(g, a_s, a_t, b_s?, b_t?, lse_s, lse_t, tau, exclude_diagonal) -> (d_a_s, d_b_s)
``kd_kl`` returns the per-row loss with the gradients already computed (the loss is final, so the
forward knows them); its backward only scales them by d loss / d row on the device.
"""
from __future__ import annotations

import torch


def _fake_kd_kl(student, teacher, row_mask, temperature, student_grad, teacher_grad):
    n, c = student.shape
    rows = student.new_empty(n, dtype=torch.float32)
    grad_s = student.new_empty((n, c)) if student_grad else student.new_empty(0)
    grad_t = teacher.new_empty((n, c)) if teacher_grad else teacher.new_empty(0)
    return rows, grad_s, grad_t


def _fake_scale_rows(x, g):
    return x.new_empty(x.shape)


def _fake_correlation_fwd(a_s, a_t, b_s, b_t, tau, exclude_diagonal):
    return tuple(a_s.new_empty(a_s.shape[0], dtype=torch.float32) for _ in range(3))


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
        stored_s, stored_t = ctx.saved_tensors
        d_student = ops.scale_rows(stored_s, grad_rows) if ctx.student_grad else None
        d_teacher = ops.scale_rows(stored_t, grad_rows) if ctx.teacher_grad else None
        return d_student, d_teacher, None, None, None, None

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
                       ("correlation_fwd", _fake_correlation_fwd), ("correlation_bwd", _fake_correlation_bwd)):
        torch.library.register_fake(f"{namespace}::{name}", fake)
    torch.library.register_autograd(f"{namespace}::kd_kl", kd_kl_backward, setup_context=kd_kl_setup_context)
    torch.library.register_autograd(f"{namespace}::correlation_fwd", corr_backward, setup_context=corr_setup_context)

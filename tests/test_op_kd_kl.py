"""The temperature KL op, ``mlkd_fast.functional.kd_kl_div`` (docs/design.md §1.1), on every backend.

The same assertions run on every (backend, device) pair, the reference ("torch") included (the
``op_backend`` fixture); what only the kernel backends have (their custom ops, the gradient stored in
the forward) on ``kernel_backend``. On CPU the Triton kernels run under TRITON_INTERPRET=1; the CUDA
cases skip with the reason without a GPU. Sections: values and gradients against the fp64 reference;
dtypes; the reference itself; the custom op; bad input; properties on random cases.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import (BACKENDS, BF16, DTYPE_PAIRS, F16, F32, F64, KERNEL_BACKENDS, LAYOUTS, dtype_id,
                     dtype_tolerances, fused_ops, hypothesis_profile, math_dtype, rel_err, require_backend)
from helpers import apply_layout as _apply_layout
from helpers import assert_close_to_reference as _close
from helpers import tolerance_floor as _floor
from mlkd_fast import functional as MF, reference


# ---------------------------------------------------------------------------------------------
# values and gradients against the fp64 reference
# ---------------------------------------------------------------------------------------------
# tolerances per input dtype: (loss rtol, gradient atol relative to the largest |grad|)
TOL = {torch.float32: (2e-5, 2e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-3, 1.6e-2)}


def _run(backend, device, s, t, T=2.0, reduction="batchmean", mask=None, teacher_grad=False, grad_out=None):
    s = s.to(device).detach().requires_grad_()
    t = t.to(device).detach().requires_grad_(teacher_grad)
    m = None if mask is None else mask.to(device)
    loss = MF.kd_kl_div(s, t, T, reduction, m, backend=backend)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(device)
    grads = torch.autograd.grad(loss, (s, t) if teacher_grad else (s,), go)
    return loss, grads


def _check(backend, device, s, t, **kw):
    """Kernel vs the fp64 reference, allowed twice the error of PyTorch itself in the same dtype
    (the reference on the same inputs: fp32 math, gradients stored in the input dtype)."""
    dtype = s.dtype
    loss, grads = _run(backend, device, s, t, **kw)
    ref_loss, ref_grads = _run("torch", "cpu", s.double(), t.double(), **kw)
    torch_loss, torch_grads = _run("torch", "cpu", s, t, **kw)
    rtol, gtol = TOL[dtype]
    loss_tol = max(rtol, 2 * rel_err(torch_loss, ref_loss))
    assert rel_err(loss, ref_loss) <= loss_tol, f"loss error {rel_err(loss, ref_loss):.2e} > {loss_tol:.1e}"
    for g, r, tg in zip(grads, ref_grads, torch_grads):
        assert g.dtype == dtype and g.shape == r.shape
        tol = max(gtol, 2 * rel_err(tg, r))
        err = rel_err(g, r)
        assert err <= tol, f"gradient error {err:.2e} > {tol:.1e}"
    return loss, grads


@pytest.mark.parametrize("shape", [(37, 1271), (1, 5), (64, 16), (3, 70001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(op_backend, shape, dtype):
    backend, device = op_backend
    if shape == (3, 70001) and dtype != torch.float32:
        pytest.skip("the long row is covered once in fp32 (the interpreter is slow)")
    s = (torch.randn(shape) * 4).to(dtype)
    t = (torch.randn(shape) * 4).to(dtype)
    _check(backend, device, s, t)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_with_grad_output(op_backend, reduction):
    backend, device = op_backend
    s, t = torch.randn(9, 130), torch.randn(9, 130)
    go = torch.rand(9) + 0.5 if reduction == "none" else torch.tensor(2.5)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    _check(backend, device, s, t, reduction=reduction, grad_out=go, T=3.0)
    _check(backend, device, s, t, reduction=reduction, grad_out=go, T=3.0, mask=mask)


def test_row_mask_zeroes_rows_and_their_gradient(op_backend):
    backend, device = op_backend
    s, t = torch.randn(6, 40), torch.randn(6, 40)
    mask = torch.tensor([True, False, True, False, True, True])
    loss, (g,) = _check(backend, device, s, t, mask=mask, reduction="none")
    assert (loss.cpu()[~mask] == 0).all() and (g.cpu()[~mask] == 0).all()
    all_masked = torch.zeros(6, dtype=torch.bool)
    assert MF.kd_kl_div(s.to(device), t.to(device), row_mask=all_masked.to(device), backend=backend).item() == 0.0


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_masked_rows_are_zero_whatever_they_hold(op_backend, reduction):
    """A masked row gives exactly 0 loss and 0 gradients even if it is NaN or all -inf (as
    reference.kd_kl_rows promises); the other rows are as if the masked ones held ordinary logits."""
    backend, device = op_backend
    s, t = torch.randn(4, 70), torch.randn(4, 70)
    mask = torch.tensor([True, False, True, False])
    bad_s, bad_t = s.clone(), t.clone()
    bad_s[1], bad_t[1] = float("nan"), float("inf")
    bad_t[3] = float("-inf")
    loss, grads = _run(backend, device, bad_s, bad_t, mask=mask, teacher_grad=True, reduction=reduction)
    clean_loss, clean_grads = _run("torch", "cpu", s.double(), t.double(), mask=mask, teacher_grad=True,
                                   reduction=reduction)
    torch.testing.assert_close(loss.cpu().double(), clean_loss, rtol=2e-5, atol=1e-7)
    for g, ref in zip(grads, clean_grads):
        assert (g.cpu()[~mask] == 0).all()
        torch.testing.assert_close(g.cpu().double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_teacher_gradient(op_backend, dtype):
    backend, device = op_backend
    s, t = torch.randn(11, 300).to(dtype), torch.randn(11, 300).to(dtype)
    mask = torch.rand(11) > 0.3
    _check(backend, device, s, t, teacher_grad=True, mask=mask, reduction="batchmean", grad_out=torch.tensor(0.7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 131072), (2, 70001)])
def test_few_long_rows(op_backend, dtype, shape):
    """On CUDA these rows are split over several blocks / programs (vector loads at the even width);
    on CPU the C++ kernel runs them whole."""
    backend, device = op_backend
    if backend == "triton" and device.type == "cpu":
        pytest.skip("minutes under the interpreter; test_split_row_path_matches_reference covers Triton's split path")
    s, t = (torch.randn(shape) * 3).to(dtype), (torch.randn(shape) * 3).to(dtype)
    t[0, 1000:90000:7] = float("-inf")
    mask = torch.tensor([True, False] + [True] * (shape[0] - 2))
    _check(backend, device, s, t, teacher_grad=True, mask=mask, grad_out=torch.tensor(1.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_long_rows(op_backend, dtype):
    """More rows than SMs, rows longer than one program holds: on CUDA Triton's looped path (a
    program walks several rows, two sweeps each); on CPU the C++ kernel."""
    backend, device = op_backend
    if backend == "triton" and device.type == "cpu":
        pytest.skip("minutes under the interpreter; test_row_paths_match_reference covers the looped path")
    s, t = (torch.randn(300, 9000) * 3).to(dtype), (torch.randn(300, 9000) * 3).to(dtype)
    t[5, 4000:8500] = float("-inf")
    mask = torch.rand(300) > 0.2
    _check(backend, device, s, t, teacher_grad=True, mask=mask, grad_out=torch.tensor(0.5))


def test_minus_inf_teacher_logits_stay_finite(op_backend):
    backend, device = op_backend
    s, t = torch.randn(5, 200), torch.randn(5, 200)
    t[:, 10:60] = float("-inf")
    t[2, :150] = float("-inf")
    loss, grads = _check(backend, device, s, t, teacher_grad=True, reduction="none")
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    assert (grads[1].cpu()[:, 10:60] == 0).all()


@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e4), (torch.float16, 6e4)])
def test_extreme_logits_do_not_overflow(op_backend, dtype, magnitude):
    backend, device = op_backend
    s = (torch.rand(4, 257) * 2 - 1) * magnitude
    t = (torch.rand(4, 257) * 2 - 1) * magnitude
    loss, grads = _check(backend, device, s.to(dtype), t.to(dtype), T=1.0)
    assert torch.isfinite(loss) and torch.isfinite(grads[0]).all()


def test_nan_propagates(op_backend):
    backend, device = op_backend
    s, t = torch.randn(3, 50), torch.randn(3, 50)
    s[0, 4] = float("nan")
    t[1, 7] = float("nan")
    rows = MF.kd_kl_div(s.to(device), t.to(device), reduction="none", backend=backend).cpu()
    assert torch.isnan(rows[0]) and torch.isnan(rows[1]) and torch.isfinite(rows[2])


def test_non_contiguous_and_3d_inputs(op_backend):
    backend, device = op_backend
    wide_s, wide_t = torch.randn(8, 300), torch.randn(8, 300)
    # row-strided view (last stride 1, no copy) and a column-strided one (copied)
    _check(backend, device, wide_s[:, :257], wide_t[:, 10:267])
    _check(backend, device, wide_s[:, ::2], wide_t[:, 1::2])
    _check(backend, device, wide_s.t()[:37], wide_t.t()[5:42])
    s3, t3 = torch.randn(2, 5, 33), torch.randn(2, 5, 33)
    loss, _ = _check(backend, device, s3, t3, reduction="none")
    assert loss.shape == (2, 5)


def test_forward_only_under_no_grad(op_backend):
    backend, device = op_backend
    s, t = torch.randn(7, 90), torch.randn(7, 90)
    with torch.no_grad():
        loss = MF.kd_kl_div(s.to(device), t.to(device), backend=backend)
    torch.testing.assert_close(loss.cpu().double(), MF.kd_kl_div(s.double(), t.double(), backend="torch"), rtol=2e-5, atol=0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_weight_is_folded_into_loss_and_gradient(op_backend, reduction):
    backend, device = op_backend
    s, t = torch.randn(9, 130, device=device), torch.randn(9, 130, device=device)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.bool, device=device)
    for m in (None, mask):
        results = []
        for weight in (1.0, 0.3):
            x = s.clone().requires_grad_()
            loss = MF.kd_kl_div(x, t, 3.0, reduction, m, backend=backend, weight=weight)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            results.append((loss, grad))
        (plain, g_plain), (weighted, g_weighted) = results
        torch.testing.assert_close(weighted, 0.3 * plain, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(g_weighted, 0.3 * g_plain, rtol=1e-5, atol=1e-7)  # q - p cancels


# ---------------------------------------------------------------------------------------------
# dtypes: fp32, fp16, bf16 and fp64, student and teacher in any combination; the math in fp32 or
# better, fp64 staying fp64, each gradient in its input's own dtype
# ---------------------------------------------------------------------------------------------
# Error of the loss against the fp64 reference (relative to its largest |value|), by the math dtype
# and, with fp32 math, by the least precise input (fp16/bf16 dots and gradient operands).
DTYPE_LOSS_TOL = {F64: 1e-12, F32: 2e-5, F16: 2e-3, BF16: 2e-3}
# Gradient error (relative to the largest |grad|) allowed by the dtype the gradient is stored in.
DTYPE_GRAD_TOL = {F64: 1e-11, F32: 2e-6, F16: 2e-3, BF16: 1.6e-2}


@pytest.mark.parametrize("s_dtype, t_dtype", DTYPE_PAIRS, ids=dtype_id)
def test_kd_kl_div_dtypes(op_backend, s_dtype, t_dtype):
    backend, device = op_backend
    base_s, base_t = torch.randn(7, 45) * 3, torch.randn(7, 45) * 3
    s = base_s.to(s_dtype).to(device).requires_grad_()
    t = base_t.to(t_dtype).to(device).requires_grad_()  # online distillation: the teacher gets a gradient too
    loss = MF.kd_kl_div(s, t, temperature=3.3, backend=backend)  # 3.3: not exact in fp32
    g_s, g_t = torch.autograd.grad(loss, (s, t), torch.tensor(1.7, dtype=loss.dtype, device=device))
    assert loss.dtype == math_dtype(s_dtype, t_dtype)
    assert g_s.dtype == s_dtype and g_t.dtype == t_dtype

    s64, t64 = s.detach().cpu().double().requires_grad_(), t.detach().cpu().double().requires_grad_()
    ref = MF.kd_kl_div(s64, t64, temperature=3.3, backend="torch")
    r_s, r_t = torch.autograd.grad(ref, (s64, t64), torch.tensor(1.7, dtype=F64))
    loss_tol, _ = dtype_tolerances(DTYPE_LOSS_TOL, DTYPE_GRAD_TOL, (s_dtype, t_dtype), F64)
    assert rel_err(loss, ref) <= loss_tol, f"loss error {rel_err(loss, ref):.2e} > {loss_tol:.0e}"
    for g, r, dtype in ((g_s, r_s, s_dtype), (g_t, r_t, t_dtype)):
        tol = dtype_tolerances(DTYPE_LOSS_TOL, DTYPE_GRAD_TOL, (s_dtype, t_dtype), dtype)[1]
        assert rel_err(g, r) <= tol, f"{dtype} gradient error {rel_err(g, r):.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------
# the reference itself (mlkd_fast.reference.kd_kl_rows) against independent computations
# ---------------------------------------------------------------------------------------------
def test_kd_rows_match_torch_kl_div_times_t_squared():
    s, t, T = torch.randn(13, 29, dtype=torch.float64), torch.randn(13, 29, dtype=torch.float64), 3.0
    expected = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1) * T * T
    torch.testing.assert_close(reference.kd_kl_rows(s, t, T), expected)


def test_kd_rows_low_precision_inputs_use_fp32_math():
    s, t = torch.randn(8, 50), torch.randn(8, 50)
    rows = reference.kd_kl_rows(s.bfloat16(), t.bfloat16(), 2.0)
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, reference.kd_kl_rows(s.bfloat16().double(), t.bfloat16().double(), 2.0).float())


def test_kd_rows_minus_inf_teacher_gives_finite_values_and_grads():
    s = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 10, dtype=torch.float64)
    t[:, :3] = float("-inf")
    t.requires_grad_()
    rows = reference.kd_kl_rows(s, t, 2.0)
    gs, gt = torch.autograd.grad(rows.sum(), (s, t))
    assert torch.isfinite(rows).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gt[:, :3] == 0).all()


def test_kd_rows_direct_sum_with_masked_classes():
    s = torch.randn(3, 6, dtype=torch.float64)
    t = torch.randn(3, 6, dtype=torch.float64)
    t[0, 0] = float("-inf")
    T = 1.5
    p, log_q = torch.softmax(t / T, -1), torch.log_softmax(s / T, -1)
    expected = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        for c in range(6):
            if p[i, c] > 0:
                expected[i] += p[i, c] * (math.log(p[i, c]) - log_q[i, c])
    torch.testing.assert_close(reference.kd_kl_rows(s, t, T), expected * T * T)


def test_kd_rows_nan_propagates():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    t[1, 2] = float("nan")
    rows = reference.kd_kl_rows(s, t, 2.0)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1])


def test_kd_rows_gradcheck_student_and_teacher():
    s = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False])
    assert torch.autograd.gradcheck(lambda a, b: reference.kd_kl_rows(a, b, 2.5, mask.double()), (s, t))


# ---------------------------------------------------------------------------------------------
# the kernel backends' custom op: opcheck, the stored gradient and its scaling in the backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(kernel_backend, requires_grad):
    """torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) of kd_kl and of the
    row scaling its backward calls, as each kernel backend registers them."""
    backend, device = kernel_backend
    ops = fused_ops(backend)
    s = torch.randn(6, 70, device=device, requires_grad=requires_grad)
    t = torch.randn(6, 70, device=device, requires_grad=requires_grad)
    weight = torch.tensor([0.5, 0.0, 1.0, 2.0, 1.0, 0.0], device=device)
    cases = [(s, t, None, 2.0, requires_grad, False), (s, t, weight, 3.0, requires_grad, requires_grad)]
    if not requires_grad:
        cases.append((s, t, None, 1.0, False, False))
    for args in cases:
        torch.library.opcheck(ops.kd_kl.default, args)
    torch.library.opcheck(ops.scale_rows.default, (torch.randn(6, 70, device=device), torch.rand(6, device=device)))
    torch.library.opcheck(ops.scale_rows_.default, (torch.randn(6, 70, device=device), weight))


def _scale_ops(fn):
    """Runs fn under the profiler; returns which KL backward scaling ops ran."""
    with torch.profiler.profile() as prof:
        fn()
    names = {e.key.split("::")[-1] for e in prof.key_averages() if "scale_rows" in e.key}
    return names


def test_backward_scales_in_place_only_when_the_graph_is_freed(kernel_backend):
    """With retain_graph the stored gradient is scaled out of place, so every later backward sees it
    unchanged; the last backward scales it in place (rows whose factor is 1 untouched)."""
    backend, device = kernel_backend
    s = torch.randn(7, 300, device=device, requires_grad=True)
    t = torch.randn(7, 300, device=device)
    loss = MF.kd_kl_div(s, t, 2.0, backend=backend, weight=0.7)
    s64 = s.detach().double().cpu().requires_grad_()
    (expected,) = torch.autograd.grad(MF.kd_kl_div(s64, t.double().cpu(), 2.0, backend="torch", weight=0.7), s64)

    assert _scale_ops(lambda: (2.5 * loss).backward(retain_graph=True)) == {"scale_rows"}
    first, s.grad = s.grad.clone(), None
    assert _scale_ops(lambda: (2.5 * loss).backward(retain_graph=True)) == {"scale_rows"}
    assert torch.equal(s.grad, first)
    s.grad = None
    assert _scale_ops(lambda: loss.backward()) == {"scale_rows_"}
    torch.testing.assert_close(first.cpu().double(), 2.5 * expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(s.grad.cpu().double(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_fills_no_zero_gradients(backend):
    """The stored-gradient outputs of kd_kl get no gradient; autograd must not materialise (N, C)
    zeros for them on every backward."""
    require_backend(backend, "cpu")
    from mlkd_fast import functional

    s = torch.randn(8, 300, requires_grad=True)
    t = torch.randn(8, 300)
    loss = functional.kd_kl_div(s, t, backend=backend)
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    fills = [(e.key, e.input_shapes) for e in prof.key_averages(group_by_input_shape=True)
             if e.key in ("aten::zeros", "aten::zero_", "aten::fill_", "aten::zeros_like")]
    assert not [f for f in fills if [8, 300] in f[1] or any(300 in shape for shape in f[1])], fills
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_fp16_gradients_keep_their_bits_under_a_grad_scaler(kernel_backend):
    """fp16 logits, batchmean over 512 rows, the loss times 65536 as torch.amp.GradScaler does: the
    gradients must match the fp64 ones to fp16 precision entry by entry. Storing w_i T (q - p) with
    w_i = 1/512 made most entries fp16 subnormals that the backward's 65536 could not restore.
    (The fused backends' stored gradient, ops.fp16_gradient_scale; the reference's fp32 autograd misses
    this entry-by-entry bar in about one entry in 500000, by cancellation in q - p.)"""
    backend, device = kernel_backend
    s = (torch.randn(512, 1000) * 3).half()
    t = (torch.randn(512, 1000) * 3).half()
    scale = torch.tensor(65536.0)
    for teacher_grad, allowed in ((False, 0.0), (True, 0.01)):
        _, grads = _run(backend, device, s, t, T=4.0, teacher_grad=teacher_grad, grad_out=scale)
        _, refs = _run("torch", "cpu", s.double(), t.double(), T=4.0, teacher_grad=teacher_grad, grad_out=scale)
        for g, r in zip(grads, refs):
            off = (g.cpu().double() - r).abs() > 2**-9 * r.abs() + 1.2e-7  # 4x fp16 rounding, or subnormal
            assert off.double().mean() <= allowed, f"{off.double().mean():.2%} of the entries off (teacher_grad={teacher_grad})"


# ---------------------------------------------------------------------------------------------
# bad input (docs/design.md §4): a clear error naming the argument
# ---------------------------------------------------------------------------------------------
S, T_ = torch.randn(4, 10), torch.randn(4, 10)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(student_logits=torch.randn(10), teacher_logits=torch.randn(10)), ValueError, "ndim"),
    (dict(student_logits=S, teacher_logits=torch.randn(4, 10, 1)), ValueError, "teacher_logits"),
    (dict(student_logits=S, teacher_logits=torch.randn(5, 10)), ValueError, "rows N"),
    (dict(student_logits=S, teacher_logits=torch.randn(4, 11)), ValueError, "classes C"),
    (dict(student_logits=S.long(), teacher_logits=T_), TypeError, "student_logits"),
    (dict(student_logits=S, teacher_logits=T_.int()), TypeError, "teacher_logits"),
    (dict(student_logits=S.tolist(), teacher_logits=T_), TypeError, "student_logits"),
    (dict(student_logits=S, teacher_logits=T_, temperature=0.0), ValueError, "temperature"),
    (dict(student_logits=S, teacher_logits=T_, temperature=-1.0), ValueError, "temperature"),
    (dict(student_logits=S, teacher_logits=T_, temperature=float("nan")), ValueError, "temperature"),
    (dict(student_logits=S, teacher_logits=T_, temperature=float("inf")), ValueError, "temperature"),
    (dict(student_logits=S, teacher_logits=T_, temperature="4"), TypeError, "temperature"),
    (dict(student_logits=S, teacher_logits=T_, reduction="avg"), ValueError, "reduction"),
    (dict(student_logits=S, teacher_logits=T_, backend="cuda"), ValueError, "backend"),
    (dict(student_logits=torch.randn(0, 10), teacher_logits=torch.randn(0, 10)), ValueError, "empty batch"),
    (dict(student_logits=torch.randn(4, 0), teacher_logits=torch.randn(4, 0)), ValueError, "empty batch"),
    (dict(student_logits=S, teacher_logits=T_, row_mask=torch.ones(4)), TypeError, "row_mask"),
    (dict(student_logits=S, teacher_logits=T_, row_mask=torch.ones(5, dtype=torch.bool)), ValueError, "row_mask"),
    (dict(student_logits=S, teacher_logits=T_.to("meta")), ValueError, "device"),
])
def test_kd_kl_div_bad_input(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        MF.kd_kl_div(**kwargs)


def test_nan_input_propagates_to_the_loss():
    s = S.clone()
    s[2, 3] = float("nan")
    assert torch.isnan(MF.kd_kl_div(s, T_, backend="torch"))


# ---------------------------------------------------------------------------------------------
# properties on random cases (hypothesis): every backend against the fp64 reference on random shapes
# (1 row, 1 column, odd sizes, more than one kernel block), dtypes (mixed student/teacher too),
# temperatures, row masks, -inf teacher entries, huge magnitudes, non-contiguous and expanded
# (stride 0) inputs, (..., C) inputs, and a teacher that requires grad. Profiles: helpers.hypothesis_profile.
# ---------------------------------------------------------------------------------------------
PROFILE = hypothesis_profile()
DTYPES = (F32, F16, BF16, F64)
# Floors of the allowed error relative to the largest |reference value|, by the least precise input
# (fp64 anywhere: fp64 math, only the gradient's own storage rounds); the bound used is the larger of
# the floor and 10x the error of the torch backend on the same inputs (PyTorch's own error there).
KD_TOL = {F64: 1e-9, F32: 2e-5, F16: 2e-3, BF16: 2e-3}
KD_GRAD_TOL = {F64: 1e-9, F32: 2e-6, F16: 2e-3, BF16: 1.6e-2}


def _dtype_pair(draw, backend):
    return draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES))


@st.composite
def kd_cases(draw, backend):
    n = draw(st.sampled_from([1, 2, 3, 5, 8]) if backend == "triton" else st.integers(1, 12))
    wide = [127, 1025, 4097] if backend == "triton" else [127, 1025, 4097, 8193]  # > one chunk / block / SIMD sweep
    c = draw(st.one_of(st.integers(1, 70), st.sampled_from(wide)))
    s_dtype, t_dtype = _dtype_pair(draw, backend)
    magnitude = draw(st.sampled_from([1.0, 8.0, "huge"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def logits(dtype):
        if magnitude == "huge":  # 1e4 in fp32 (and fp64, bf16), 6e4 in fp16 must not overflow
            big = 6e4 if dtype == F16 else 1e4
            return ((torch.rand(n, c, generator=g, dtype=F64) * 2 - 1) * big).to(dtype)
        return (torch.randn(n, c, generator=g, dtype=F64) * magnitude).to(dtype)

    s, t = logits(s_dtype), logits(t_dtype)
    if c > 1 and draw(st.booleans()):  # -inf teacher entries (masked classes), never a whole row
        masked = torch.rand(n, c, generator=g) < 0.3
        masked[torch.arange(n), t.float().argmax(dim=1)] = False
        t = t.masked_fill(masked, float("-inf"))
    return dict(
        s=s, t=t, temperature=draw(st.floats(0.3, 8.0)), reduction=draw(st.sampled_from(MF.REDUCTIONS)),
        row_mask=(torch.rand(n, generator=g) < 0.7) if draw(st.booleans()) else None,
        teacher_grad=draw(st.booleans()), s_layout=draw(st.sampled_from(LAYOUTS)),
        t_layout=draw(st.sampled_from(LAYOUTS)), lead=draw(st.sampled_from([None, 2])) if n % 2 == 0 else None,
        grad_seed=seed,
    )


def _kd_run(backend, case, s, t, reduction, row_mask, temperature, teacher_grad, lead):
    """Loss and gradients of kd_kl_div on (s, t) laid out as the case says; gradients are w.r.t. the leaves."""
    s_leaf = s.clone().requires_grad_()
    t_leaf = t.clone().requires_grad_(teacher_grad)
    s_in, t_in = _apply_layout(case["s_layout"], s_leaf), _apply_layout(case["t_layout"], t_leaf)
    mask = row_mask
    if lead:  # (..., C) input: rows as (lead, N / lead)
        s_in, t_in = s_in.reshape(lead, -1, s.shape[1]), t_in.reshape(lead, -1, s.shape[1])
        mask = None if mask is None else mask.reshape(lead, -1)
    loss = MF.kd_kl_div(s_in, t_in, temperature, reduction, mask, backend=backend)
    go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(case["grad_seed"]), dtype=F64) + 0.5
    leaves = (s_leaf, t_leaf) if teacher_grad else (s_leaf,)
    grads = torch.autograd.grad(loss, leaves, go.to(loss.dtype))
    return loss, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_property_random_cases_match_reference(backend):
    require_backend(backend, "cpu")

    @PROFILE
    @given(case=kd_cases(backend))
    def check(case):
        s, t = case["s"], case["t"]
        kw = dict(reduction=case["reduction"], row_mask=case["row_mask"], temperature=case["temperature"],
                  teacher_grad=case["teacher_grad"], lead=case["lead"])
        loss, grads = _kd_run(backend, case, s, t, **kw)
        ref_loss, ref_grads = _kd_run("torch", case, s.double(), t.double(), **kw)
        base_loss, base_grads = _kd_run("torch", case, s, t, **kw)
        dtypes = (s.dtype, t.dtype)
        assert loss.dtype == (F64 if F64 in dtypes else F32)
        # The math rounds at the scale of the logits / T (differences of 1e4-sized logits): an absolute
        # error of a few ulps of the math dtype there is all one can ask for where the values cancel.
        eps = torch.finfo(F64 if F64 in dtypes else F32).eps
        big = max(x.double().nan_to_num(0, 0, 0).abs().max().item() for x in (s, t)) / case["temperature"]
        atol = 64 * eps * big * 1.5  # 1.5: the largest grad_out
        _close(loss, ref_loss, base_loss, _floor(KD_TOL, dtypes), "loss", natural=1.0,
               atol=atol * case["temperature"] ** 2 * (s.shape[0] if case["reduction"] in ("sum", "none") else 1))
        for g, r, b, x in zip(grads, ref_grads, base_grads, (s, t)):
            assert g.dtype == x.dtype and g.shape == x.shape
            grad_atol = atol * case["temperature"] + torch.finfo(x.dtype).eps * 1.5 * case["temperature"]
            _close(g, r, b, _floor(KD_GRAD_TOL, dtypes, x.dtype), f"{x.dtype} gradient", atol=grad_atol)

    check()


# ---------------------------------------------------------------------------------------------
# counterexamples found by the properties above, kept as plain regression tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_width_one_logits_with_a_column_stride(backend):
    """(N, 1) logits sliced with a column stride: PyTorch calls them contiguous (a width-1 dimension
    ignores its stride), so .contiguous() kept the stride and the compiled op refused them."""
    require_backend(backend, "cpu")
    s = torch.randn(4, 2)[:, ::2].requires_grad_()
    t = torch.randn(4, 2)[:, ::2]
    loss = MF.kd_kl_div(s, t, backend=backend)
    (g,) = torch.autograd.grad(loss, s)
    assert loss == 0 and (g == 0).all()  # one class: one-point distributions

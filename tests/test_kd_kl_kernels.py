"""The fused KL kernels (Triton, native) against the fp64 reference (docs/design.md §1.1).

On CPU the Triton kernels run under TRITON_INTERPRET=1; the same tests run on CUDA when present.
"""
import pytest
import torch

from conftest import rel_err
from mlkd_fast import functional as MF

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
def test_matches_reference(kernel_backend, shape, dtype):
    backend, device = kernel_backend
    if shape == (3, 70001) and dtype != torch.float32:
        pytest.skip("the long row is covered once in fp32 (the interpreter is slow)")
    s = (torch.randn(shape) * 4).to(dtype)
    t = (torch.randn(shape) * 4).to(dtype)
    _check(backend, device, s, t)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_with_grad_output(kernel_backend, reduction):
    backend, device = kernel_backend
    s, t = torch.randn(9, 130), torch.randn(9, 130)
    go = torch.rand(9) + 0.5 if reduction == "none" else torch.tensor(2.5)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    _check(backend, device, s, t, reduction=reduction, grad_out=go, T=3.0)
    _check(backend, device, s, t, reduction=reduction, grad_out=go, T=3.0, mask=mask)


def test_row_mask_zeroes_rows_and_their_gradient(kernel_backend):
    backend, device = kernel_backend
    s, t = torch.randn(6, 40), torch.randn(6, 40)
    mask = torch.tensor([True, False, True, False, True, True])
    loss, (g,) = _check(backend, device, s, t, mask=mask, reduction="none")
    assert (loss.cpu()[~mask] == 0).all() and (g.cpu()[~mask] == 0).all()
    all_masked = torch.zeros(6, dtype=torch.bool)
    assert MF.kd_kl_div(s.to(device), t.to(device), row_mask=all_masked.to(device), backend=backend).item() == 0.0


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_masked_rows_are_zero_whatever_they_hold(kernel_backend, reduction):
    """A masked row gives exactly 0 loss and 0 gradients even if it is NaN or all -inf, as the reference;
    the other rows are as if the masked ones held ordinary logits."""
    backend, device = kernel_backend
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
def test_teacher_gradient(kernel_backend, dtype):
    backend, device = kernel_backend
    s, t = torch.randn(11, 300).to(dtype), torch.randn(11, 300).to(dtype)
    mask = torch.rand(11) > 0.3
    _check(backend, device, s, t, teacher_grad=True, mask=mask, reduction="batchmean", grad_out=torch.tensor(0.7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 131072), (2, 70001)])
def test_few_long_rows(kernel_backend, dtype, shape):
    """On CUDA these rows are split over several blocks / programs (vector loads at the even width);
    on CPU the C++ kernel runs them whole."""
    backend, device = kernel_backend
    if backend == "triton" and device.type == "cpu":
        pytest.skip("minutes under the interpreter; test_split_row_path_matches_reference covers Triton's split path")
    s, t = (torch.randn(shape) * 3).to(dtype), (torch.randn(shape) * 3).to(dtype)
    t[0, 1000:90000:7] = float("-inf")
    mask = torch.tensor([True, False] + [True] * (shape[0] - 2))
    _check(backend, device, s, t, teacher_grad=True, mask=mask, grad_out=torch.tensor(1.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_long_rows(kernel_backend, dtype):
    """More rows than SMs, rows longer than one program holds: on CUDA Triton's looped path (a
    program walks several rows, two sweeps each); on CPU the C++ kernel."""
    backend, device = kernel_backend
    if backend == "triton" and device.type == "cpu":
        pytest.skip("minutes under the interpreter; test_row_paths_match_reference covers the looped path")
    s, t = (torch.randn(300, 9000) * 3).to(dtype), (torch.randn(300, 9000) * 3).to(dtype)
    t[5, 4000:8500] = float("-inf")
    mask = torch.rand(300) > 0.2
    _check(backend, device, s, t, teacher_grad=True, mask=mask, grad_out=torch.tensor(0.5))


def test_minus_inf_teacher_logits_stay_finite(kernel_backend):
    backend, device = kernel_backend
    s, t = torch.randn(5, 200), torch.randn(5, 200)
    t[:, 10:60] = float("-inf")
    t[2, :150] = float("-inf")
    loss, grads = _check(backend, device, s, t, teacher_grad=True, reduction="none")
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    assert (grads[1].cpu()[:, 10:60] == 0).all()


@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e4), (torch.float16, 6e4)])
def test_extreme_logits_do_not_overflow(kernel_backend, dtype, magnitude):
    backend, device = kernel_backend
    s = (torch.rand(4, 257) * 2 - 1) * magnitude
    t = (torch.rand(4, 257) * 2 - 1) * magnitude
    loss, grads = _check(backend, device, s.to(dtype), t.to(dtype), T=1.0)
    assert torch.isfinite(loss) and torch.isfinite(grads[0]).all()


def test_nan_propagates(kernel_backend):
    backend, device = kernel_backend
    s, t = torch.randn(3, 50), torch.randn(3, 50)
    s[0, 4] = float("nan")
    t[1, 7] = float("nan")
    rows = MF.kd_kl_div(s.to(device), t.to(device), reduction="none", backend=backend).cpu()
    assert torch.isnan(rows[0]) and torch.isnan(rows[1]) and torch.isfinite(rows[2])


def test_non_contiguous_and_3d_inputs(kernel_backend):
    backend, device = kernel_backend
    wide_s, wide_t = torch.randn(8, 300), torch.randn(8, 300)
    # row-strided view (last stride 1, no copy) and a column-strided one (copied)
    _check(backend, device, wide_s[:, :257], wide_t[:, 10:267])
    _check(backend, device, wide_s[:, ::2], wide_t[:, 1::2])
    _check(backend, device, wide_s.t()[:37], wide_t.t()[5:42])
    s3, t3 = torch.randn(2, 5, 33), torch.randn(2, 5, 33)
    loss, _ = _check(backend, device, s3, t3, reduction="none")
    assert loss.shape == (2, 5)


def test_forward_only_under_no_grad(kernel_backend):
    backend, device = kernel_backend
    s, t = torch.randn(7, 90), torch.randn(7, 90)
    with torch.no_grad():
        loss = MF.kd_kl_div(s.to(device), t.to(device), backend=backend)
    torch.testing.assert_close(loss.cpu().double(), MF.kd_kl_div(s.double(), t.double(), backend="torch"), rtol=2e-5, atol=0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_weight_is_folded_into_loss_and_gradient(kernel_backend, reduction):
    backend, device = kernel_backend
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


def test_fp16_gradients_keep_their_bits_under_a_grad_scaler(kernel_backend):
    """fp16 logits, batchmean over 512 rows, the loss times 65536 as torch.amp.GradScaler does: the
    gradients must match the fp64 ones to fp16 precision entry by entry. Storing w_i T (q - p) with
    w_i = 1/512 made most entries fp16 subnormals that the backward's 65536 could not restore."""
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

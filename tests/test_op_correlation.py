"""The correlation KL op, ``mlkd_fast.functional.correlation_kl`` (docs/design.md §1.2), on every backend.

The same assertions run on every (backend, device) pair, the reference ("torch") included (the
``op_backend`` fixture); what only the kernel backends have (their custom ops) on ``kernel_backend``.
On CPU the Triton kernels run under TRITON_INTERPRET=1; the CUDA cases skip with the reason without a
GPU. Sections: values and gradients against the fp64 reference; dtypes; the reference itself; the
custom ops; bad and degenerate input; properties on random cases.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import (BACKENDS, BF16, DTYPE_PAIRS, F16, F32, F64, LAYOUTS, dtype_id, dtype_tolerances, fused_ops,
                     hypothesis_profile, math_dtype, rel_err, require_backend, skip_interpreted_bf16_dots)
from helpers import apply_layout as _apply_layout
from helpers import assert_close_to_reference as _close
from helpers import tolerance_floor as _floor
from mlkd_fast import functional as MF, reference


# ---------------------------------------------------------------------------------------------
# values and gradients against the fp64 reference
# ---------------------------------------------------------------------------------------------
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _run(backend, device, a_s, a_t, b_s=None, b_t=None, grad_out=None, **kw):
    a_s = a_s.to(device).detach().requires_grad_()
    b_s = None if b_s is None else b_s.to(device).detach().requires_grad_()
    a_t = a_t.to(device)
    b_t = None if b_t is None else b_t.to(device)
    loss = MF.correlation_kl(a_s, a_t, b_s, b_t, backend=backend, **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(device)
    grads = torch.autograd.grad(loss, [x for x in (a_s, b_s) if x is not None], go)
    return loss, grads


def _check(backend, device, a_s, a_t, b_s=None, b_t=None, **kw):
    dtype = a_s.dtype
    if device.type == "cpu" and dtype == torch.bfloat16 and backend == "triton":
        pytest.skip("tl.dot on bf16 operands is wrong under the Triton interpreter (ENV.md); bf16 is tested on GPU")
    loss, grads = _run(backend, device, a_s, a_t, b_s, b_t, **kw)
    dbl = lambda x: None if x is None else x.double()  # noqa: E731
    ref_loss, ref_grads = _run("torch", "cpu", dbl(a_s), dbl(a_t), dbl(b_s), dbl(b_t), **kw)
    tol = TOL[dtype]
    assert rel_err(loss, ref_loss) <= tol, f"loss error {rel_err(loss, ref_loss):.2e}"
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert rel_err(g, r) <= tol * 4, f"gradient error {rel_err(g, r):.2e}"
    return loss, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["square", "keep_diagonal", "rectangular", "shard"])
def test_matches_reference(op_backend, dtype, mode):
    backend, device = op_backend
    if mode == "rectangular":  # rows = 3B augmented views, columns = B plain views, Ds != Dt
        b = 24
        args = [torch.randn(3 * b, 40), torch.randn(3 * b, 72), torch.randn(b, 40), torch.randn(b, 72)]
        kw = {}
    elif mode == "shard":  # one process's 40 rows against a batch of 130 that starts with them
        a_s, a_t = torch.randn(40, 40), torch.randn(40, 24)
        args = [a_s, a_t, torch.cat([a_s, torch.randn(90, 40)]), torch.cat([a_t, torch.randn(90, 24)])]
        kw = {"cols_start_with_rows": True}
    else:
        args = [torch.randn(150, 40), torch.randn(150, 24)]
        kw = {"keep_diagonal": mode == "keep_diagonal"}
    _check(backend, device, *[x.to(dtype) for x in args], **kw)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_tau_and_grad_output(op_backend, reduction):
    backend, device = op_backend
    go = torch.rand(37) + 0.5 if reduction == "none" else torch.tensor(1.7)
    _check(backend, device, torch.randn(37, 20), torch.randn(37, 33), reduction=reduction,
           tau=0.2, scale_by_tau_sq=True, grad_out=go)


def test_non_contiguous_features(op_backend):
    backend, device = op_backend
    base_s, base_t = torch.randn(50, 64), torch.randn(50, 64)
    _check(backend, device, base_s[:, 5:45], base_t[:, ::2])
    _check(backend, device, base_s.t()[:30], base_t.t()[10:40])


def test_zero_feature_row_and_collinear_rows(op_backend):
    backend, device = op_backend
    a_s, a_t = torch.randn(20, 16), torch.randn(20, 16)
    a_s[3] = 0.0  # norm below eps: the normalisation clamps, the gradient is r * d a^
    a_s[5] = 2.0 * a_s[6]
    _check(backend, device, a_s, a_t)


def test_nan_propagates(op_backend):
    backend, device = op_backend
    a_s, a_t = torch.randn(10, 8), torch.randn(10, 8)
    a_s[2, 2] = float("nan")
    assert torch.isnan(MF.correlation_kl(a_s.to(device), a_t.to(device), backend=backend))


def test_teacher_features_get_no_gradient(op_backend):
    backend, device = op_backend
    a_s = torch.randn(12, 8, device=device, requires_grad=True)
    a_t = torch.randn(12, 6, device=device, requires_grad=True)
    MF.correlation_kl(a_s, a_t, backend=backend).backward()
    assert a_s.grad is not None and a_t.grad is None


def test_many_blocks(op_backend):
    backend, device = op_backend
    _check(backend, device, torch.randn(300, 64), torch.randn(300, 128), torch.randn(257, 64), torch.randn(257, 128))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_rows_many_columns(op_backend, dtype):
    # One row block against 600 columns: the GPU kernels (Triton, fused CUDA) split the columns over
    # three programs and merge their partial statistics and rows; the column pass splits the rows.
    from mlkd_fast.kernels.correlation import _splits

    assert _splits(1, 600, 64, torch.device("cpu")) == (3, 256)
    backend, device = op_backend
    _check(backend, device, torch.randn(40, 64).to(dtype), torch.randn(40, 32).to(dtype),
           torch.randn(600, 64).to(dtype), torch.randn(600, 32).to(dtype))
    _check(backend, device, torch.randn(600, 24).to(dtype), torch.randn(600, 40).to(dtype))  # square: 10 row programs x 3 spans
    # one DDP process's rows against the global batch, which starts with them: (i, i) in the first span
    a_s, a_t = torch.randn(40, 64).to(dtype), torch.randn(40, 32).to(dtype)
    _check(backend, device, a_s, a_t, torch.cat([a_s, torch.randn(560, 64).to(dtype)]),
           torch.cat([a_t, torch.randn(560, 32).to(dtype)]), cols_start_with_rows=True)


def test_fp16_gradients_of_a_large_batch_do_not_underflow(op_backend):
    # With batchmean over 512 rows the backward's (Q - P) r^b g / tau terms are ~1e-6: unscaled they
    # are fp16 subnormals (a 6% gradient error). The gradient itself is representable, so
    # the kernel must come close to the fp64 gradient rounded once to fp16.
    backend, device = op_backend
    a_s, a_t = torch.randn(512, 64), torch.randn(512, 64)
    loss, (grad,) = _run(backend, device, a_s.half(), a_t.half())
    _, (ref,) = _run("torch", "cpu", a_s.double(), a_t.double())
    rounding = rel_err(ref.half(), ref)
    assert rel_err(grad, ref) <= 1.5 * rounding, f"{rel_err(grad, ref):.2e} vs fp16 rounding {rounding:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wide_features(op_backend, dtype):
    # Ds = 300 > 256: the CUDA backward splits the output features over two blocks per row block;
    # Ds, Dt not multiples of 8 take the scalar loads.
    backend, device = op_backend
    _check(backend, device, torch.randn(70, 300).to(dtype), torch.randn(70, 260).to(dtype))
    _check(backend, device, torch.randn(45, 301).to(dtype), torch.randn(45, 37).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_fused_and_tiled_paths_agree(monkeypatch, dtype):
    """On CUDA, fp16/bf16 features take the fused tensor-core kernels and MLKD_FAST_CORR_TILED=1 the
    tiled cuBLAS path (the one CPU runs, tested above): both against the fp64 reference."""
    require_backend("native", "cuda")
    device = torch.device("cuda")
    cases = [(torch.randn(200, 128), torch.randn(200, 96)),
             (torch.randn(130, 40), torch.randn(130, 24), torch.randn(70, 40), torch.randn(70, 24))]
    for flag in ("0", "1"):
        monkeypatch.setenv("MLKD_FAST_CORR_TILED", flag)
        for args in cases:
            _check("native", device, *[x.to(dtype) for x in args])


# ---------------------------------------------------------------------------------------------
# dtypes: fp32, fp16, bf16 and fp64, student and teacher in any combination; the math in fp32 or
# better, fp64 staying fp64, the gradients in the student's dtype
# ---------------------------------------------------------------------------------------------
# Error of the loss against the fp64 reference (relative to its largest |value|), by the math dtype
# and, with fp32 math, by the least precise input (fp16/bf16 dots and gradient operands).
DTYPE_LOSS_TOL = {F64: 1e-11, F32: 1e-5, F16: 3e-3, BF16: 2e-2}
# Gradient error (relative to the largest |grad|) allowed by the dtype the gradient is stored in.
DTYPE_GRAD_TOL = {F64: 1e-10, F32: 4e-5, F16: 1.2e-2, BF16: 8e-2}


@pytest.mark.parametrize("mode", ["square", "rectangular"])
@pytest.mark.parametrize("s_dtype, t_dtype", DTYPE_PAIRS, ids=dtype_id)
def test_correlation_kl_dtypes(op_backend, s_dtype, t_dtype, mode):
    backend, device = op_backend
    skip_interpreted_bf16_dots(backend, device, s_dtype, t_dtype)
    feats = [torch.randn(19, 12).to(s_dtype), torch.randn(19, 20).to(t_dtype)]
    if mode == "rectangular":
        feats += [torch.randn(9, 12).to(s_dtype), torch.randn(9, 20).to(t_dtype)]
    leaves = [x.to(device).requires_grad_() for x in feats[::2]]
    a_t, b_t = feats[1].to(device), (feats[3].to(device) if mode == "rectangular" else None)
    loss = MF.correlation_kl(leaves[0], a_t, leaves[1] if len(leaves) > 1 else None, b_t, tau=0.3, backend=backend)
    grads = torch.autograd.grad(loss, leaves, torch.tensor(1.3, dtype=loss.dtype, device=device))
    assert loss.dtype == math_dtype(s_dtype, t_dtype)
    assert all(g.dtype == s_dtype for g in grads)

    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in leaves]
    ref = MF.correlation_kl(ref_leaves[0], a_t.cpu().double(), ref_leaves[1] if len(leaves) > 1 else None,
                            None if b_t is None else b_t.cpu().double(), tau=0.3, backend="torch")
    ref_grads = torch.autograd.grad(ref, ref_leaves, torch.tensor(1.3, dtype=F64))
    loss_tol, grad_tol = dtype_tolerances(DTYPE_LOSS_TOL, DTYPE_GRAD_TOL, (s_dtype, t_dtype), s_dtype)
    assert rel_err(loss, ref) <= loss_tol, f"loss error {rel_err(loss, ref):.2e} > {loss_tol:.0e}"
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= grad_tol, f"gradient error {rel_err(g, r):.2e} > {grad_tol:.0e}"


# ---------------------------------------------------------------------------------------------
# the reference itself (mlkd_fast.reference.correlation_kl_rows) against independent computations
# ---------------------------------------------------------------------------------------------
def _explicit_correlation(a_s, a_t, b_s, b_t, tau, exclude_diag):
    """Independent loop form: explicit cosine matrices, explicit softmax, explicit KL sum."""
    def cos_matrix(a, b):
        out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
        for i in range(a.shape[0]):
            for j in range(b.shape[0]):
                out[i, j] = torch.dot(a[i], b[j]) / (max(a[i].norm(), 1e-8) * max(b[j].norm(), 1e-8))
        return out
    sim_s, sim_t = cos_matrix(a_s, b_s) / tau, cos_matrix(a_t, b_t) / tau
    rows = []
    for i in range(sim_s.shape[0]):
        cols = [j for j in range(sim_s.shape[1]) if not (exclude_diag and j == i)]
        zs = torch.exp(sim_s[i, cols]).sum()
        zt = torch.exp(sim_t[i, cols]).sum()
        rows.append(sum(torch.exp(sim_t[i, j]) / zt * (sim_t[i, j] - torch.log(zt) - sim_s[i, j] + torch.log(zs)) for j in cols))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["square", "keep_diagonal", "rectangular"])
def test_correlation_rows_match_explicit_computation(mode):
    a_s, a_t = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 7, dtype=torch.float64)
    if mode == "rectangular":
        b_s, b_t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
        got = reference.correlation_kl_rows(a_s, a_t, b_s, b_t, tau=0.5)
        expected = _explicit_correlation(a_s, a_t, b_s, b_t, 0.5, False)
    else:
        keep = mode == "keep_diagonal"
        got = reference.correlation_kl_rows(a_s, a_t, tau=0.5, exclude_diagonal=not keep)
        expected = _explicit_correlation(a_s, a_t, a_s, a_t, 0.5, not keep)
    torch.testing.assert_close(got, expected)


def test_correlation_rows_gradcheck_square_and_rectangular():
    a_s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    a_t = torch.randn(6, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: reference.correlation_kl_rows(x, a_t, tau=0.7), (a_s,))
    b_s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b_t = torch.randn(5, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, y: reference.correlation_kl_rows(x, a_t, y, b_t, tau=0.7), (a_s, b_s))


@pytest.mark.parametrize("keep_diagonal", [False, True])
def test_correlation_shards_make_up_the_square_loss(keep_diagonal):
    """Each shard's rows against the whole batch, its own rows first (cols_start_with_rows), gives
    the square loss's rows of that shard; summed over the shards, the loss and the gradient of the
    features (reaching them as rows and as columns) are the square ones."""
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(12, 7, dtype=torch.float64)
    square = reference.correlation_kl_rows(x, t, tau=0.5, exclude_diagonal=not keep_diagonal)
    (want,) = torch.autograd.grad(square.sum(), x)
    shards, total = [], 0.0
    for lo, hi in ((0, 4), (4, 8), (8, 12)):
        rest = torch.cat([torch.arange(0, lo), torch.arange(hi, 12)])
        rows = reference.correlation_kl_rows(x[lo:hi], t[lo:hi], torch.cat([x[lo:hi], x[rest]]),
                                             torch.cat([t[lo:hi], t[rest]]), tau=0.5,
                                             exclude_diagonal=not keep_diagonal)
        shards.append(rows)
        total = total + rows.sum()
    (got,) = torch.autograd.grad(total, x)
    torch.testing.assert_close(torch.cat(shards), square)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# the kernel backends' custom ops: opcheck of the forward and the backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("ds, dt", [(16, 24), (200, 136)], ids=["fused", "tiled"])  # Triton's two paths
def test_opcheck(kernel_backend, ds, dt, requires_grad):
    """torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) of correlation_fwd,
    square and rectangular, and of correlation_bwd, as each kernel backend registers them."""
    backend, device = kernel_backend
    ops = fused_ops(backend)
    a_s = torch.randn(20, ds, device=device, requires_grad=requires_grad)
    a_t = torch.randn(20, dt, device=device)
    b_s = torch.randn(7, ds, device=device, requires_grad=requires_grad)
    b_t = torch.randn(7, dt, device=device)
    torch.library.opcheck(ops.correlation_fwd.default, (a_s, a_t, None, None, 0.5, True))
    torch.library.opcheck(ops.correlation_fwd.default, (a_s, a_t, b_s, b_t, 0.5, False))
    _, lse_s, lse_t = ops.correlation_fwd(a_s.detach(), a_t, b_s.detach(), b_t, 0.5, False)
    torch.library.opcheck(ops.correlation_bwd.default,
                          (torch.rand(20, device=device), a_s.detach(), a_t, b_s.detach(), b_t, lse_s, lse_t, 0.5, False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_opcheck_in_half_precision(kernel_backend, dtype):
    """On CUDA fp16/bf16 features take the fused tensor-core kernels, a separate implementation."""
    backend, device = kernel_backend
    skip_interpreted_bf16_dots(backend, device, dtype)
    ops = fused_ops(backend)
    a_s = torch.randn(70, 40, device=device, dtype=dtype, requires_grad=True)
    a_t = torch.randn(70, 24, device=device, dtype=dtype)
    b_s = torch.randn(33, 40, device=device, dtype=dtype, requires_grad=True)
    b_t = torch.randn(33, 24, device=device, dtype=dtype)
    torch.library.opcheck(ops.correlation_fwd.default, (a_s, a_t, None, None, 0.5, True))
    torch.library.opcheck(ops.correlation_fwd.default, (a_s, a_t, b_s, b_t, 0.5, False))
    _, lse_s, lse_t = ops.correlation_fwd(a_s.detach(), a_t, None, None, 0.5, True)
    torch.library.opcheck(ops.correlation_bwd.default,
                          (torch.rand(70, device=device), a_s.detach(), a_t, None, None, lse_s, lse_t, 0.5, True))


# ---------------------------------------------------------------------------------------------
# bad input (docs/design.md §4): a clear error naming the argument; degenerate batches
# ---------------------------------------------------------------------------------------------
F_S, F_T = torch.randn(6, 8), torch.randn(6, 5)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(student_feats=torch.randn(6), teacher_feats=F_T), ValueError, "student_feats"),
    (dict(student_feats=F_S, teacher_feats=torch.randn(6, 5, 1)), ValueError, "teacher_feats"),
    (dict(student_feats=F_S, teacher_feats=torch.randn(7, 5)), ValueError, "rows M"),
    (dict(student_feats=F_S.long(), teacher_feats=F_T), TypeError, "student_feats"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(3, 8)), ValueError, "together"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(3, 8), teacher_cols=torch.randn(4, 5)), ValueError, "columns N"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(3, 9), teacher_cols=torch.randn(3, 5)), ValueError, "Ds"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(3, 8), teacher_cols=torch.randn(3, 4)), ValueError, "Dt"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(3, 8), teacher_cols=torch.randn(3, 5).int()), TypeError, "teacher_cols"),
    (dict(student_feats=F_S, teacher_feats=F_T, tau=0.0), ValueError, "tau"),
    (dict(student_feats=F_S, teacher_feats=F_T, tau=float("inf")), ValueError, "tau"),
    (dict(student_feats=F_S, teacher_feats=F_T, reduction="avg"), ValueError, "reduction"),
    (dict(student_feats=F_S, teacher_feats=F_T, backend="jax"), ValueError, "backend"),
    (dict(student_feats=torch.randn(0, 8), teacher_feats=torch.randn(0, 5)), ValueError, "empty batch"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(0, 8), teacher_cols=torch.randn(0, 5)),
     ValueError, "student_cols and teacher_cols have no rows"),
    (dict(student_feats=torch.randn(5, 8), teacher_feats=torch.randn(5, 5), student_cols=torch.randn(4, 8),
          teacher_cols=torch.randn(4, 5), cols_start_with_rows=True), ValueError, "rows first"),
    (dict(student_feats=F_S, teacher_feats=F_T.to("meta")), ValueError, "device"),
])
def test_correlation_kl_bad_input(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        MF.correlation_kl(**kwargs)


def test_square_correlation_with_three_rows_is_allowed():
    assert torch.isfinite(MF.correlation_kl(torch.randn(3, 4), torch.randn(3, 4), backend="torch"))


# Rows with fewer than 2 columns to compare with: one-point distributions, KL exactly 0.
DEGENERATE = {
    "square-1": (1, None, {}),
    "square-2": (2, None, {}),
    "keep_diagonal-1": (1, None, {"keep_diagonal": True}),
    "shard-1-of-1": (1, 1, {"cols_start_with_rows": True}),
    "shard-2-of-2": (2, 2, {"cols_start_with_rows": True}),
    "shard-1-of-2": (1, 2, {"cols_start_with_rows": True}),
    "rectangular-1-column": (3, 1, {}),
}


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("case", DEGENERATE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_correlation_is_exactly_zero_with_zero_gradients(backend, case, reduction):
    require_backend(backend, "cpu")
    m, n, kw = DEGENERATE[case]
    a_s = torch.randn(m, 8, requires_grad=True)
    a_t = torch.randn(m, 5)
    b_s = b_t = None
    if n is not None:
        b_s = torch.cat([a_s.detach(), torch.randn(n - m, 8)]).requires_grad_() if kw else torch.randn(n, 8).requires_grad_()
        b_t = torch.cat([a_t, torch.randn(n - m, 5)]) if kw else torch.randn(n, 5)
    loss = MF.correlation_kl(a_s, a_t, b_s, b_t, reduction=reduction, scale_by_tau_sq=True, backend=backend, **kw)
    assert loss.shape == ((m,) if reduction == "none" else ())
    assert (loss == 0).all() and loss.dtype == torch.float32
    leaves = [x for x in (a_s, b_s) if x is not None]
    grads = torch.autograd.grad(loss.sum(), leaves)
    for g, x in zip(grads, leaves):
        assert g.shape == x.shape and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_correlation_keeps_dtype_and_nan(backend):
    require_backend(backend, "cpu")
    a_s = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    loss = MF.correlation_kl(a_s, torch.randn(2, 3, dtype=torch.float64), backend=backend)
    loss.backward()
    assert loss.dtype == torch.float64 and loss == 0 and (a_s.grad == 0).all()
    nan = torch.full((1, 4), float("nan"))
    assert torch.isnan(MF.correlation_kl(nan, torch.randn(1, 3), backend=backend))  # never hidden


def test_nan_input_propagates_to_the_loss():
    f = F_S.clone()
    f[1, 1] = float("nan")
    assert torch.isnan(MF.correlation_kl(f, F_T, backend="torch"))


# ---------------------------------------------------------------------------------------------
# properties on random cases (hypothesis): every backend against the fp64 reference on random shapes
# (1 row, 1 column, odd sizes, more than one kernel tile), every mode, dtypes (mixed student/teacher
# too), taus, zero rows, tiny and huge magnitudes, non-contiguous and expanded (stride 0) features,
# and teacher features that require grad (and get none). Profiles: helpers.hypothesis_profile.
# ---------------------------------------------------------------------------------------------
PROFILE = hypothesis_profile()
DTYPES = (F32, F16, BF16, F64)
# Floors of the allowed error relative to the largest |reference value|, by the least precise input
# (fp64 anywhere: fp64 math, only the gradient's own storage rounds); the bound used is the larger of
# the floor and 10x the error of the torch backend on the same inputs (PyTorch's own error there).
CORR_TOL = {F64: 1e-9, F32: 2e-5, F16: 3e-3, BF16: 2e-2}
CORR_GRAD_TOL = {F64: 1e-8, F32: 1e-4, F16: 1.2e-2, BF16: 8e-2}


def _dtype_pair(draw, backend):
    return draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES))


@st.composite
def corr_cases(draw, backend):
    big = [129, 150] if backend == "triton" else [129, 1030]  # more than one fused tile / C++ tile
    m = draw(st.one_of(st.integers(1, 24), st.sampled_from(big)))
    mode = draw(st.sampled_from(["square", "keep_diagonal", "rectangular", "shard"]))
    n = m if mode in ("square", "keep_diagonal") else draw(st.integers(1, 24))
    if mode == "shard":
        n = m + draw(st.integers(0, 20))
    ds, dt = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    s_dtype, t_dtype = _dtype_pair(draw, backend)
    if backend == "triton" and BF16 in (s_dtype, t_dtype) and F64 not in (s_dtype, t_dtype):
        # tl.dot on bf16 operands is wrong under the Triton interpreter (fp64 takes torch's matmuls)
        s_dtype, t_dtype = (F16 if d == BF16 else d for d in (s_dtype, t_dtype))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3, "huge"]))

    def feats(rows, d, dtype):
        if scale == "huge":  # 1e4 in fp32 (and fp64, bf16), 6e4 in fp16
            x = (torch.rand(rows, d, generator=g, dtype=F64) * 2 - 1) * (6e4 if dtype == F16 else 1e4)
        else:
            x = torch.randn(rows, d, generator=g, dtype=F64) * scale
        if rows > 2 and draw(st.booleans()):
            x[1] = 0.0  # a zero row: its norm is clamped to eps
        return x.to(dtype)

    a_s, a_t = feats(m, ds, s_dtype), feats(m, dt, t_dtype)
    b_s = b_t = None
    if mode == "rectangular":
        b_s, b_t = feats(n, ds, s_dtype), feats(n, dt, t_dtype)
    elif mode == "shard":
        b_s = torch.cat([a_s, feats(n - m, ds, s_dtype)])
        b_t = torch.cat([a_t, feats(n - m, dt, t_dtype)])
    return dict(a_s=a_s, a_t=a_t, b_s=b_s, b_t=b_t, mode=mode, tau=draw(st.floats(0.05, 2.0)),
                reduction=draw(st.sampled_from(MF.REDUCTIONS)), scale_by_tau_sq=draw(st.booleans()),
                teacher_grad=draw(st.booleans()), grad_seed=seed,
                layout=draw(st.sampled_from(LAYOUTS[:3] if mode == "shard" else LAYOUTS)))


def _corr_run(backend, case, a_s, a_t, b_s, b_t):
    leaves = [a_s.clone().requires_grad_()] + ([] if b_s is None else [b_s.clone().requires_grad_()])
    a_t = a_t.clone().requires_grad_(case["teacher_grad"])  # always treated as a constant
    lay = lambda x: None if x is None else _apply_layout(case["layout"], x)  # noqa: E731
    loss = MF.correlation_kl(lay(leaves[0]), lay(a_t), lay(leaves[1]) if b_s is not None else None, lay(b_t),
                             tau=case["tau"],
                             reduction=case["reduction"], keep_diagonal=case["mode"] == "keep_diagonal",
                             scale_by_tau_sq=case["scale_by_tau_sq"], backend=backend,
                             cols_start_with_rows=case["mode"] == "shard")
    go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(case["grad_seed"]), dtype=F64) + 0.5
    grads = torch.autograd.grad(loss, leaves + ([a_t] if case["teacher_grad"] else []), go.to(loss.dtype),
                                allow_unused=True)
    if case["teacher_grad"]:
        assert grads[-1] is None, "the teacher features must not receive a gradient"
        grads = grads[:-1]
    return loss, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_property_random_cases_match_reference(backend):
    require_backend(backend, "cpu")

    @PROFILE
    @given(case=corr_cases(backend))
    def check(case):
        a_s, a_t, b_s, b_t = case["a_s"], case["a_t"], case["b_s"], case["b_t"]
        loss, grads = _corr_run(backend, case, a_s, a_t, b_s, b_t)
        dbl = lambda x: None if x is None else x.double()  # noqa: E731
        ref_loss, ref_grads = _corr_run("torch", case, dbl(a_s), dbl(a_t), dbl(b_s), dbl(b_t))
        base_loss, base_grads = _corr_run("torch", case, a_s, a_t, b_s, b_t)
        dtypes = tuple(x.dtype for x in (a_s, a_t, b_s, b_t) if x is not None)
        assert loss.dtype == (F64 if F64 in dtypes else F32)
        _close(loss, ref_loss, base_loss, _floor(CORR_TOL, dtypes), "loss", natural=1.0)  # log-probabilities
        # d loss / d a ~ (Q - P) / (tau M ||a||): its scale where Q - P is ~0
        norm = a_s.double().norm(dim=1).mean().clamp_min(1e-8).item()
        for g, r, b, x in zip(grads, ref_grads, base_grads, (a_s, b_s)):
            assert g.dtype == a_s.dtype
            # A zero row's gradient is (1 / eps) d loss / d x^: every rounding of d x^ times 1e8. Its
            # value is checked to be finite (or as NaN as the reference), its accuracy not.
            kept = x.double().norm(dim=1) > 1e-8
            assert torch.isfinite(g[~kept]).all() or not torch.isfinite(r[~kept].to(g.dtype)).all()
            _close(g, r, b, _floor(CORR_GRAD_TOL, dtypes, a_s.dtype), "student gradient",
                   natural=1.0 / (case["tau"] * a_s.shape[0] * norm), rows=kept)

    check()


# ---------------------------------------------------------------------------------------------
# counterexamples found by the properties above, kept as plain regression tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero", ["column", "row"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_feature_row_does_not_flush_the_fp16_gradient(backend, zero):
    """An all-zero student row or column (inverse norm clamped to 1 / eps = 1e8) once set the fp16
    backward's operand scale of the Triton kernels: every other operand entry underflowed and the
    rows' gradient came back exactly 0."""
    require_backend(backend, "cpu")
    a_s = torch.tensor([[1.5410, -0.2935], [-2.1797, 0.5684], [-1.0850, -1.3984]], dtype=F16)
    a_t = torch.tensor([[0.4033], [0.8380], [-0.7193]])
    b_s = torch.tensor([[-0.4033, -0.5967], [0.0, 0.0], [1.1006, -1.0713]], dtype=F16)
    b_t = torch.tensor([[0.1227], [-0.5663], [0.3731]])
    if zero == "row":
        a_s, b_s = b_s, a_s
    leaves = [a_s.clone().requires_grad_(), b_s.clone().requires_grad_()]
    loss = MF.correlation_kl(leaves[0], a_t, leaves[1], b_t, tau=1.0, backend=backend)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [x.double().requires_grad_() for x in (a_s, b_s)]
    ref_grads = torch.autograd.grad(MF.correlation_kl(ref_leaves[0], a_t.double(), ref_leaves[1], b_t.double(),
                                                      tau=1.0, backend="torch"), ref_leaves)
    for g, r in zip(grads, ref_grads):
        finite = torch.isfinite(r.to(F16))  # the zero row's own gradient (~1e7) overflows fp16 on every backend
        assert (g[finite].double() - r[finite]).abs().max() <= 2e-3 * r[finite].abs().max()


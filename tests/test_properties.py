"""Property-based tests: every op on every backend against the fp64 reference, on random shapes (1 row,
1 column, odd sizes, more than one kernel tile), dtypes (mixed student/teacher too), temperatures,
row masks, -inf teacher entries, huge magnitudes, non-contiguous and expanded (stride 0) inputs, and
a teacher that requires grad.

Profiles: ``ci`` (default; few derandomized examples, so that the file runs in well under a minute
on two cores: the Triton interpreter is slow, so its shapes stay small) and ``soak`` (many random
examples), chosen by ``MLKD_FAST_HYPOTHESIS_PROFILE``:

    MLKD_FAST_HYPOTHESIS_PROFILE=soak python -m pytest tests/test_properties.py
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rel_err, require_backend
from mlkd_fast import functional as MF

_COMMON = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("soak", max_examples=300, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("MLKD_FAST_HYPOTHESIS_PROFILE", "ci"))

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (F32, F16, BF16, F64)
PRECISION = (F64, F32, F16, BF16)  # most to least precise
BACKENDS = ("torch", "triton", "native")

# Floors of the allowed error relative to the largest |reference value|, by the least precise input
# (fp64 anywhere: fp64 math, only the gradient's own storage rounds); the bound used is the larger of
# the floor and 10x the error of the torch backend on the same inputs (PyTorch's own error there).
KD_TOL = {F64: 1e-9, F32: 2e-5, F16: 2e-3, BF16: 2e-3}
KD_GRAD_TOL = {F64: 1e-9, F32: 2e-6, F16: 2e-3, BF16: 1.6e-2}
CORR_TOL = {F64: 1e-9, F32: 2e-5, F16: 3e-3, BF16: 2e-2}
CORR_GRAD_TOL = {F64: 1e-8, F32: 1e-4, F16: 1.2e-2, BF16: 8e-2}


def _least_precise(*dtypes):
    return max(dtypes, key=PRECISION.index)


def _floor(table, dtypes, grad_dtype=None):
    if F64 in dtypes:
        return table[F64] if grad_dtype is None else table[grad_dtype]
    low = _least_precise(*dtypes)
    return table[low] if grad_dtype is None else max(table[low], table[grad_dtype])


def _close(x, ref, baseline, floor, what, natural=1e-6, atol=0.0, rows=None):
    """x within max(floor, 10 * baseline error) of ref, relative to the largest |ref|, or to ``natural``
    (the op's own scale) where ref is smaller: a reference near 0 (P = Q) leaves only rounding."""
    tol = max(floor, 10 * rel_err(baseline, ref))
    if rows is not None:  # compare these rows only
        x, ref = x[rows], ref[rows]
    diff = (x.detach().cpu().double() - ref.detach().cpu().double()).abs()
    both_nan = torch.isnan(x.detach().cpu()) & torch.isnan(ref.detach().cpu())
    assert not (torch.isnan(diff) & ~both_nan).any(), f"{what}: NaN where the reference has none (or the reverse)"
    scale = max(ref.detach().abs().nan_to_num(0).max().item(), natural)
    err = float(diff[~both_nan].max()) if (~both_nan).any() else 0.0
    if err <= atol:
        return
    err /= scale
    assert err <= tol, f"{what}: error {err:.2e} > {tol:.1e}"


LAYOUTS = ("contiguous", "row_strided", "col_strided", "expanded")


def _apply_layout(kind: str, x: torch.Tensor) -> torch.Tensor:
    """x (differentiably) as a non-contiguous view: row stride > width (last stride 1, no copy in the
    op), column stride 2 (copied by the op); or its first row expanded over the rows (row stride 0)."""
    if kind == "row_strided":
        return torch.nn.functional.pad(x, (1, 2))[:, 1:1 + x.shape[1]]
    if kind == "col_strided":
        return torch.stack([x, torch.zeros_like(x)], dim=-1).reshape(x.shape[0], 2 * x.shape[1])[:, ::2]
    if kind == "expanded":
        return x[:1].expand(x.shape[0], x.shape[1])
    return x


def _dtype_pair(draw, backend):
    return draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES))


# ---------------------------------------------------------------------------------------------
# temperature KL
# ---------------------------------------------------------------------------------------------
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
def test_kd_kl_div_matches_reference(backend):
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
# correlation KL
# ---------------------------------------------------------------------------------------------
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
def test_correlation_kl_matches_reference(backend):
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

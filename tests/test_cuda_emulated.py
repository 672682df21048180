"""The CUDA kernels of csrc/cuda/*.cu run on the CPU emulator of tests/simt_emulator (no GPU needed).

The emulator executes the real kernel code: every index, mask, barrier, shuffle, shared-memory layout
and WMMA operand (alignment and leading dimension checked), in both thread orders, so that a missing
barrier shows as a wrong number. The arguments are what csrc/cuda/glue.cpp passes; the fp64 oracle is the
package reference. Inputs sit in NaN-filled buffers (also between rows when a row stride is padded):
a read out of bounds reaches the results as NaN. Outputs sit between sentinel guards that must survive.
Speed, the real fragment layouts and the GPU memory model are left to the GPU tests (test_op_*.py, test_backend_native.py).
"""
from __future__ import annotations

import ctypes
import math
from typing import Optional, Sequence

import pytest
import torch

from mlkd_fast import reference
# The Triton launchers' host helpers compute what csrc/cuda/glue.cpp computes around the fused CUDA kernels.
from mlkd_fast.kernels.correlation import _inv_norms, _norm_backward, operand_scale
from simt_emulator import build

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Max error against the fp64 oracle, relative to the largest reference entry: the kernels do fp32 math;
# the stored gradients are rounded to the input dtype; the correlation backward rounds its (Q - P)
# operand to the input dtype before the tensor-core product.
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CORR_GRAD_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
GUARD = 64            # elements of guard before and after every buffer
SENTINEL = -12345.0   # output guards


@pytest.fixture(scope="module")
def emu():
    reason = build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA emulator cannot be built here: {reason}")
    return build.load()


@pytest.fixture(params=["forward", "reverse"])
def order(request, emu):
    """Thread order inside a block; each test runs in both, so a missing barrier shows in one."""
    emu.simt_configure(132, 9, int(request.param == "reverse"))
    return request.param


def _ptr(x: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if x is None else x.data_ptr())


def _fptr(x: Optional[torch.Tensor]):
    return ctypes.cast(_ptr(x), ctypes.POINTER(ctypes.c_float))


class Guarded:
    """A (rows, cols) matrix inside a flat buffer with guards before and after it and, when
    row_stride > cols, gaps between rows; guards and gaps hold `fill`."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, fill: float, row_stride: Optional[int] = None,
                 offset: int = 0):
        self.stride = cols if row_stride is None else row_stride
        self.start = GUARD + offset
        self.buffer = torch.full((self.start + rows * self.stride + GUARD,), fill, dtype=dtype)
        self.fill = fill
        self.view = self.buffer[self.start:self.start + rows * self.stride].view(rows, self.stride)[:, :cols]

    @classmethod
    def holding(cls, x: torch.Tensor, **kwargs) -> "Guarded":
        g = cls(x.shape[0], x.shape[1], x.dtype, math.nan, **kwargs)
        g.view.copy_(x)
        return g

    def guards_intact(self) -> bool:
        mask = torch.ones_like(self.buffer, dtype=torch.bool)
        rows, cols = self.view.shape
        inside = mask[self.start:self.start + rows * self.stride].view(rows, self.stride)
        inside[:, :cols] = False
        rest = self.buffer[mask]
        return bool((rest == self.fill).all()) if not math.isnan(self.fill) else bool(rest.isnan().all())


def _output(rows: int, cols: int, dtype: torch.dtype) -> Guarded:
    return Guarded(rows, cols, dtype, SENTINEL)


def _check_ran(emu, err: int) -> None:
    assert err == 0, f"launch returned cudaError {err}"
    message = emu.simt_error().decode()
    assert message == "", message


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp_min(1e-30)
    err = ((got - want).abs() / scale).max().item()
    assert err <= tol, f"{what}: max error {err:.3g} of max |ref| {scale.item():.3g} (tolerance {tol})"


# ------------------------------------------------------------------------------------------------
# Temperature KL: kd_kl_cuda_launch as glue.cpp calls it (split decided by kd_kl_cuda_split).
# ------------------------------------------------------------------------------------------------
def _run_kd_kl(emu, s: torch.Tensor, t: torch.Tensor, temperature: float, weight: Optional[torch.Tensor],
               teacher_grad: bool, row_stride: Optional[int] = None, offset: int = 0):
    n, c = s.shape
    gs_in, gt_in = Guarded.holding(s, row_stride=row_stride, offset=offset), Guarded.holding(t, row_stride=row_stride)
    rows = _output(n, 1, torch.float32)
    grad_s = _output(n, c, s.dtype)
    grad_t = _output(n, c, s.dtype) if teacher_grad else None
    split = (ctypes.c_int64 * 2)()
    emu.simt_kd_kl_split(ctypes.c_int64(n), ctypes.c_int64(c), split)
    partials = torch.full((n * split[0] * 5,), math.nan) if split[0] > 1 else None
    err = emu.simt_kd_kl(
        DTYPE_CODE[s.dtype], _ptr(gs_in.view), ctypes.c_int64(gs_in.stride), _ptr(gt_in.view), ctypes.c_int64(gt_in.stride),
        _fptr(weight), _fptr(rows.view), _ptr(grad_s.view), _ptr(grad_t.view if grad_t else None), ctypes.c_int64(n),
        ctypes.c_int64(c), ctypes.c_float(temperature), ctypes.c_int64(split[0]), ctypes.c_int64(split[1]),
        _fptr(partials))
    _check_ran(emu, err)
    for g in (rows, grad_s, grad_t):
        assert g is None or g.guards_intact(), "a kernel wrote outside its output"
    return rows.view[:, 0], grad_s.view, (grad_t.view if grad_t else None), split[0]


def _kd_kl_oracle(s, t, temperature, weight, teacher_grad):
    s64 = s.double().requires_grad_()
    t64 = t.double().requires_grad_(teacher_grad)
    w = torch.ones(s.shape[0], dtype=torch.float64) if weight is None else weight.double()
    rows = reference.kd_kl_rows(s64, t64, temperature) * w
    rows.sum().backward()
    return rows.detach(), s64.grad, (t64.grad if teacher_grad else None)


@pytest.mark.parametrize(
    "n, c, dtype, row_stride",
    [
        (37, 1271, torch.float32, None),      # scalar loads (C % 4 != 0)
        (16, 1024, torch.float16, None),      # 16-byte loads
        (16, 1024, torch.bfloat16, 1032),     # padded rows, still aligned
        (9, 2500, torch.float32, 2600),       # 512 threads
        (3, 20000, torch.float16, None),      # few long rows: split over blocks, 1024 threads
        (2, 70001, torch.float32, 70003),     # split, scalar loads, odd padded stride
    ],
)
def test_kd_kl_kernel_matches_the_oracle(emu, order, n, c, dtype, row_stride):
    s = (torch.randn(n, c) * 3).to(dtype)
    t = (torch.randn(n, c) * 3).to(dtype)
    t[0, : c // 3] = -math.inf             # masked classes: p = 0, never NaN
    weight = torch.rand(n) + 0.5
    weight[n // 2] = 0.0                   # a masked row: loss 0, zero gradients
    split = (ctypes.c_int64 * 2)()
    emu.simt_kd_kl_split(ctypes.c_int64(n), ctypes.c_int64(c), split)
    edges = torch.arange(0, c, split[1])
    s[-1, edges], t[-1, edges] = 12.0, 15.0   # mass at the first column of every split: counted once each
    s[-1, edges[1:] - 1], t[-1, edges[1:] - 1] = 9.0, 14.0  # and at the last
    rows, grad_s, grad_t, splits = _run_kd_kl(emu, s, t, 2.0, weight, teacher_grad=True, row_stride=row_stride)
    if c >= 16384 and n < 2 * 132:
        assert splits > 1, "few long rows should take the split path"
    want_rows, want_s, want_t = _kd_kl_oracle(s, t, 2.0, weight, teacher_grad=True)
    _assert_close(rows, want_rows, 1e-5, "loss rows")
    _assert_close(grad_s, want_s, GRAD_TOL[dtype], "student gradient")
    _assert_close(grad_t, want_t, GRAD_TOL[dtype], "teacher gradient")
    assert (grad_s[n // 2] == 0).all() and (grad_t[n // 2] == 0).all() and rows[n // 2] == 0


@pytest.mark.parametrize("c", [1000, 40000])
def test_kd_kl_kernel_extreme_logits_and_no_weights(emu, order, c):
    n = 4
    s = torch.randn(n, c) * 1e4            # |logits| 1e4 must not overflow
    t = torch.randn(n, c) * 1e4
    t[1] = -math.inf
    t[1, 7] = 0.0                          # a one-hot teacher row
    rows, grad_s, grad_t, _ = _run_kd_kl(emu, s, t, 1.0, None, teacher_grad=False, offset=1)  # unaligned: scalar loads
    assert grad_t is None
    want_rows, want_s, _ = _kd_kl_oracle(s, t, 1.0, None, teacher_grad=False)
    assert torch.isfinite(rows).all() and torch.isfinite(grad_s).all()
    _assert_close(rows, want_rows, 1e-5, "loss rows")
    _assert_close(grad_s, want_s, 2e-5, "student gradient")


def test_kd_kl_kernel_propagates_nan(emu, order):
    s = torch.randn(3, 700)
    t = torch.randn(3, 700)
    s[1, 5] = math.nan
    rows, _, _, _ = _run_kd_kl(emu, s, t, 4.0, None, teacher_grad=False)
    assert rows[1].isnan() and torch.isfinite(rows[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_rows_kernels(emu, order, dtype):
    n, c = 7, 301
    x = torch.randn(n, c).to(dtype)
    g = torch.rand(n) * 4
    g[2] = 1.0                                          # rows scaled by 1 are skipped in place
    src = Guarded.holding(x)
    out = _output(n, c, dtype)
    _check_ran(emu, emu.simt_scale_rows(DTYPE_CODE[dtype], _ptr(src.view), _fptr(g), _ptr(out.view), ctypes.c_int64(n),
                                        ctypes.c_int64(c)))
    want = (x.double() * g.double()[:, None]).to(dtype)
    assert out.guards_intact()
    torch.testing.assert_close(out.view, want, rtol=0, atol=0)
    inplace = Guarded.holding(x, row_stride=c + 5)
    _check_ran(emu, emu.simt_scale_rows_inplace(DTYPE_CODE[dtype], _ptr(inplace.view), ctypes.c_int64(inplace.stride),
                                                _fptr(g), ctypes.c_int64(n), ctypes.c_int64(c)))
    assert inplace.guards_intact()
    torch.testing.assert_close(inplace.view, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Correlation: the fused tensor-core kernels with the arguments glue.cpp builds (correlation_fwd_cuda,
# correlation_bwd_cuda: inverse norms, operand scales, the row and the column pass, the normalisation
# backward), mirrored here in a few lines.
# ------------------------------------------------------------------------------------------------
class FusedCorrelation:
    """One correlation problem laid out for the emulated kernels (guarded, optionally padded rows)."""

    def __init__(self, emu, a_s, a_t, b_s=None, b_t=None, tau=0.5, exclude_diagonal=True, pad: int = 0):
        self.emu, self.tau, self.exclude = emu, tau, exclude_diagonal
        self.square = b_s is None
        self.inputs = [a_s, a_t, a_s if self.square else b_s, a_t if self.square else b_t]
        stride = lambda x: x.shape[1] + pad if pad else None  # noqa: E731
        self.held = [Guarded.holding(x, row_stride=stride(x)) for x in self.inputs]
        self.norms = [_inv_norms(x) for x in self.inputs]
        self.ds, self.dt = a_s.shape[1], a_t.shape[1]
        self.dtype = DTYPE_CODE[a_s.dtype]
        self.splits = []  # column splits of each launch: forward, row pass, column pass

    def _arrays(self, order: Sequence[int]):
        features = (ctypes.c_void_p * 4)(*[self.held[i].view.data_ptr() for i in order])
        strides = (ctypes.c_int64 * 4)(*[self.held[i].stride for i in order])
        norms = (ctypes.POINTER(ctypes.c_float) * 4)(*[_fptr(self.norms[i]) for i in order])
        counts = (ctypes.c_int64 * 2)(self.inputs[order[0]].shape[0], self.inputs[order[2]].shape[0])
        return features, strides, norms, counts

    def _split(self, rows: int, cols: int, backward: bool, width: int):
        """correlation_cuda_split and the NaN-filled partials glue.cpp would allocate for it."""
        split = (ctypes.c_int64 * 2)()
        self.emu.simt_correlation_split(ctypes.c_int64(rows), ctypes.c_int64(cols), ctypes.c_int64(self.ds),
                                        int(backward), split)
        self.splits.append(split[0])
        partials = torch.full((split[0] * rows * width,), math.nan) if split[0] > 1 else None
        self.workspace = partials  # alive until the launch has run
        return ctypes.c_int64(split[0]), ctypes.c_int64(split[1]), _fptr(partials)

    def forward(self):
        m, n = self.inputs[0].shape[0], self.inputs[2].shape[0]
        outs = [_output(m, 1, torch.float32) for _ in range(3)]
        err = self.emu.simt_correlation_fwd(self.dtype, *self._arrays((0, 1, 2, 3)), ctypes.c_int64(self.ds),
                                            ctypes.c_int64(self.dt), ctypes.c_float(1.0 / self.tau), int(self.exclude),
                                            *[_fptr(o.view) for o in outs], *self._split(m, n, False, 5))
        _check_ran(self.emu, err)
        assert all(o.guards_intact() for o in outs)
        return [o.view[:, 0].clone() for o in outs]

    def _pass(self, order, stats_on_cols, lse_s, lse_t, grad, scale):
        rows, cols = self.inputs[order[0]].shape[0], self.inputs[order[2]].shape[0]
        d_rows = Guarded(rows, self.ds, torch.float32, SENTINEL, row_stride=self.ds + 3)
        err = self.emu.simt_correlation_bwd(self.dtype, *self._arrays(order), ctypes.c_int64(self.ds),
                                            ctypes.c_int64(self.dt), ctypes.c_float(1.0 / self.tau), int(self.exclude),
                                            _fptr(lse_s), _fptr(lse_t), _fptr(grad), int(stats_on_cols), _fptr(scale),
                                            _fptr(d_rows.view), ctypes.c_int64(d_rows.stride),
                                            *self._split(rows, cols, True, self.ds))
        _check_ran(self.emu, err)
        assert d_rows.guards_intact(), "the backward wrote outside d_rows"
        return d_rows.view.clone()

    def backward(self, grad, lse_s, lse_t):
        """d loss / d (raw student rows), d loss / d (raw student columns) (None in square mode)."""
        m, n = self.inputs[0].shape[0], self.inputs[2].shape[0]
        ra_s, rb_s = self.norms[0], self.norms[2]
        d_a_hat = self._pass((0, 1, 2, 3), False, lse_s, lse_t, grad, operand_scale(rb_s, n))
        d_b_hat = self._pass((2, 3, 0, 1), True, lse_s, lse_t, grad, operand_scale(grad * ra_s / self.tau, m))
        a, b = self.inputs[0], self.inputs[2]
        if self.square:
            return _norm_backward(a, ra_s, d_a_hat + d_b_hat), None
        return _norm_backward(a, ra_s, d_a_hat), _norm_backward(b, rb_s, d_b_hat)


def _correlation_oracle(a_s, a_t, b_s, b_t, tau, exclude_diagonal, grad):
    a64 = a_s.double().requires_grad_()
    b64 = None if b_s is None else b_s.double().requires_grad_()
    rows = reference.correlation_kl_rows(a64, a_t.double(), b64, None if b_t is None else b_t.double(), tau,
                                         exclude_diagonal=exclude_diagonal)
    (rows * grad.double()).sum().backward()
    return rows.detach(), a64.grad, (None if b64 is None else b64.grad)


def _lse_oracle(a, b, tau, exclude_diagonal):
    a_hat = torch.nn.functional.normalize(a.double(), dim=1, eps=reference.NORM_EPS)
    b_hat = torch.nn.functional.normalize(b.double(), dim=1, eps=reference.NORM_EPS)
    sim = a_hat @ b_hat.T / tau
    if exclude_diagonal:
        sim.fill_diagonal_(-math.inf)
    return torch.logsumexp(sim, dim=1)


@pytest.mark.parametrize(
    "m, n, ds, dt, dtype, exclude, pad",
    [
        (70, None, 37, 45, torch.float16, True, 0),      # square, partial tiles, scalar loads
        (70, None, 64, 128, torch.bfloat16, True, 8),    # square, 16-byte loads over padded rows, NF 4
        (40, None, 96, 24, torch.float16, False, 0),     # keep the diagonal, NF 8
        (96, 32, 128, 64, torch.float16, False, 0),      # rectangular 3B x B (the paper's rotations)
        (33, 70, 300, 40, torch.bfloat16, False, 0),     # wide Ds: two output blocks over grid.y (NF 16)
        (20, 17, 256, 256, torch.float16, False, 16),    # Ds = 256 in one block, vector loads
        (40, 600, 64, 32, torch.float16, False, 0),      # few rows, many columns: columns split 3 ways
        (300, None, 40, 40, torch.bfloat16, True, 0),    # square, split in 2 (a span boundary at 256)
        (70, 330, 48, 40, torch.float16, True, 0),       # one shard's rows against its batch: (i, i) left out,
                                                         # in the column pass's split too
    ],
)
def test_fused_correlation_kernels_match_the_oracle(emu, order, m, n, ds, dt, dtype, exclude, pad):
    a_s = torch.randn(m, ds).to(dtype)
    a_t = torch.randn(m, dt).to(dtype)
    b_s = None if n is None else torch.randn(n, ds).to(dtype)
    b_t = None if n is None else torch.randn(n, dt).to(dtype)
    square = n is None
    problem = FusedCorrelation(emu, a_s, a_t, b_s, b_t, tau=0.5, exclude_diagonal=exclude, pad=pad)
    loss, lse_s, lse_t = problem.forward()
    grad = torch.rand(m) + 0.5                              # d total / d l_i (batchmean: 1/M; any works)
    want, want_da, want_db = _correlation_oracle(a_s, a_t, b_s, b_t, 0.5, exclude, grad)
    cols_s, cols_t = (a_s, a_t) if square else (b_s, b_t)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse_s.double(), _lse_oracle(a_s, cols_s, 0.5, exclude), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_t.double(), _lse_oracle(a_t, cols_t, 0.5, exclude), rtol=1e-5, atol=1e-5)
    d_a, d_b = problem.backward(grad, lse_s, lse_t)
    expect_split = (n or m) > 256                            # spans of >= 256 columns, SMs to spare
    assert (problem.splits[0] > 1) == expect_split and (problem.splits[1] > 1) == expect_split, problem.splits
    _assert_close(d_a, want_da, CORR_GRAD_TOL[dtype], "row gradient")
    if not square:
        _assert_close(d_b, want_db, CORR_GRAD_TOL[dtype], "column gradient")


def test_fused_correlation_large_batch_gradient_keeps_its_bits(emu):
    """512 rows in fp16: (Q - P) f is ~1/M^2 and underflows fp16 unless the operand scale lifts it."""
    emu.simt_configure(132, 9, 0)
    m, d = 512, 64
    a_s = torch.randn(m, d).half()
    a_t = torch.randn(m, d).half()
    grad = torch.full((m,), 1.0 / m)                        # batchmean
    problem = FusedCorrelation(emu, a_s, a_t)
    loss, lse_s, lse_t = problem.forward()
    d_a, _ = problem.backward(grad, lse_s, lse_t)
    _, want_da, _ = _correlation_oracle(a_s, a_t, None, None, 0.5, True, grad)
    rounding = (want_da.half().double() - want_da).abs().max() / want_da.abs().max()
    err = ((d_a.double() - want_da).abs().max() / want_da.abs().max()).item()
    assert err <= max(4 * rounding.item(), 2e-3), f"max error {err:.3g}, fp16 rounding {rounding.item():.3g}"


def test_fused_correlation_is_refused_before_sm80(emu):
    emu.simt_configure(132, 7, 0)
    assert not emu.simt_correlation_fused_supported(1)
    emu.simt_configure(132, 9, 0)
    assert emu.simt_correlation_fused_supported(1) and emu.simt_correlation_fused_supported(2)
    assert not emu.simt_correlation_fused_supported(0)     # fp32 keeps the cuBLAS tiles

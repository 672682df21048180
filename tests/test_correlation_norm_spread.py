"""The correlation's fp16/bf16 backward when the feature rows' norms spread over many decades (issue #33,
finding 9).

The similarities are cosines, so they do not depend on the norms, but the backward's matmul operands
(Q - P)_ij r^b_j (row pass) and g_i r^a_i (Q - P)_ij / tau (column pass) carry the inverse norms. The
Triton kernels once scaled them by one power of two for the largest inverse norm: at a norm spread of
1e6-1e8 the operands of the large-norm rows underflowed fp16 and their share of every gradient row was
lost (relative errors 1e-2 to 0.5; the C++ CPU kernels, which widen to fp32, were right). Each case here
compares every gradient row with the fp64 reference relative to that row's own size, so the small
gradients of the large-norm rows count as much as the others.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py); the CUDA cases skip with the
reason without a GPU.
"""
import pytest
import torch

from helpers import BF16, F16, rel_err, require_backend, skip_interpreted_bf16_dots
from mlkd_fast import functional as MF

SPREADS = [1.0, 1e4, 1e6, 1e8]
# Per gradient row: |error| <= TOL * max |reference row| + 2 x the error of rounding the reference once to
# the dtype (the stored gradient of a row of norm 1e4 is an fp16 subnormal: rounding alone is ~40 % there).
# fp16 gives ~5e-4 (its rounding, 2^-11), bf16 ~4e-3 (2^-8): four roundings of room.
TOL = {F16: 2e-3, BF16: 1.6e-2}
PATHS = [("triton", "cpu", "fused"), ("triton", "cpu", "tiled"), ("native", "cpu", None),
         ("triton", "cuda", "fused"), ("triton", "cuda", "tiled"), ("native", "cuda", None)]
# The CUDA kernels of csrc/ take the same unit-scaled fp16 operands (csrc/cuda/glue.cpp's unit_scaled): on
# the SIMT emulator (tests/simt_emulator) their fp16 row gradient at this test's inputs was off by 8e-3
# (spread 1e6) and 0.37 (1e8) of its largest entry with one operand scale, 2-4e-4 with the row scaling.


def _features(rows: int, width: int, spread: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random directions with norms log-evenly spaced over [spread^-1/2, spread^1/2], in random order (so
    every tile of rows and columns holds small and large norms)."""
    x = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    log_norm = torch.linspace(-0.5, 0.5, rows, dtype=torch.float64) * torch.log(torch.tensor(spread, dtype=torch.float64))
    x = x / x.norm(dim=1, keepdim=True) * log_norm[torch.randperm(rows, generator=gen)].exp()[:, None]
    return x.to(dtype)


def _loss_and_grads(backend, device, a_s, a_t, b_s, b_t):
    leaves = [x.to(device).requires_grad_() for x in (a_s, b_s) if x is not None]
    loss = MF.correlation_kl(leaves[0], a_t.to(device), leaves[1] if b_s is not None else None,
                             None if b_t is None else b_t.to(device), tau=0.5, backend=backend)
    return loss, torch.autograd.grad(loss, leaves)


def _worst_row(grad: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[float, float]:
    """(largest per-row error over its bound, largest per-row relative error): the bound is
    tol * max |ref row| + 2 x the rounding of the ref row to the gradient's dtype."""
    dtype = grad.dtype
    grad, ref64 = grad.detach().cpu().double(), ref.detach().cpu().double()
    err = (grad - ref64).abs().amax(dim=1)
    size = ref64.abs().amax(dim=1)
    rounding = (ref64.to(dtype).double() - ref64).abs().amax(dim=1)
    return float((err / (tol * size + 2 * rounding)).max()), float((err / size).max())


@pytest.mark.parametrize("spread", SPREADS, ids=lambda s: f"spread{s:g}")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("mode", ["square", "rectangular"])
@pytest.mark.parametrize("backend, device, path", PATHS, ids=lambda x: str(x))
def test_gradient_rows_match_fp64_whatever_the_norm_spread(request, monkeypatch, backend, device, path, mode, dtype,
                                                          spread):
    require_backend(backend, device)
    if path == "fused":
        skip_interpreted_bf16_dots(backend, torch.device(device), dtype)
    if path == "tiled":  # the path of features too wide for the fused kernels, at a small width
        from mlkd_fast.kernels import correlation
        monkeypatch.setattr(correlation, "_config", lambda *args: None)
        monkeypatch.setattr(correlation, "TILED_ELEMENTS", 96 * 40)  # several column tiles
    gen = torch.Generator().manual_seed(33)
    # 96 rows: a full and a partial row block of the fused kernels; Ds != Dt
    a_s, a_t = _features(96, 32, spread, dtype, gen), _features(96, 24, spread, dtype, gen)
    b_s = b_t = None
    if mode == "rectangular":
        b_s, b_t = _features(48, 32, spread, dtype, gen), _features(48, 24, spread, dtype, gen)
    loss, grads = _loss_and_grads(backend, device, a_s, a_t, b_s, b_t)
    dbl = lambda x: None if x is None else x.double()  # noqa: E731
    ref_loss, ref_grads = _loss_and_grads("torch", "cpu", dbl(a_s), dbl(a_t), dbl(b_s), dbl(b_t))
    tol = TOL[dtype]
    assert rel_err(loss, ref_loss) <= tol, f"loss error {rel_err(loss, ref_loss):.2e}"
    for name, g, r in zip(("rows", "columns"), grads, ref_grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        over, worst = _worst_row(g, r, tol)
        assert over <= 1.0, (f"{name}' gradient: a row's error is {over:.2f} x its bound "
                             f"(worst relative row error {worst:.2e}, tolerance {tol:g})")

"""What only the native backend (the compiled library) has: its ops registered, fakes, soft loading,
the AVX2 sweeps, the CPU output block cache, the C++ correlation's tiles, mixed dtypes read by the op
itself. The op tests themselves (every backend, opcheck included) are tests/test_op_*.py."""
import sys

import pytest
import torch

from helpers import BF16, DEVICES, F64, rel_err, require_backend
from mlkd_fast import _native, reference
from mlkd_fast.backends import REGISTRY


@pytest.fixture(params=DEVICES)
def device(request):
    require_backend("native", request.param)
    return torch.device(request.param)


def test_ops_are_registered(device):
    for name in ("kd_kl", "scale_rows", "scale_rows_", "correlation_fwd", "correlation_bwd"):
        assert hasattr(torch.ops.mlkd_fast, name)
    assert isinstance(torch.ops.mlkd_fast_build.built_with_cuda(), bool)


def test_fakes_give_shapes_and_dtypes(device):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        s = torch.empty(5, 33, dtype=torch.bfloat16, device=device)
        rows, gs, gt = torch.ops.mlkd_fast.kd_kl(s, s, None, 2.0, True, False)
        assert rows.shape == (5,) and rows.dtype == torch.float32
        assert gs.shape == (5, 33) and gs.dtype == torch.bfloat16 and gt.numel() == 0
        a = torch.empty(9, 4, device=device)
        out = torch.ops.mlkd_fast.correlation_fwd(a, torch.empty(9, 6, device=device), None, None, 0.5, True)
        assert all(o.shape == (9,) and o.dtype == torch.float32 for o in out)


def test_mixed_dtypes_are_promoted(device):
    s = torch.randn(4, 50, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(4, 50, device=device)
    rows = REGISTRY["native"].kd_kl_rows(s, t, 2.0, None)
    rows.sum().backward()
    assert rows.dtype == torch.float32 and s.grad.dtype == torch.bfloat16


def test_missing_library_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_PACKAGE_DIR", str(tmp_path))
    loaded, reason = _native._load()
    assert not loaded and "not built" in reason
    (tmp_path / "_C.so").write_bytes(b"not a library")
    loaded, reason = _native._load()
    assert not loaded and "failed to load" in reason


_SWEEP_SCRIPT = """
import sys, torch
import mlkd_fast._native  # loads the library
g = torch.Generator().manual_seed(1)
out = []
for n, c in [(5, 7), (9, 1271), (3, 2055)]:
    s = torch.randn(n, c, generator=g) * 30
    t = torch.randn(n, c, generator=g) * 30
    t[0, ::3] = float("-inf")
    s[1, 5] = float("nan")
    out.append(torch.ops.mlkd_fast.kd_kl(s, t, None, 2.0, True, True))
torch.save(out, sys.argv[1])
"""


def test_cpu_simd_sweeps_match_portable_ones(tmp_path):
    """The AVX2 sweeps of the C++ KL agree with the portable scalar ones (chosen by MLKD_FAST_NO_SIMD)."""
    require_backend("native", "cpu")
    import os
    import subprocess
    import sys

    results = {}
    for name, env in (("simd", {}), ("scalar", {"MLKD_FAST_NO_SIMD": "1"})):
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _SWEEP_SCRIPT, str(path)], check=True, env={**os.environ, **env})
        results[name] = torch.load(path)
    for simd, scalar in zip(results["simd"], results["scalar"]):
        for a, b in zip(simd, scalar):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, equal_nan=True)  # FMA vs mul+add rounding
    rows, grad_s, grad_t = results["simd"][0]
    assert torch.isnan(rows[1]) and torch.isfinite(rows[0]) and torch.isfinite(grad_t[0]).all()
    assert (grad_t[0, ::3] == 0).all()


def test_cuda_kernels_are_built_when_the_build_was_forced():
    """CI installs with MLKD_FAST_FORCE_NATIVE=1 next to a CUDA toolkit: the library must hold the
    CUDA kernels (compiled by nvcc), not only the C++ CPU ones."""
    import os

    if os.environ.get("MLKD_FAST_FORCE_NATIVE") != "1" or not torch.version.cuda \
            or os.environ.get("MLKD_FAST_SKIP_CUDA") == "1":
        pytest.skip("only meaningful for a forced build with a CUDA torch (as in CI)")
    assert _native.LOADED and torch.ops.mlkd_fast_build.built_with_cuda()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the output block cache is Linux-only")
def test_large_cpu_outputs_reuse_freed_blocks_without_aliasing():
    """Outputs of >= 2 MiB come from a block cache: live outputs never share memory, a freed block is
    handed out again, and every element of a reused block is overwritten."""
    require_backend("native", "cpu")
    from mlkd_fast import reference

    ops = torch.ops.mlkd_fast
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 300, 2000, generator=g).unbind(0)  # 2.3 MiB per gradient
    first = ops.kd_kl(s, t, None, 2.0, True, False)[1]
    second = ops.kd_kl(s * 2, t, None, 2.0, True, False)[1]
    assert first.data_ptr() != second.data_ptr()
    freed = first.data_ptr()
    first.fill_(float("nan"))  # stale content a reuse must not leak
    del first
    mask = torch.arange(300) % 3 != 0
    rows, reused, _ = ops.kd_kl(s, t, mask.float(), 2.0, True, False)
    assert reused.data_ptr() == freed
    s64 = s.double().requires_grad_()
    expected = torch.autograd.grad(reference.kd_kl_rows(s64, t.double(), 2.0, mask.double()).sum(), s64)[0]
    torch.testing.assert_close(reused.double(), expected, rtol=1e-5, atol=1e-7)
    scaled = ops.scale_rows(second, torch.full((300,), 0.5))
    torch.testing.assert_close(scaled, second * 0.5)
    assert scaled.data_ptr() not in (second.data_ptr(), reused.data_ptr())


@pytest.mark.parametrize("mode", ["square", "keep_diagonal", "rectangular", "shard"])
def test_correlation_spans_several_tiles(mode):
    """The C++ CPU correlation walks 1024 x 1024 tiles (4096 on CUDA): rows and columns of several
    tiles, the last ones partial, so the running statistics cross tiles, the diagonal lies in tiles
    off the first, and the reused tile buffers take every tile size. Against the fp64 reference."""
    from mlkd_fast import functional as MF
    require_backend("native", "cpu")
    m, n = {"rectangular": (2100, 1100), "shard": (1100, 2300)}.get(mode, (1500, 1500))
    a_s, a_t = torch.randn(m, 12) * 2, torch.randn(m, 9)
    b_s, b_t = (None, None)
    if mode == "rectangular":
        b_s, b_t = torch.randn(n, 12), torch.randn(n, 9) * 3
    elif mode == "shard":  # the rows first among the columns: (i, i) left out, in tiles off the first
        b_s, b_t = torch.cat([a_s, torch.randn(n - m, 12)]), torch.cat([a_t, torch.randn(n - m, 9) * 3])
    grad_out = torch.rand(m) + 0.5
    results = []
    for backend, dtype in (("native", torch.float32), ("torch", torch.float64)):
        leaves = [x.to(dtype).requires_grad_() for x in (a_s, b_s) if x is not None]
        cols = (None, None) if b_s is None else (leaves[1], b_t.to(dtype))
        rows = MF.correlation_kl(leaves[0], a_t.to(dtype), *cols, tau=0.3, reduction="none",
                                 keep_diagonal=mode == "keep_diagonal", cols_start_with_rows=mode == "shard",
                                 backend=backend)
        results.append((rows, torch.autograd.grad(rows, leaves, grad_out.to(dtype))))
    (rows, grads), (ref_rows, ref_grads) = results
    torch.testing.assert_close(rows.double(), ref_rows, rtol=2e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):  # error relative to the largest entry (fp32 sums of ~1500 terms)
        assert rel_err(g, r) <= 1e-5, f"gradient error {rel_err(g, r):.2e}"


def test_native_op_takes_mixed_dtypes_itself(device):
    """The compiled kd_kl reads student and teacher each in its own dtype (no promotion around it)."""
    s = torch.randn(4, 50, device=device, dtype=BF16)
    t = torch.randn(4, 50, device=device, dtype=F64)
    rows, g_s, g_t = torch.ops.mlkd_fast.kd_kl(s, t, None, 2.0, True, True)
    assert rows.dtype == F64 and g_s.dtype == BF16 and g_t.dtype == F64
    ref = reference.kd_kl_rows(s.double().cpu(), t.cpu(), 2.0)
    assert rel_err(rows, ref) <= 1e-12

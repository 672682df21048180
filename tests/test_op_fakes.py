"""The fakes (meta implementations) of the fused ops: shapes and dtypes, and their agreement with the real kernels."""
import pytest
import torch

from helpers import BF16, F16, F32, F64, FUSED_NAMESPACE as FUSED, require_backend
from mlkd_fast import _native, backends


def _fused_namespaces():
    out = []
    for name, namespace in FUSED.items():
        if name == "native" and not _native.LOADED:
            continue
        if name == "triton" and backends._triton is None:
            continue
        out.append(namespace)
    return out


@pytest.fixture(params=list(FUSED.values()))
def namespace(request):
    if request.param not in _fused_namespaces():
        pytest.skip(f"{request.param} ops are not defined here")
    return getattr(torch.ops, request.param)


@pytest.mark.parametrize("s_dtype, t_dtype, rows_dtype", [
    (F32, F32, F32), (BF16, F32, F32), (F16, BF16, F32), (F64, F64, F64), (F16, F64, F64), (F64, BF16, F64)])
@pytest.mark.parametrize("student_grad, teacher_grad", [(True, False), (True, True), (False, False)])
def test_kd_kl_fake_shapes_and_dtypes(namespace, s_dtype, t_dtype, rows_dtype, student_grad, teacher_grad):
    s = torch.empty(7, 33, dtype=s_dtype, device="meta")
    t = torch.empty(7, 33, dtype=t_dtype, device="meta")
    w = torch.empty(7, dtype=rows_dtype, device="meta")
    rows, grad_s, grad_t = namespace.kd_kl(s, t, w, 2.0, student_grad, teacher_grad)
    assert rows.shape == (7,) and rows.dtype == rows_dtype and rows.device.type == "meta"
    assert grad_s.dtype == s_dtype and grad_s.shape == ((7, 33) if student_grad else (0,))
    assert grad_t.dtype == t_dtype and grad_t.shape == ((7, 33) if teacher_grad else (0,))


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
def test_scale_rows_fakes(namespace, dtype):
    x = torch.empty(5, 9, dtype=dtype, device="meta")
    g = torch.empty(5, dtype=F64 if dtype == F64 else F32, device="meta")
    out = namespace.scale_rows(x, g)
    assert out.shape == x.shape and out.dtype == dtype
    assert namespace.scale_rows_(x, g) is None


@pytest.mark.parametrize("dtypes, math, square", [
    ((F32, F32), F32, True), ((BF16, F16), F32, True), ((F64, F32), F64, True), ((F16, F64), F64, True),
    ((F32, F32, F32, F32), F32, False), ((BF16, F16, BF16, F16), F32, False),
    ((F64, F32, F64, F32), F64, False), ((F32, F32, F32, F64), F64, False)])
def test_correlation_fakes(namespace, dtypes, math, square):
    a_s, a_t = (torch.empty(6, d, dtype=x, device="meta") for d, x in ((8, dtypes[0]), (5, dtypes[1])))
    b_s, b_t = (None, None) if square else (torch.empty(4, d, dtype=x, device="meta")
                                            for d, x in ((8, dtypes[2]), (5, dtypes[3])))
    outs = namespace.correlation_fwd(a_s, a_t, b_s, b_t, 0.5, square)
    assert all(o.shape == (6,) and o.dtype == math for o in outs)
    lse = torch.empty(6, dtype=math, device="meta")
    d_a, d_b = namespace.correlation_bwd(lse, a_s, a_t, b_s, b_t, lse, lse, 0.5, square)
    assert d_a.shape == a_s.shape and d_a.dtype == a_s.dtype
    assert d_b.shape == ((0,) if square else b_s.shape) and d_b.dtype == (a_s.dtype if square else b_s.dtype)


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_fakes_agree_with_the_kernels(namespace, dtype):
    """The real ops on CPU give what the fakes promise (shapes and dtypes)."""
    backend = next(n for n, ns in FUSED.items() if getattr(torch.ops, ns) is namespace)
    require_backend(backend, "cpu")
    s, t = torch.randn(4, 20, dtype=dtype), torch.randn(4, 20, dtype=F32)
    real = namespace.kd_kl(s, t, None, 2.0, True, True)
    fake = namespace.kd_kl(s.to("meta"), t.to("meta"), None, 2.0, True, True)
    assert [(x.shape, x.dtype) for x in real] == [(x.shape, x.dtype) for x in fake]
    a_s, a_t = torch.randn(6, 8, dtype=dtype), torch.randn(6, 5)
    real = namespace.correlation_fwd(a_s, a_t, None, None, 0.5, True)
    fake = namespace.correlation_fwd(a_s.to("meta"), a_t.to("meta"), None, None, 0.5, True)
    assert [(x.shape, x.dtype) for x in real] == [(x.shape, x.dtype) for x in fake]

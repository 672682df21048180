"""Triton-specific paths: the split-row path, opcheck of every custom op, torch.compile tracing."""
import pytest
import torch

from conftest import require_backend
from mlkd_fast import reference

DEVICES = ["cpu", "cuda"]


@pytest.fixture(params=DEVICES)
def device(request):
    require_backend("triton", request.param)
    return torch.device(request.param)


@pytest.mark.parametrize("splits, block", [(1, 64), (3, 64), (4, 128), (2, None)])
def test_split_row_path_matches_reference(device, splits, block):
    from mlkd_fast.kernels import kd_kl
    s, t = torch.randn(5, 1000, device=device), torch.randn(5, 1000, device=device)
    t[1, :600] = float("-inf")
    rows, gs, gt = kd_kl._launch_kd_kl(s, t, None, 2.0, True, True, fused_block=block, splits=splits)
    s64, t64 = s.double().cpu().requires_grad_(), t.double().cpu().requires_grad_()
    ref = reference.kd_kl_rows(s64, t64, 2.0)
    rs, rt = torch.autograd.grad(ref.sum(), (s64, t64))
    torch.testing.assert_close(rows.cpu().double(), ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gs.cpu().double(), rs, rtol=0, atol=1e-6)
    torch.testing.assert_close(gt.cpu().double(), rt, rtol=0, atol=1e-6)


def test_opcheck_kd_kl(device):
    from mlkd_fast.kernels import kd_kl
    s = torch.randn(6, 70, device=device, requires_grad=True)
    t = torch.randn(6, 70, device=device, requires_grad=True)
    weight = torch.tensor([0.5, 0.0, 1.0, 2.0, 1.0, 0.0], device=device)
    for args in [(s, t, None, 2.0, True, False), (s, t, weight, 3.0, True, True), (s.detach(), t.detach(), None, 1.0, False, False)]:
        torch.library.opcheck(kd_kl.kd_kl_op, args)
    torch.library.opcheck(kd_kl.scale_rows_op, (torch.randn(6, 70, device=device), torch.rand(6, device=device)))
    torch.library.opcheck(kd_kl.scale_rows_inplace_op, (torch.randn(6, 70, device=device), weight))


def test_opcheck_correlation(device):
    from mlkd_fast.kernels import correlation
    a_s = torch.randn(20, 16, device=device, requires_grad=True)
    a_t = torch.randn(20, 24, device=device)
    b_s = torch.randn(7, 16, device=device, requires_grad=True)
    b_t = torch.randn(7, 24, device=device)
    torch.library.opcheck(correlation.correlation_fwd_op, (a_s, a_t, None, None, 0.5, True))
    torch.library.opcheck(correlation.correlation_fwd_op, (a_s, a_t, b_s, b_t, 0.5, False))
    _, lse_s, lse_t = correlation.correlation_fwd_op(a_s, a_t, b_s, b_t, 0.5, False)
    torch.library.opcheck(correlation.correlation_bwd_op,
                          (torch.rand(20, device=device), a_s.detach(), a_t, b_s.detach(), b_t, lse_s.detach(), lse_t.detach(), 0.5, False))


def test_compile_fullgraph_traces_mlkd_loss(device):
    import mlkd_fast
    loss_fn = mlkd_fast.MLKDLoss(backend="triton")
    s = torch.randn(16, 10, device=device, requires_grad=True)
    t = torch.randn(16, 10, device=device)
    fs = torch.randn(16, 32, device=device, requires_grad=True)
    ft = torch.randn(16, 24, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    # aot_eager checks that the graph (forward and backward) traces whole, without Inductor codegen.
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    out = compiled(s, t, fs, ft, y)
    out.backward()
    ref = mlkd_fast.MLKDLoss(backend="torch")(s, t, fs, ft, y)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert s.grad is not None and fs.grad is not None

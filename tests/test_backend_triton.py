"""What only the Triton backend has: the KL launcher's row paths and their plan, the correlation's
tiled path and its plan. The op tests themselves (every backend) are tests/test_op_*.py."""
import pytest
import torch

from helpers import DEVICES, rel_err, require_backend
from mlkd_fast import reference


@pytest.fixture(params=DEVICES)
def device(request):
    require_backend("triton", request.param)
    return torch.device(request.param)


@pytest.mark.parametrize("path, splits, block, programs", [
    ("split", 1, 64, None), ("split", 3, 64, None), ("split", 4, 128, None), ("split", 2, None, None),
    ("looped", None, 64, 2), ("looped", None, 128, 3), ("looped", None, None, None), ("fused", None, 1024, None)])
def test_row_paths_match_reference(device, path, splits, block, programs):
    """Every path of the KL launcher on one input (-inf runs, a masked row, a weight of 0.5, teacher
    gradient): the looped path with fewer programs than rows (each walks several), and chunk edges
    inside and across the -inf run."""
    from mlkd_fast.kernels import kd_kl
    s, t = torch.randn(7, 1000, device=device) * 3, torch.randn(7, 1000, device=device) * 3
    t[1, :600] = float("-inf")
    t[3, 100:700:3] = float("-inf")
    weight = torch.tensor([1.0, 0.5, 1.5, 2.0, 1.0, 0.0, 0.7], device=device)
    rows, gs, gt = kd_kl._launch_kd_kl(s, t, weight, 2.0, True, True, path=path, block=block, splits=splits,
                                       programs=programs)
    s64, t64 = s.double().cpu().requires_grad_(), t.double().cpu().requires_grad_()
    ref = reference.kd_kl_rows(s64, t64, 2.0) * weight.double().cpu()
    rs, rt = torch.autograd.grad(ref.sum(), (s64, t64))
    torch.testing.assert_close(rows.cpu().double(), ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gs.cpu().double(), rs, rtol=0, atol=1e-6)
    torch.testing.assert_close(gt.cpu().double(), rt, rtol=0, atol=1e-6)


def test_row_plan():
    """Which path the launcher picks (planned as on an H100, 132 SMs, for non-CUDA tensors)."""
    from mlkd_fast.kernels import kd_kl
    cpu = torch.device("cpu")
    assert kd_kl._plan(1024, 1000, cpu) == "fused"
    assert kd_kl._plan(4, 4096, cpu) == "fused"
    assert kd_kl._plan(256, kd_kl.MAX_FUSED_BLOCK, cpu) == "fused"
    assert kd_kl._plan(256, kd_kl.MAX_FUSED_BLOCK + 1, cpu) == "looped"
    assert kd_kl._plan(8192, 32000, cpu) == "looped"
    assert kd_kl._plan(4, 8192, cpu) == "split"
    assert kd_kl._plan(4, 262144, cpu) == "split"
    # bf16 rows of 32000: two programs per SM keep 264 rows (34 MB) in L2; fp32 rows of 131072: one per SM
    assert kd_kl._looped_programs(8192, 32000 * 4, cpu) == 264
    assert kd_kl._looped_programs(8192, 131072 * 8, cpu) == 132
    assert kd_kl._looped_programs(100, 131072 * 8, cpu) == 100


TILED_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["square", "keep_diagonal", "rectangular", "shard"])
def test_correlation_tiled_path_matches_reference(device, monkeypatch, mode, dtype):
    """The tiled path (features too wide for the fused kernels) over several column tiles, forward and
    backward, against the fp64 reference: fp16/bf16 operands multiply in their own dtype (tensor cores
    on CUDA, widened exactly on CPU) with fp32 accumulation, as in the fused kernels."""
    from mlkd_fast.kernels import correlation
    monkeypatch.setattr(correlation, "TILED_ELEMENTS", 30 * 7)  # 7 columns per tile of 30 rows
    # blocks smaller than a tile: partial row blocks, two column steps per tile, the last one partial
    monkeypatch.setattr(correlation, "TILED_STATS_BLOCK", (8, 4))
    monkeypatch.setattr(correlation, "TILED_GRAD_BLOCK", (16, 4))
    a_s, a_t = torch.randn(30, 20) * 3, torch.randn(30, 12)
    b_s, b_t = (None, None)
    if mode == "rectangular":
        b_s, b_t = torch.randn(17, 20), torch.randn(17, 12) * 5
    elif mode == "shard":  # the 30 rows first among 45 columns
        b_s, b_t = torch.cat([a_s, torch.randn(15, 20)]), torch.cat([a_t, torch.randn(15, 12) * 5])
    a_s, a_t, b_s, b_t = (None if x is None else x.to(dtype) for x in (a_s, a_t, b_s, b_t))
    exclude = mode in ("square", "shard")
    on = lambda x: None if x is None else x.to(device)  # noqa: E731
    loss, lse_s, lse_t = correlation._launch_fwd(on(a_s), on(a_t), on(b_s), on(b_t), 0.5, exclude, tiled=True)
    g = torch.rand(30)
    d_a, d_b = correlation._launch_bwd(on(g), on(a_s), on(a_t), on(b_s), on(b_t), lse_s, lse_t, 0.5, exclude,
                                       tiled=True)
    leaves = [a_s.double().requires_grad_()] + ([] if b_s is None else [b_s.double().requires_grad_()])
    ref = reference.correlation_kl_rows(leaves[0], a_t.double(), leaves[1] if b_s is not None else None,
                                        None if b_t is None else b_t.double(), 0.5, exclude_diagonal=exclude)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), leaves)
    tol = TILED_TOL[dtype]
    assert loss.dtype == torch.float32 and d_a.dtype == dtype
    assert rel_err(loss, ref) <= tol, f"loss error {rel_err(loss, ref):.2e}"
    assert rel_err(d_a, ref_grads[0]) <= 4 * tol, f"row gradient error {rel_err(d_a, ref_grads[0]):.2e}"
    if b_s is not None:
        assert d_b.dtype == dtype
        assert rel_err(d_b, ref_grads[1]) <= 4 * tol, f"column gradient error {rel_err(d_b, ref_grads[1]):.2e}"


def test_correlation_tiled_fp16_gradients_of_a_large_batch_do_not_underflow(device, monkeypatch):
    """The tiled path's fp16 matmul operands are scaled like the fused kernels' (operand_scale): at
    batchmean over 512 rows the gradient comes within fp16 rounding of the fp64 one."""
    from mlkd_fast.kernels import correlation
    monkeypatch.setattr(correlation, "TILED_ELEMENTS", 512 * 100)
    a_s, a_t = torch.randn(512, 64), torch.randn(512, 64)
    g = torch.full((512,), 1.0 / 512)
    args = (a_s.half().to(device), a_t.half().to(device), None, None)
    _, lse_s, lse_t = correlation._launch_fwd(*args, 0.5, True, tiled=True)
    d_a, _ = correlation._launch_bwd(g.to(device), *args, lse_s, lse_t, 0.5, True, tiled=True)
    leaf = a_s.double().requires_grad_()
    (ref,) = torch.autograd.grad(reference.correlation_kl_rows(leaf, a_t.double(), tau=0.5).mean(), leaf)
    rounding = rel_err(ref.half(), ref)
    assert rel_err(d_a, ref) <= 1.5 * rounding, f"{rel_err(d_a, ref):.2e} vs fp16 rounding {rounding:.2e}"


def test_correlation_plan():
    """Fused kernels up to the widths that fit an SM (tools/triton_build.py), tiled beyond."""
    from mlkd_fast.kernels import correlation
    assert correlation._config(128, 128, 2)["BLOCK_M"] == 64
    assert correlation._config(512, 37, 2)["BLOCK_M"] == 32
    assert correlation._config(513, 64, 2) is None
    assert correlation._config(64, 64, 4)["BLOCK_M"] == 32 and correlation._config(128, 100, 4)["BLOCK_M"] == 16
    assert correlation._config(64, 129, 4) is None

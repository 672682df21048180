"""The Triton row kernel of linear_kd (mlkd_fast/kernels/linear_kd.py, issue #36) against the torch row function
:func:`mlkd_fast.divergences.token_rows` (itself checked against an unchunked fp64 formula and by
gradcheck in tests/test_linear_kd.py): every divergence, softcaps, CE, temperature, vocab < V_s, -inf
teacher logits, rows with zero weights, V not a multiple of the tile, one row; the gradient written
over the student's logits; and linear_kd_loss(backend="triton") end to end.

On CPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
mlkd_fast is imported); the shapes are tiny and the tile is lowered to 64 columns so that rows span
several tiles with a partial last one. The CUDA variants (the GPU pass) run the compiled kernel."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import DEVICES, require_backend
from mlkd_fast import divergences

TOL = dict(rtol=1e-5, atol=1e-5)
# (divergence as resolved, coef): jsd at beta 0 / 1 arrives as forward / reverse KL
CASES = [("forward_kl", 0.0), ("reverse_kl", 0.0), ("jsd", 0.3), ("skew_forward_kl", 0.2), ("skew_reverse_kl", 0.1)]


@pytest.fixture(params=DEVICES)
def device(request):
    require_backend("triton", request.param)
    return torch.device(request.param)


@pytest.fixture
def kernel(monkeypatch):
    from mlkd_fast.kernels import linear_kd
    monkeypatch.setattr(linear_kd, "BLOCK_V", 64)  # 300 columns: 5 tiles, the last one partial
    return linear_kd


def _args(z_t, labels, kd_w, ce_w, divergence, coef, temperature=1.0, s_cap=0.0, t_cap=0.0, vocab=None,
          want_grad=True, v_s=None):
    return dict(z_t=z_t, topk_indices=None, topk_logprobs=None, labels=labels, kd_weight=kd_w, ce_weight=ce_w,
                divergence=divergence, coef=coef, temperature=temperature, student_softcap=s_cap,
                teacher_softcap=t_cap, vocab=vocab if vocab is not None else v_s, topk_tail=True,
                want_grad=want_grad)


def _compare(kernel, z_s, args, check_in_place=True):
    """The kernel's (kd, ce, grad) against the torch function's on the same chunk; the kernel writes
    the gradient over its z_s (a copy here), the torch function leaves its input alone."""
    ref = divergences.token_rows(z_s.clone(), **args)
    mine = z_s.clone()
    kd, ce, grad = kernel.token_rows(mine, **args)
    torch.testing.assert_close(kd, ref[0], **TOL)
    torch.testing.assert_close(ce, ref[1], **TOL)
    if not args["want_grad"]:
        assert grad is None and ref[2] is None
        torch.testing.assert_close(mine, z_s, rtol=0, atol=0)  # no gradient: the logits untouched
        return
    torch.testing.assert_close(grad, ref[2], **TOL)
    if check_in_place:
        assert grad.data_ptr() == mine.data_ptr(), "the gradient must be written over z_s"


@pytest.mark.parametrize("divergence, coef", CASES, ids=[c[0] for c in CASES])
def test_rows_plain(device, kernel, divergence, coef):
    """Dense teacher, no softcap, no labels, T = 1, vocab = V_s, 300 columns (not a multiple of 64)."""
    z_s = torch.randn(3, 300, device=device) * 3
    z_t = torch.randn(3, 300, device=device) * 3
    w = torch.tensor([1.0, 0.5, 2.0], device=device)
    _compare(kernel, z_s, _args(z_t, None, w, torch.zeros_like(w), divergence, coef, v_s=300))


@pytest.mark.parametrize("divergence, coef", CASES, ids=[c[0] for c in CASES])
def test_rows_everything_on(device, kernel, divergence, coef):
    """Softcaps on both sides (logits past the cap), T = 2, CE with labels (the last id, an ignored
    one), vocab 260 < V_s = 300 < V_t = 280 + ..., -inf teacher logits (a run across a tile edge, and
    scattered), a row with both weights 0 (its gradient 0), kd weight 0 with CE on, CE weight 0 with
    kd on."""
    z_s = torch.randn(5, 300, device=device) * 6
    z_t = torch.randn(5, 280, device=device) * 6
    if divergence != "reverse_kl":  # KL(q || p) is +inf where p = 0 < q (checked separately)
        z_t[1, 40:140] = -math.inf
        z_t[3, ::7] = -math.inf
    labels = torch.tensor([3, -1, 299, 7, 259], device=device)
    kd_w = torch.tensor([1.0, 0.5, 0.0, 0.0, 1.5], device=device)
    ce_w = torch.tensor([0.3, 0.0, 0.0, 1.0, 0.0], device=device)  # the ignored row's CE weight is 0 (as the op's)
    _compare(kernel, z_s, _args(z_t, labels, kd_w, ce_w, divergence, coef, temperature=2.0, s_cap=10.0,
                                t_cap=8.0, vocab=260, v_s=300))


@pytest.mark.parametrize("divergence, coef", [CASES[0], CASES[2]], ids=["forward_kl", "jsd"])
def test_rows_without_gradient(device, kernel, divergence, coef):
    """want_grad False: the rows only, z_s left as it was."""
    z_s, z_t = torch.randn(4, 130, device=device), torch.randn(4, 130, device=device)
    labels = torch.tensor([0, 129, -1, 5], device=device)
    w = torch.ones(4, device=device)
    _compare(kernel, z_s, _args(z_t, labels, w, w * torch.tensor([1.0, 1.0, 0.0, 1.0], device=device), divergence,
                                coef, s_cap=3.0, v_s=130, want_grad=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_teacher_logits(device, kernel, dtype):
    """bf16 / fp16 teacher logits are widened on load: the torch function's results on z_t.float()."""
    z_s, z_t = torch.randn(3, 150, device=device) * 3, (torch.randn(3, 150, device=device) * 3).to(dtype)
    z_t[0, :20] = -math.inf
    w = torch.ones(3, device=device)
    args = _args(z_t, None, w, w * 0, "jsd", 0.4, temperature=1.5, t_cap=4.0, v_s=150)
    ref = divergences.token_rows(z_s.clone(), **dict(args, z_t=z_t.float()))
    for got, want in zip(kernel.token_rows(z_s.clone(), **args), ref):
        torch.testing.assert_close(got, want, **TOL)


def test_one_row_one_tile(device, kernel):
    """rows = 1, and a vocabulary smaller than the tile (one partial tile)."""
    z_s, z_t = torch.randn(1, 37, device=device) * 2, torch.randn(1, 37, device=device) * 2
    w = torch.ones(1, device=device)
    _compare(kernel, z_s, _args(z_t, torch.tensor([36], device=device), w, w * 0.7, "skew_reverse_kl", 0.1,
                                temperature=0.5, v_s=37))


def test_ce_only_without_teacher(device, kernel):
    """No teacher (kd_weight 0 everywhere): kd rows 0, the CE and its gradient over the whole row."""
    z_s = torch.randn(3, 200, device=device) * 4
    labels = torch.tensor([199, 0, -1], device=device)
    ce_w = torch.tensor([1.0, 0.25, 0.0], device=device)
    _compare(kernel, z_s, _args(None, labels, torch.zeros(3, device=device), ce_w, "forward_kl", 0.0, s_cap=5.0,
                                v_s=200))


def test_reverse_kl_against_a_zero_teacher_probability(device, kernel):
    """KL(q || p) with p = 0 < q is +inf, as the torch function says (and its gradient is not finite)."""
    z_s, z_t = torch.randn(2, 100, device=device), torch.randn(2, 100, device=device)
    z_t[0, :50] = -math.inf
    args = _args(z_t, None, torch.ones(2, device=device), torch.zeros(2, device=device), "reverse_kl", 0.0, v_s=100)
    ref = divergences.token_rows(z_s.clone(), **args)
    kd, _, grad = kernel.token_rows(z_s.clone(), **args)
    assert math.isinf(kd[0].item()) and math.isinf(ref[0][0].item())
    torch.testing.assert_close(kd[1:], ref[0][1:], **TOL)
    torch.testing.assert_close(grad[1:], ref[2][1:], **TOL)


def test_fallbacks_are_the_torch_function(device, kernel):
    """fp64 logits and a sparse top-k teacher run the torch function (mlkd_fast/kernels/linear_kd.py docstring)."""
    z_s = torch.randn(3, 50, device=device, dtype=torch.float64)
    z_t = torch.randn(3, 50, device=device, dtype=torch.float64)
    w = torch.ones(3, device=device, dtype=torch.float64)
    args = _args(z_t, None, w, w * 0, "jsd", 0.5, v_s=50)
    for got, ref in zip(kernel.token_rows(z_s.clone(), **args), divergences.token_rows(z_s.clone(), **args)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    idx = torch.stack([torch.randperm(50, device=device)[:5] for _ in range(3)])
    lp = torch.log_softmax(torch.randn(3, 5, device=device), -1) - 0.1
    sparse = dict(_args(None, None, w.float(), w.float() * 0, "forward_kl", 0.0, v_s=50), topk_indices=idx,
                  topk_logprobs=lp)
    z32 = z_s.float()
    for got, ref in zip(kernel.token_rows(z32.clone(), **sparse), divergences.token_rows(z32.clone(), **sparse)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_linear_kd_loss_triton_matches_torch(device, kernel, divergence):
    """linear_kd_loss end to end, live teacher, chunks of 3 tokens over 7, labels with an ignored one,
    CE, softcap, T = 2, vocab='shared' (V_s 90, V_t 80): the loss, its parts and the gradients of the
    hidden states, the weight and the bias equal the torch backend's."""
    from mlkd_fast.functional import linear_kd_loss
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(7, 16, generator=g).to(device)
    ws = (torch.randn(90, 16, generator=g) / 4).to(device)
    bs = (torch.randn(90, generator=g) * 0.1).to(device)
    ht, wt = torch.randn(7, 12, generator=g).to(device), (torch.randn(80, 12, generator=g) / 2).to(device)
    labels = torch.randint(0, 90, (7,), generator=g).to(device)
    labels[2] = -100
    results = {}
    for backend in ("torch", "triton"):
        leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        loss, parts = linear_kd_loss(leaves[0], leaves[1], student_bias=leaves[2], teacher_hidden=ht,
                                     teacher_weight=wt, labels=labels, divergence=divergence, beta=0.3,
                                     temperature=2.0, ce_weight=0.5, student_softcap=5.0, vocab="shared",
                                     chunk_size=3, backend=backend, return_parts=True)
        loss.backward()
        results[backend] = (loss.detach(), parts["kd"], parts["ce"], *(x.grad for x in leaves))
    for got, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, ref, **TOL)


def test_long_rows_and_memory_on_cuda():
    """The compiled kernel at its real tile (2048) and a Llama-3 vocabulary (vocab='shared' over 128000 of
    128256 ids): equal to the torch function for every divergence, and it allocates O(rows) (the two
    output rows), never (rows x V)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the interpreter runs the CPU twins at small shapes)")
    require_backend("triton", "cuda")
    from mlkd_fast.kernels import linear_kd as kernel
    rows, v_s, v = 64, 128256, 128000
    z_s = torch.randn(rows, v_s, device="cuda") * 4
    z_t = torch.randn(rows, v_s, device="cuda") * 4
    masked = z_t.clone()
    masked[::3, 1000:5000] = -math.inf
    labels = torch.randint(0, v_s, (rows,), device="cuda")
    labels[7] = -1
    kd_w = torch.rand(rows, device="cuda")
    kd_w[5] = 0.0
    ce_w = torch.where(labels >= 0, kd_w * 0.5, 0.0)
    for divergence, coef in CASES:
        teacher = z_t if divergence == "reverse_kl" else masked  # KL(q || p) is +inf where p = 0 < q
        args = _args(teacher, labels, kd_w, ce_w, divergence, coef, temperature=1.5, s_cap=30.0, vocab=v, v_s=v_s)
        _compare(kernel, z_s, args)
        # and against fp64: most gradient entries are ~1/V, below any atol, so row by row relative to the
        # row's largest entry
        kd, ce, grad = kernel.token_rows(z_s.clone(), **args)
        ref = divergences.token_rows(z_s.double(), **dict(args, z_t=teacher.double(), kd_weight=kd_w.double(),
                                                          ce_weight=ce_w.double()))
        torch.testing.assert_close(kd.double(), ref[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ce.double(), ref[1], rtol=1e-5, atol=1e-5)
        row_err = (grad.double() - ref[2]).abs().amax(1) / ref[2].abs().amax(1).clamp_min(1e-30)
        assert row_err[kd_w != 0].max() <= 1e-4, f"{divergence}: gradient row error {row_err.max():.2e}"
        mine = z_s.clone()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        kernel.token_rows(mine, **args)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra <= 4096, f"{divergence}: {extra} bytes allocated for {rows} rows"

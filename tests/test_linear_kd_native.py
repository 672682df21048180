"""The native (C++) row function of linear_kd (op mlkd_fast_lm_native::token_rows, csrc/cpu/linear_kd_rows.cpp and
lm_sweeps.*, issue #36) against the torch row function :func:`mlkd_fast.divergences.token_rows` (itself checked
against an unchunked fp64 formula and by gradcheck in tests/test_linear_kd.py): every divergence, softcaps on
and off, CE on and off, temperature, vocab < V_s, -inf teacher logits, rows with zero weights, V not a
multiple of the SIMD width, one row, bf16/fp16 teacher logits; the gradient written over the student's
logits; the scalar and AVX2 sweeps (chosen once per process: in subprocesses); opcheck; the backend choice;
and linear_kd_loss(backend="native") end to end against backend="torch"."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from mlkd_fast import divergences, linear_kd, ops

pytestmark = pytest.mark.skipif(not linear_kd._native_rows_available(),
                                reason="the compiled library (with its linear_kd row kernel) is not built")

TOL = dict(rtol=1e-5, atol=1e-5)
# (divergence as resolved, coef): jsd at beta 0 / 1 arrives as forward / reverse KL
CASES = [("forward_kl", 0.0), ("reverse_kl", 0.0), ("jsd", 0.3), ("skew_forward_kl", 0.2), ("skew_reverse_kl", 0.1)]


def _op():
    return getattr(torch.ops, ops.LM_NAMESPACE).token_rows


def _args(z_t, labels, kd_w, ce_w, divergence, coef, temperature=1.0, s_cap=0.0, t_cap=0.0, vocab=None,
          want_grad=True, v_s=None):
    return dict(z_t=z_t, topk_indices=None, topk_logprobs=None, labels=labels, kd_weight=kd_w, ce_weight=ce_w,
                divergence=divergence, coef=coef, temperature=temperature, student_softcap=s_cap,
                teacher_softcap=t_cap, vocab=vocab if vocab is not None else v_s, topk_tail=True,
                want_grad=want_grad)


def _compare(z_s, args, ref_z_t=None):
    """The native rows' (kd, ce, grad) against the torch function's on the same chunk (the teacher widened
    to fp32 for it: ``ref_z_t``); the gradient must be written over the native call's z_s (a copy here)."""
    ref = divergences.token_rows(z_s.clone(), **dict(args, z_t=args["z_t"] if ref_z_t is None else ref_z_t))
    mine = z_s.clone()
    kd, ce, grad = linear_kd._native_rows(mine, **args)
    torch.testing.assert_close(kd, ref[0], **TOL)
    torch.testing.assert_close(ce, ref[1], **TOL)
    if not args["want_grad"]:
        assert grad is None and ref[2] is None
        torch.testing.assert_close(mine, z_s, rtol=0, atol=0)  # no gradient: the logits untouched
        return
    torch.testing.assert_close(grad, ref[2], **TOL)
    assert grad.data_ptr() == mine.data_ptr(), "the gradient must be written over z_s"


@pytest.mark.parametrize("ce_on", [False, True], ids=["no_ce", "ce"])
@pytest.mark.parametrize("softcap", [False, True], ids=["no_cap", "cap"])
@pytest.mark.parametrize("divergence, coef", CASES, ids=[c[0] for c in CASES])
def test_rows_match_torch(divergence, coef, softcap, ce_on):
    """Dense teacher; 6 rows of V_s = 1003 (not a multiple of 8 or 16) with vocab 990 < V_s and V_t = 995;
    -inf teacher logits (a run and scattered; not for the reverse KL, where they make +inf); a row with
    both weights 0 (its gradient 0), kd weight 0 with CE on, CE weight 0 with kd on, an ignored label, the
    last id as a label; T = 1.7; softcaps past the logits' range when on."""
    g = torch.Generator().manual_seed(hash((divergence, softcap, ce_on)) % 1000)
    z_s = torch.randn(6, 1003, generator=g) * 6
    z_t = torch.randn(6, 995, generator=g) * 6
    if divergence != "reverse_kl":
        z_t[1, 40:300] = -math.inf
        z_t[3, ::7] = -math.inf
    labels = torch.tensor([3, -1, 1002, 7, 989, 500]) if ce_on else None
    kd_w = torch.tensor([1.0, 0.5, 0.0, 0.0, 1.5, 0.25])
    ce_w = torch.tensor([0.3, 0.0, 0.0, 1.0, 0.0, 2.0]) if ce_on else torch.zeros(6)
    _compare(z_s, _args(z_t, labels, kd_w, ce_w, divergence, coef, temperature=1.7, s_cap=10.0 if softcap else 0.0,
                        t_cap=8.0 if softcap else 0.0, vocab=990, v_s=1003))


@pytest.mark.parametrize("divergence, coef", CASES, ids=[c[0] for c in CASES])
def test_rows_t1_full_vocab(divergence, coef):
    """T = 1 and vocab = V_s (the CE shares the divergence's softmax), 2 x 4100 (several 1024-column
    blocks and a partial vector)."""
    g = torch.Generator().manual_seed(3)
    z_s, z_t = torch.randn(2, 4100, generator=g) * 3, torch.randn(2, 4100, generator=g) * 3
    labels = torch.tensor([4099, 17])
    w = torch.tensor([0.5, 1.0])
    _compare(z_s, _args(z_t, labels, w, w * 0.3, divergence, coef, v_s=4100))


@pytest.mark.parametrize("divergence, coef", [CASES[0], CASES[2]], ids=["forward_kl", "jsd"])
def test_rows_without_gradient(divergence, coef):
    """want_grad False: the rows only, z_s left as it was (softcap on: its values go to scratch)."""
    z_s, z_t = torch.randn(4, 130), torch.randn(4, 130)
    labels = torch.tensor([0, 129, -1, 5])
    w = torch.ones(4)
    _compare(z_s, _args(z_t, labels, w, w * torch.tensor([1.0, 1.0, 0.0, 1.0]), divergence, coef, s_cap=3.0,
                        v_s=130, want_grad=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_teacher_logits(dtype):
    """bf16 / fp16 teacher logits are widened row by row: the torch function's results on z_t.float()."""
    z_s, z_t = torch.randn(3, 150) * 3, (torch.randn(3, 150) * 3).to(dtype)
    z_t[0, :20] = -math.inf
    w = torch.ones(3)
    _compare(z_s, _args(z_t, None, w, w * 0, "jsd", 0.4, temperature=1.5, t_cap=4.0, v_s=150), ref_z_t=z_t.float())


def test_one_row_short_vocab():
    """rows = 1 and a vocabulary shorter than one AVX-512 vector pair (37 columns)."""
    z_s, z_t = torch.randn(1, 37) * 2, torch.randn(1, 37) * 2
    w = torch.ones(1)
    _compare(z_s, _args(z_t, torch.tensor([36]), w, w * 0.7, "skew_reverse_kl", 0.1, temperature=0.5, v_s=37))


def test_ce_only_without_teacher():
    """No teacher (kd_weight 0 everywhere): kd rows 0, the CE and its gradient over the whole row."""
    z_s = torch.randn(3, 200) * 4
    labels = torch.tensor([199, 0, -1])
    _compare(z_s, _args(None, labels, torch.zeros(3), torch.tensor([1.0, 0.25, 0.0]), "forward_kl", 0.0, s_cap=5.0,
                        v_s=200))


def test_reverse_kl_against_a_zero_teacher_probability():
    """KL(q || p) with p = 0 < q is +inf, as the torch function says."""
    z_s, z_t = torch.randn(2, 100), torch.randn(2, 100)
    z_t[0, :50] = -math.inf
    args = _args(z_t, None, torch.ones(2), torch.zeros(2), "reverse_kl", 0.0, v_s=100)
    ref = divergences.token_rows(z_s.clone(), **args)
    kd, _, grad = linear_kd._native_rows(z_s.clone(), **args)
    assert math.isinf(kd[0].item()) and math.isinf(ref[0][0].item())
    torch.testing.assert_close(kd[1:], ref[0][1:], **TOL)
    torch.testing.assert_close(grad[1:], ref[2][1:], **TOL)


def test_fallbacks_are_the_torch_function():
    """fp64 logits and a sparse top-k teacher run the torch rows."""
    z_s, z_t = torch.randn(3, 50, dtype=torch.float64), torch.randn(3, 50, dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64)
    args = _args(z_t, None, w, w * 0, "jsd", 0.5, v_s=50)
    for got, ref in zip(linear_kd._native_rows(z_s.clone(), **args), divergences.token_rows(z_s.clone(), **args)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    idx = torch.stack([torch.randperm(50)[:5] for _ in range(3)])
    lp = torch.log_softmax(torch.randn(3, 5), -1) - 0.1
    sparse = dict(_args(None, None, w.float(), w.float() * 0, "forward_kl", 0.0, v_s=50), topk_indices=idx,
                  topk_logprobs=lp)
    z32 = z_s.float()
    for got, ref in zip(linear_kd._native_rows(z32.clone(), **sparse), divergences.token_rows(z32.clone(), **sparse)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


_ISA_SCRIPT = r"""
import math, torch
from mlkd_fast import divergences, linear_kd
g = torch.Generator().manual_seed(0)
for div, coef in [("forward_kl", 0.0), ("reverse_kl", 0.0), ("jsd", 0.3), ("skew_forward_kl", 0.2), ("skew_reverse_kl", 0.1)]:
    for cap in (0.0, 9.0):
        z_s, z_t = torch.randn(3, 203, generator=g) * 5, torch.randn(3, 203, generator=g) * 5
        if div != "reverse_kl":
            z_t[1, 10:50] = -math.inf
        labels = torch.tensor([202, -1, 4])
        args = dict(z_t=z_t, topk_indices=None, topk_logprobs=None, labels=labels, kd_weight=torch.tensor([1.0, 0.0, 0.5]),
                    ce_weight=torch.tensor([0.5, 0.0, 1.0]), divergence=div, coef=coef, temperature=1.3,
                    student_softcap=cap, teacher_softcap=cap, vocab=200, topk_tail=True, want_grad=True)
        ref = divergences.token_rows(z_s.clone(), **args)
        got = linear_kd._native_rows(z_s.clone(), **args)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("env", ["MLKD_FAST_NO_SIMD", "MLKD_FAST_NO_AVX512"])
def test_scalar_and_avx2_sweeps(env):
    """The sweeps are chosen once per process: the scalar (MLKD_FAST_NO_SIMD=1) and AVX2
    (MLKD_FAST_NO_AVX512=1) versions in a subprocess, every divergence, softcap off and on."""
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env={**os.environ, env: "1"}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_opcheck():
    """The op's schema (z_s mutated in place), fake and dispatch agree (torch.library.opcheck)."""
    z_s, z_t = torch.randn(4, 70) * 2, torch.randn(4, 70) * 2
    labels = torch.tensor([1, -1, 69, 0])
    w = torch.tensor([1.0, 0.0, 0.5, 2.0])
    for args in [(z_s.clone(), z_t, labels, w, w * 0.5, "jsd", 0.3, 1.5, 4.0, 0.0, 64, True),
                 (z_s.clone(), z_t.bfloat16(), None, w, w * 0, "forward_kl", 0.0, 1.0, 0.0, 3.0, 70, False),
                 (z_s.clone(), None, labels, w * 0, w, "forward_kl", 0.0, 1.0, 0.0, 0.0, 70, True)]:
        torch.library.opcheck(_op(), args)


def test_op_rejects_bad_input():
    z = torch.randn(2, 10)
    w = torch.ones(2)
    with pytest.raises(RuntimeError, match="z_s must be fp32"):
        _op()(z.double(), None, None, w, w, "forward_kl", 0.0, 1.0, 0.0, 0.0, 10, True)
    with pytest.raises(RuntimeError, match="vocab must be in"):
        _op()(z, z, None, w, w, "forward_kl", 0.0, 1.0, 0.0, 0.0, 11, True)
    with pytest.raises(RuntimeError, match="labels must be in"):
        _op()(z, z, torch.tensor([10, 0]), w, w, "forward_kl", 0.0, 1.0, 0.0, 0.0, 10, True)
    with pytest.raises(RuntimeError, match="divergence must be one of"):
        _op()(z, z, None, w, w, "kl", 0.0, 1.0, 0.0, 0.0, 10, True)


def test_backend_choice(monkeypatch):
    """auto takes the native rows on CPU (MLKD_FAST_BACKEND=torch keeps the torch rows); native on another
    device type is a ValueError naming it."""
    monkeypatch.delenv("MLKD_FAST_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert linear_kd._backend_for("auto", cpu) == "native"
    assert linear_kd._backend_for("native", cpu) == "native"
    assert linear_kd._row_function("native") is linear_kd._native_rows
    monkeypatch.setenv("MLKD_FAST_BACKEND", "torch")
    assert linear_kd._backend_for("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="backend 'native' has no linear_kd kernel for meta tensors"):
        linear_kd._backend_for("native", torch.device("meta"))


@pytest.mark.parametrize("divergence, teacher", [("forward_kl", "live"), ("jsd", "live"), ("skew_reverse_kl", "bf16")])
def test_linear_kd_loss_native_matches_torch(divergence, teacher):
    """linear_kd_loss end to end: chunks of 3 tokens over 7, labels with an ignored one, CE, softcap, T = 2,
    vocab='shared' (V_s 90, V_t 80) with a live teacher, or bf16 dense teacher logits: the loss, its parts
    and the gradients of the hidden states, the weight and the bias equal the torch backend's."""
    from mlkd_fast.functional import linear_kd_loss
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(7, 16, generator=g)
    ws, bs = torch.randn(90, 16, generator=g) / 4, torch.randn(90, generator=g) * 0.1
    ht, wt = torch.randn(7, 12, generator=g), torch.randn(80, 12, generator=g) / 2
    labels = torch.randint(0, 90, (7,), generator=g)
    labels[2] = -100
    teach = dict(teacher_hidden=ht, teacher_weight=wt, vocab="shared") if teacher == "live" else \
        dict(teacher_logits=(hs @ ws.T * 1.3).bfloat16())
    results = {}
    for backend in ("torch", "native"):
        leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        loss, parts = linear_kd_loss(leaves[0], leaves[1], student_bias=leaves[2], labels=labels,
                                     divergence=divergence, beta=0.3, alpha=0.2, temperature=2.0, ce_weight=0.5,
                                     student_softcap=5.0, chunk_size=3, backend=backend, return_parts=True, **teach)
        loss.backward()
        results[backend] = (loss.detach(), parts["kd"], parts["ce"], *(x.grad for x in leaves))
    for got, ref in zip(results["native"], results["torch"]):
        torch.testing.assert_close(got, ref, **TOL)

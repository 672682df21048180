"""linear_kd_loss (SPEC §9, issue #36): values against an unchunked fp64 formula and TRL's generalised JSD,
gradients by gradcheck, low-precision gradients against fp64 from the same inputs, the memory contract
(no (tokens x V) tensor), edge cases and every bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mlkd_fast
from mlkd_fast.functional import kd_kl_div, linear_kd_loss

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


def _inputs(n=9, h=6, v=13, v_t=None, h_t=5, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    v_t = v if v_t is None else v_t
    hs = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    ws = (torch.randn(v, h, generator=g, dtype=dtype) / math.sqrt(h)).requires_grad_()
    bs = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    ht = torch.randn(n, h_t, generator=g, dtype=dtype)
    wt = torch.randn(v_t, h_t, generator=g, dtype=dtype) / math.sqrt(h_t) * 2.0
    labels = torch.randint(0, v, (n,), generator=g)
    if n > 1:
        labels[1] = -100
    return hs, ws, bs, ht, wt, labels


def _divergence(lp: torch.Tensor, lq: torch.Tensor, divergence: str, beta=0.5, alpha=0.1) -> torch.Tensor:
    """Per-row divergence from the textbook formulas (fp64, every entry materialised)."""
    p, q = lp.exp(), lq.exp()

    def kl(a, log_a, log_b):
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)

    if divergence == "forward_kl":
        return kl(p, lp, lq)
    if divergence == "reverse_kl":
        return kl(q, lq, lp)
    if divergence == "jsd":
        if beta == 0:
            return kl(p, lp, lq)
        if beta == 1:
            return kl(q, lq, lp)
        lm = (beta * p + (1 - beta) * q).log()
        return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)
    if divergence == "skew_forward_kl":
        return kl(p, lp, (alpha * p + (1 - alpha) * q).log())
    return kl(q, lq, (alpha * q + (1 - alpha) * p).log())


def _oracle(hs, ws, bs, zt, labels, divergence, temperature=1.0, ce_weight=0.0, s_cap=None, t_cap=None,
            reduction="mean", kd_weight=1.0, t2=True, vocab=None, beta=0.5, alpha=0.1):
    zs = hs @ ws.T + (0 if bs is None else bs)
    if s_cap:
        zs = s_cap * torch.tanh(zs / s_cap)
    if t_cap:
        zt = t_cap * torch.tanh(zt / t_cap)
    v = vocab or zs.shape[-1]
    lq = torch.log_softmax(zs[:, :v] / temperature, -1)
    lp = torch.log_softmax(zt[:, :v] / temperature, -1)
    d = _divergence(lp, lq, divergence, beta, alpha) * kd_weight * (temperature ** 2 if t2 else 1.0)
    counted = torch.ones(len(zs), dtype=torch.bool) if labels is None else labels != -100
    if ce_weight:
        d = d + ce_weight * F.cross_entropy(zs, labels, reduction="none", ignore_index=-100)
    d = torch.where(counted, d, torch.zeros_like(d))
    if reduction == "mean":
        return d.sum() / counted.sum().clamp(min=1)
    return d.sum() if reduction == "sum" else d


# ---------------------------------------------------------------------------------------------
# values and gradients, fp64
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_live_teacher_matches_the_formula_and_gradcheck(divergence, reduction):
    hs, ws, bs, ht, wt, labels = _inputs()
    opts = dict(divergence=divergence, temperature=2.0, ce_weight=0.3, student_softcap=4.0, teacher_softcap=3.0,
                reduction=reduction, chunk_size=4, labels=labels)

    def f(h, w, b):
        return linear_kd_loss(h, w, student_bias=b, teacher_hidden=ht, teacher_weight=wt, **opts)

    want = _oracle(hs, ws, bs, ht @ wt.T, labels, divergence, 2.0, 0.3, 4.0, 3.0, reduction)
    torch.testing.assert_close(f(hs, ws, bs), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(f, (hs, ws, bs))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dense_logits_teacher_and_gradients_equal_autograd_through_the_formula(divergence):
    hs, ws, bs, ht, wt, labels = _inputs(seed=1)
    zt = ht @ wt.T
    got = linear_kd_loss(hs, ws, student_bias=bs, teacher_logits=zt, labels=labels, divergence=divergence,
                         beta=0.3, alpha=0.2, chunk_size=3)
    got_grads = torch.autograd.grad(got, (hs, ws, bs))
    want = _oracle(hs, ws, bs, zt, labels, divergence, beta=0.3, alpha=0.2)
    want_grads = torch.autograd.grad(want, (hs, ws, bs))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss as its source defines it (reduction batchmean): our reading of
    the formula, an independent oracle (F.kl_div's argument order, the mixture by logsumexp)."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, t, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(mix, s, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_generalized_jsd_loss(beta):
    hs, ws, bs, ht, wt, labels = _inputs(seed=2)
    got = linear_kd_loss(hs, ws, student_bias=bs, teacher_hidden=ht, teacher_weight=wt, labels=labels,
                         divergence="jsd", beta=beta, temperature=1.5, scale_by_t_squared=False, chunk_size=5)
    want = _trl_generalized_jsd(hs @ ws.T + bs, ht @ wt.T, labels, beta, 1.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_forward_kl_equals_kd_kl_div_with_t_squared():
    hs, ws, bs, ht, wt, _ = _inputs(seed=3)
    got = linear_kd_loss(hs, ws, student_bias=bs, teacher_hidden=ht, teacher_weight=wt, temperature=4.0)
    want = kd_kl_div(hs @ ws.T + bs, ht @ wt.T, temperature=4.0, reduction="batchmean", backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_teacher_matches_the_bucket_formula_and_gradcheck(tail, divergence):
    hs, ws, bs, ht, wt, labels = _inputs(seed=4)
    lp_full = torch.log_softmax(ht @ wt.T, -1)
    top = lp_full.topk(4, dim=-1)
    idx, lp = top.indices, top.values

    def f(h, w, b):
        return linear_kd_loss(h, w, student_bias=b, teacher_topk=(idx, lp), labels=labels, divergence=divergence,
                              topk_tail=tail, temperature=1.0, chunk_size=4)

    lq = torch.log_softmax(hs @ ws.T + bs, -1)
    lq_k = lq.gather(1, idx)
    if tail == "bucket":
        keep = torch.ones_like(lq, dtype=torch.bool).scatter(1, idx, False)
        q_rest = torch.where(keep, lq.exp(), torch.zeros_like(lq)).sum(-1, keepdim=True)
        lq_b = torch.cat([lq_k, q_rest.log()], -1)
        lp_b = torch.cat([lp, (1 - lp.exp().sum(-1, keepdim=True)).log()], -1)
    else:
        lq_b, lp_b = torch.log_softmax(lq_k, -1), torch.log_softmax(lp, -1)
    rows = _divergence(lp_b, lq_b, divergence)
    mask = labels != -100
    torch.testing.assert_close(f(hs, ws, bs), rows[mask].sum() / mask.sum(), rtol=1e-11, atol=1e-12)
    assert torch.autograd.gradcheck(f, (hs, ws, bs))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_cache_of_the_full_distribution_equals_the_live_teacher(divergence):
    """A cache holding all V log-probabilities rebuilds the teacher exactly (issue #34's round trip)."""
    hs, ws, bs, ht, wt, labels = _inputs(seed=5)
    hs32, ws32, bs32 = (x.detach().float().requires_grad_() for x in (hs, ws, bs))
    ht32, wt32 = ht.float(), wt.float()
    lp = torch.log_softmax(ht32 @ wt32.T, -1)
    top = lp.topk(lp.shape[-1], dim=-1)
    live = linear_kd_loss(hs32, ws32, student_bias=bs32, teacher_hidden=ht32, teacher_weight=wt32, labels=labels,
                          divergence=divergence, temperature=2.0)
    grads_live = torch.autograd.grad(live, (hs32, ws32, bs32))
    cached = linear_kd_loss(hs32, ws32, student_bias=bs32, teacher_topk=(top.indices, top.values), labels=labels,
                            divergence=divergence, temperature=2.0)
    grads_cached = torch.autograd.grad(cached, (hs32, ws32, bs32))
    torch.testing.assert_close(cached, live, rtol=2e-6, atol=2e-6)
    for a, b in zip(grads_cached, grads_live):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_vocab_shared_covers_the_first_ids_and_padding_gets_nothing():
    hs, ws, bs, ht, wt, labels = _inputs(v=13, v_t=16, seed=6)
    with pytest.raises(ValueError, match="13 ids and the teacher's 16.*vocab='shared'"):
        linear_kd_loss(hs, ws, teacher_hidden=ht, teacher_weight=wt)
    got = linear_kd_loss(hs, ws, student_bias=bs, teacher_hidden=ht, teacher_weight=wt, vocab="shared",
                         divergence="jsd")
    want = _oracle(hs, ws, bs, ht @ wt.T, None, "jsd", vocab=13)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the student larger than the teacher: its padding rows get no gradient from the divergence
    hs2, ws2, _, ht2, wt2, _ = _inputs(v=16, v_t=13, seed=7, bias=False)
    loss = linear_kd_loss(hs2, ws2, teacher_hidden=ht2, teacher_weight=wt2, vocab="shared")
    (gw,) = torch.autograd.grad(loss, (ws2,))
    assert gw[13:].abs().max() == 0 and gw[:13].abs().max() > 0
    torch.testing.assert_close(loss, _oracle(hs2, ws2, None, ht2 @ wt2.T, None, "forward_kl", vocab=13))


def test_logit_scale_multiplies_the_logits():
    hs, ws, bs, ht, wt, labels = _inputs(seed=8)
    got = linear_kd_loss(hs, ws, student_bias=bs, teacher_hidden=ht, teacher_weight=wt, student_logit_scale=0.5,
                         teacher_logit_scale=2.0, labels=labels, ce_weight=1.0)
    want = _oracle(hs * 0.5, ws, bs * 0.5, 2.0 * (ht @ wt.T), labels, "forward_kl", ce_weight=1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda h: linear_kd_loss(h, ws, teacher_hidden=ht, teacher_weight=wt, student_logit_scale=0.5), (hs,))


def test_ce_only_without_a_teacher_equals_cross_entropy():
    hs, ws, bs, _, _, labels = _inputs(seed=9)
    got = linear_kd_loss(hs, ws, student_bias=bs, labels=labels, kd_weight=0.0, ce_weight=1.0)
    torch.testing.assert_close(got, F.cross_entropy(hs @ ws.T + bs, labels, ignore_index=-100))


def test_module_holds_the_parts_and_equals_the_function():
    hs, ws, bs, ht, wt, labels = _inputs(seed=10)
    loss_fn = mlkd_fast.LinearKDLoss(divergence="reverse_kl", temperature=2.0, ce_weight=0.5, kd_weight=2.0)
    got = loss_fn(hs, ws, bs, teacher_hidden=ht, teacher_weight=wt, labels=labels)
    want = linear_kd_loss(hs, ws, student_bias=bs, teacher_hidden=ht, teacher_weight=wt, labels=labels,
                          divergence="reverse_kl", temperature=2.0, ce_weight=0.5, kd_weight=2.0)
    torch.testing.assert_close(got, want)
    last = loss_fn.last
    assert set(last) == {"kd", "ce", "total", "tokens"} and not any(v.requires_grad for v in last.values())
    assert last["tokens"].item() == (labels != -100).sum().item()
    torch.testing.assert_close(last["kd"] + last["ce"], last["total"])
    kd_only = _oracle(hs, ws, bs, ht @ wt.T, labels, "reverse_kl", 2.0, kd_weight=2.0)
    torch.testing.assert_close(last["kd"], kd_only.detach())


# ---------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradient_within_its_rounding_of_the_fp64_result(dtype):
    """Logits accumulated in fp32 from the low-precision inputs: the gradient is the fp64 gradient of the
    same (rounded) inputs up to the dtype's rounding, where rounding the logits first is far off."""
    g = torch.Generator().manual_seed(11)
    n, h, v = 64, 64, 1000
    # logits of standard deviation ~10, as language models have
    hs = (torch.randn(n, h, generator=g) * 8).to(dtype).requires_grad_()
    ws = (torch.randn(v, h, generator=g) / 4).to(dtype).requires_grad_()
    ht = (torch.randn(n, h, generator=g) * 8).to(dtype)
    wt = (torch.randn(v, h, generator=g) / 4).to(dtype)
    loss = linear_kd_loss(hs, ws, teacher_hidden=ht, teacher_weight=wt, divergence="jsd", chunk_size=16)
    assert loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss, (hs, ws))
    assert gh.dtype == dtype and gw.dtype == dtype
    h64, w64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    zt64 = ht.double() @ wt.double().T
    ref = _oracle(h64, w64, None, zt64, None, "jsd")
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    eps = torch.finfo(dtype).eps
    ours = (gh.double() - rh).norm() / rh.norm()
    for got, want in ((gh, rh), (gw, rw)):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < eps, f"relative gradient error {rel:.2e} above the dtype's eps ({eps:.2e})"
    # the same loss on logits rounded to the dtype before the softmax (the bug users hit) is far off
    z_rounded = (hs.detach() @ ws.detach().T).double().requires_grad_()
    lp = torch.log_softmax(zt64, -1)
    (gz,) = torch.autograd.grad(_divergence(lp, torch.log_softmax(z_rounded, -1), "jsd").mean(), (z_rounded,))
    theirs = (gz @ w64.detach() - rh).norm() / rh.norm()
    assert theirs > 5 * ours, f"rounded-first {theirs:.2e} vs fused {ours:.2e}"


def test_large_logits_do_not_overflow():
    hs, ws, _, ht, wt, labels = _inputs(seed=12, dtype=torch.float32, bias=False)
    loss = linear_kd_loss(hs * 3e3, ws, teacher_hidden=ht * 3e3, teacher_weight=wt, labels=labels, ce_weight=1.0,
                          divergence="jsd")
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_forward_kl"])
def test_minus_inf_teacher_logits_give_no_nan_and_stay_masked_under_softcap(divergence):
    hs, ws, bs, ht, wt, labels = _inputs(seed=13)
    zt = (ht @ wt.T).clone()
    zt[:, ::3] = -math.inf
    loss = linear_kd_loss(hs, ws, student_bias=bs, teacher_logits=zt, labels=labels, divergence=divergence)
    grads = torch.autograd.grad(loss, (hs, ws, bs))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, _oracle(hs, ws, bs, zt, labels, divergence), rtol=1e-12, atol=1e-12)
    # a softcap maps logits into (-c, c) but a masked id keeps probability 0
    capped = linear_kd_loss(hs, ws, student_bias=bs, teacher_logits=zt, labels=labels, divergence=divergence,
                            teacher_softcap=5.0)
    zt_capped = torch.where(zt == -math.inf, zt, 5.0 * torch.tanh(zt / 5.0))
    torch.testing.assert_close(capped, _oracle(hs, ws, bs, zt_capped, labels, divergence), rtol=1e-12, atol=1e-12)


def test_all_tokens_ignored_gives_zero_and_zero_gradients():
    hs, ws, bs, ht, wt, labels = _inputs(seed=14)
    labels = torch.full_like(labels, -100)
    loss = linear_kd_loss(hs, ws, student_bias=bs, teacher_hidden=ht, teacher_weight=wt, labels=labels,
                          ce_weight=1.0)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (hs, ws, bs)):
        assert g.abs().max() == 0


def test_one_token_odd_vocab_and_non_contiguous_hidden():
    hs, ws, bs, ht, wt, _ = _inputs(n=1, v=37, seed=15)
    assert torch.autograd.gradcheck(lambda h, w: linear_kd_loss(h, w, teacher_hidden=ht, teacher_weight=wt,
                                                                divergence="jsd"), (hs, ws))
    g = torch.Generator().manual_seed(16)
    base = torch.randn(4, 6, 12, generator=g, dtype=torch.float64)
    h3 = base[:, :, ::2].requires_grad_()  # (4, 6, 6), last stride 2
    w = torch.randn(11, 6, generator=g, dtype=torch.float64)
    t3 = torch.randn(4, 6, 11, generator=g, dtype=torch.float64).transpose(0, 1)  # (6, 4, 11) non-contiguous
    h3t = h3.transpose(0, 1)
    none = linear_kd_loss(h3t, w, teacher_logits=t3, reduction="none")
    assert none.shape == (6, 4)
    want = _oracle(h3t.reshape(-1, 6), w, None, t3.reshape(-1, 11), None, "forward_kl", reduction="none")
    torch.testing.assert_close(none.reshape(-1), want)
    assert torch.autograd.gradcheck(lambda h: linear_kd_loss(h.transpose(0, 1), w, teacher_logits=t3,
                                                             reduction="none").sum(), (h3,))


def test_chunk_size_does_not_change_the_result():
    hs, ws, bs, ht, wt, labels = _inputs(n=23, seed=17)
    results = [linear_kd_loss(hs, ws, student_bias=bs, teacher_hidden=ht, teacher_weight=wt, labels=labels,
                              divergence="jsd", ce_weight=0.5, chunk_size=c) for c in (1, 5, 23, 64, None)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-13, atol=1e-14)


def test_only_inputs_that_require_grad_get_a_gradient_and_a_frozen_head_costs_no_weight_gemm():
    hs, ws, bs, ht, wt, labels = _inputs(seed=18)
    ws, bs = ws.detach(), bs.detach()
    with _Recorder() as rec:
        loss = linear_kd_loss(hs, ws, student_bias=bs, teacher_hidden=ht, teacher_weight=wt)
        loss.backward()
    assert hs.grad is not None and ws.grad is None and bs.grad is None
    assert not any(name.startswith("aten.addmm") for name, _ in rec.ops), "a weight gradient was computed"


# ---------------------------------------------------------------------------------------------
# the memory contract
# ---------------------------------------------------------------------------------------------
class _Recorder(TorchDispatchMode):
    """Every aten op run under it, with the element count of each tensor it produced."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("teacher", ["live", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_all_tokens_by_vocab_forward_or_backward(teacher, reduction):
    n, h, v, chunk = 96, 8, 50, 16
    hs, ws, bs, ht, wt, labels = _inputs(n=n, h=h, v=v, seed=19, dtype=torch.float32)
    kw = dict(teacher_hidden=ht, teacher_weight=wt) if teacher == "live" else \
        dict(teacher_topk=torch.log_softmax(ht @ wt.T, -1).topk(5, -1)[::-1])
    with _Recorder() as rec:
        loss = linear_kd_loss(hs, ws, student_bias=bs, labels=labels, ce_weight=0.5, chunk_size=chunk,
                              reduction=reduction, divergence="jsd", **kw)
        (loss.sum() if reduction == "none" else loss).backward()
    biggest = max(numel for _, numel in rec.ops)
    assert biggest <= chunk * v, f"a tensor of {biggest} elements (chunk x V = {chunk * v}, N x V = {n * v})"
    assert hs.grad is not None and ws.grad is not None and bs.grad is not None


def test_default_chunk_follows_the_memory_budget(monkeypatch):
    from mlkd_fast.linear_kd import default_chunk_size

    monkeypatch.setenv("MLKD_FAST_LM_CHUNK_BYTES", str(4 * 1000 * 64))
    assert default_chunk_size(10_000, 1000, "cpu") == 64
    assert default_chunk_size(10, 1000, "cpu") == 10
    monkeypatch.delenv("MLKD_FAST_LM_CHUNK_BYTES")
    from mlkd_fast.linear_kd import CHUNK_BYTES

    chunk = default_chunk_size(1 << 20, 128256, "cpu")
    assert chunk * 128256 * 4 <= CHUNK_BYTES["cpu"] < 2 * chunk * 128256 * 4  # the largest power of two that fits


# ---------------------------------------------------------------------------------------------
# bad input: one-line errors naming the argument
# ---------------------------------------------------------------------------------------------
def _bad_cases():
    hs, ws, bs, ht, wt, labels = _inputs(seed=20)
    idx = torch.log_softmax(ht @ wt.T, -1).topk(3, -1)
    ok = dict(teacher_hidden=ht, teacher_weight=wt)
    return [
        ("student_hidden", dict(student_hidden=torch.ones(9, 6, dtype=torch.long))),
        ("student_hidden", dict(student_hidden=torch.ones(6))),
        ("empty batch", dict(student_hidden=torch.ones(0, 6, dtype=torch.float64))),
        ("student_weight has H = 7", dict(student_weight=torch.ones(13, 7, dtype=torch.float64))),
        ("student_bias must have shape", dict(student_bias=torch.ones(12, dtype=torch.float64))),
        ("teacher_weight has H", dict(teacher_weight=torch.ones(13, 4, dtype=torch.float64))),
        ("teacher_hidden must have the tokens", dict(teacher_hidden=torch.ones(8, 5, dtype=torch.float64))),
        ("exactly one way", dict(teacher_logits=ht @ wt.T)),
        ("exactly one way", dict(teacher_hidden=None, teacher_weight=None)),
        ("temperature", dict(temperature=0.0)),
        ("temperature", dict(temperature=float("nan"))),
        ("divergence must be one of", dict(divergence="kl")),
        ("reduction must be one of", dict(reduction="batchmean")),
        ("vocab must be one of", dict(vocab="pad")),
        ("beta must be in", dict(divergence="jsd", beta=1.5)),
        ("alpha must be in", dict(divergence="skew_forward_kl", alpha=1.0)),
        ("backend must be one of", dict(backend="cuda")),
        ("labels must have shape", dict(labels=labels[:-1])),
        ("labels must be an integer tensor", dict(labels=labels.double())),
        (r"labels must be in \[0, 13\)", dict(labels=torch.full_like(labels, 13))),
        ("ce_weight != 0 needs labels", dict(ce_weight=1.0)),
        ("student_softcap", dict(student_softcap=-1.0)),
        ("chunk_size must be a positive int", dict(chunk_size=0)),
        ("teacher_topk indices must lie in", dict(teacher_hidden=None, teacher_weight=None,
                                                  teacher_topk=(idx.indices + 13, idx.values))),
        ("teacher_topk indices must be distinct", dict(teacher_hidden=None, teacher_weight=None,
                                                       teacher_topk=(idx.indices[:, [0, 0, 1]], idx.values))),
        ("more than the vocabulary", dict(teacher_hidden=None, teacher_weight=None,
                                          teacher_topk=(torch.zeros(9, 14, dtype=torch.long),
                                                        torch.zeros(9, 14, dtype=torch.float64)))),
        ("teacher_topk indices and logprobs must both have shape", dict(
            teacher_hidden=None, teacher_weight=None, teacher_topk=(idx.indices, idx.values[:, :2]))),
        ("teacher_topk indices must be an integer tensor", dict(
            teacher_hidden=None, teacher_weight=None, teacher_topk=(idx.values, idx.values))),
    ], (hs, ws, bs, ok)


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_input_is_a_one_line_error_naming_the_argument(case):
    cases, (hs, ws, bs, ok) = _bad_cases()
    match, override = cases[case]
    kwargs = {"student_hidden": hs, "student_weight": ws, "student_bias": bs, **ok, **override}
    h, w = kwargs.pop("student_hidden"), kwargs.pop("student_weight")
    with pytest.raises((ValueError, TypeError), match=match) as info:
        linear_kd_loss(h, w, **kwargs)
    assert "\n" not in str(info.value)


def test_devices_must_agree():
    hs, ws, _, ht, wt, _ = _inputs(seed=21)
    with pytest.raises(ValueError, match="on meta but"):
        linear_kd_loss(hs, ws, teacher_hidden=ht.to("meta"), teacher_weight=wt)


def test_topk_with_a_stored_rest_logmass_uses_it_for_the_tail():
    hs, ws, bs, ht, wt, labels = _inputs(seed=22)
    lp = torch.log_softmax(ht @ wt.T, -1)
    top = lp.topk(4, -1)
    rest = torch.log1p(-top.values.exp().sum(-1))
    implied = linear_kd_loss(hs, ws, teacher_topk=(top.indices, top.values), divergence="jsd")
    stored = linear_kd_loss(hs, ws, teacher_topk=(top.indices, top.values, rest), divergence="jsd")
    torch.testing.assert_close(stored, implied, rtol=1e-12, atol=1e-12)
    other = linear_kd_loss(hs, ws, teacher_topk=(top.indices, top.values, rest - 1.0), divergence="jsd")
    assert (other - implied).abs() > 1e-4  # the stored value is what the tail bucket reads
    with pytest.raises(ValueError, match="rest_logmass must have shape"):
        linear_kd_loss(hs, ws, teacher_topk=(top.indices, top.values, rest[:-1]))


def test_compiled_cpu_rows_equal_the_eager_rows(monkeypatch):
    """Large CPU chunks run the row math inductor-compiled (linear_kd.COMPILE_MIN_ENTRIES): the same values
    and gradients as the eager rows, to fp32 round-off."""
    from mlkd_fast import linear_kd

    hs, ws, bs, ht, wt, labels = _inputs(n=40, v=300, seed=23, dtype=torch.float32)
    opts = dict(student_bias=bs, teacher_hidden=ht, teacher_weight=wt, labels=labels, divergence="jsd",
                ce_weight=0.5, student_softcap=20.0, temperature=2.0, chunk_size=20, backend="torch")
    monkeypatch.setenv("MLKD_FAST_LM_COMPILE", "0")
    eager = linear_kd_loss(hs, ws, **opts)
    eager_grads = torch.autograd.grad(eager, (hs, ws, bs))
    monkeypatch.setenv("MLKD_FAST_LM_COMPILE", "1")
    monkeypatch.setattr(linear_kd, "COMPILE_MIN_ENTRIES", 0)
    compiled = linear_kd_loss(hs, ws, **opts)
    compiled_grads = torch.autograd.grad(compiled, (hs, ws, bs))
    assert "failed" not in linear_kd._COMPILED, linear_kd._COMPILED.get("failed")
    assert "rows" in linear_kd._COMPILED
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_autocast_does_not_round_the_logits():
    """Under CPU bf16 autocast the op's GEMMs still give fp32 logits (the op turns autocast off inside)."""
    hs, ws, bs, ht, wt, labels = _inputs(n=64, h=32, v=96, seed=24, dtype=torch.float32)
    plain = linear_kd_loss(hs, ws, teacher_hidden=ht, teacher_weight=wt, labels=labels, ce_weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = linear_kd_loss(hs, ws, teacher_hidden=ht, teacher_weight=wt, labels=labels, ce_weight=1.0)
    torch.testing.assert_close(under, plain, rtol=1e-6, atol=1e-6)

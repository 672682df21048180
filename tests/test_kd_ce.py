"""KD with its CE in one op, ``mlkd_fast.functional.kd_ce_loss`` (docs/design.md §1.1): the native CPU
op (csrc/cpu/kd_ce.cpp, its autograd in C++) and the two-term path every other backend takes, against
an fp64 reference written from the formula, the two terms as the zoo computed them before, TRL-style
bad input, and the backward's three cases (factor 1, freed graph, kept graph).

The native cases skip with the reason where the compiled library is not built; their CPU twin is the
same assertion on ``backend="torch"`` (the two-term path), which always runs.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err, require_backend
from mlkd_fast import functional as MF
from mlkd_fast import methods as M
from mlkd_fast import ops

BACKENDS = ("torch", "native")


def _reference(s, t, y, T, w_kd, w_ce):
    """fp64, from the formula: w_ce mean CE + w_kd T^2 mean KL(softmax(t/T) || softmax(s/T))."""
    s, t = s.double(), t.double()
    log_q = torch.log_softmax(s / T, -1)
    log_p = torch.log_softmax(t / T, -1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    ce = torch.logsumexp(s, -1) - s.gather(1, y[:, None].long())[:, 0]
    return w_kd * T * T * kl.mean(), w_ce * ce.mean()


def _grads(backend, s, t, y, T=4.0, w_kd=1.0, w_ce=1.0):
    s = s.detach().requires_grad_()
    total, kd, ce = MF.kd_ce_loss(s, t, y, T, w_kd=w_kd, w_ce=w_ce, backend=backend)
    (g,) = torch.autograd.grad(total, (s,))
    return total, kd, ce, g


def _native_taken(total) -> bool:
    return type(total.grad_fn).__name__ == "CppFunction"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(64, 10), (1, 1), (7, 1), (33, 1000), (5, 4099)])
@pytest.mark.parametrize("T, w_kd, w_ce", [(4.0, 1.0, 1.0), (1.0, 2.5, 0.5), (2.0, 1.0, 0.0), (3.0, 0.0, 1.0)])
def test_values_and_gradient_match_the_fp64_formula(backend, shape, T, w_kd, w_ce):
    require_backend(backend, "cpu")
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    s, t = 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g)
    y = torch.randint(0, shape[1], (shape[0],), generator=g)
    total, kd, ce, grad = _grads(backend, s, t, y, T, w_kd, w_ce)
    assert _native_taken(total) == (backend == "native")
    assert total.dtype == kd.dtype == ce.dtype == torch.float32 and total.shape == kd.shape == ce.shape == ()
    assert not kd.requires_grad and not ce.requires_grad
    ref_kd, ref_ce = _reference(s, t, y, T, w_kd, w_ce)
    s64 = s.double().requires_grad_()
    r_kd, r_ce = _reference(s64, t, y, T, w_kd, w_ce)
    (ref_grad,) = torch.autograd.grad(r_kd + r_ce, (s64,))
    for got, ref in ((kd, ref_kd), (ce, ref_ce), (total.detach(), ref_kd + ref_ce)):
        assert abs(float(got) - float(ref)) <= 2e-6 * max(1.0, abs(float(ref))), (float(got), float(ref))
    assert rel_err(grad, ref_grad) <= 2e-6
    assert torch.equal(total, kd + ce)  # the total is the fp32 sum of the reported terms


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_equals_the_two_terms_for_every_teacher_dtype(teacher_dtype):
    """The one op against CE + kd_kl_div (the path the kd method took before), per teacher dtype."""
    require_backend("native", "cpu")
    s, t = torch.randn(40, 100), (2 * torch.randn(40, 100)).to(teacher_dtype)
    y = torch.randint(0, 100, (40,))
    total, kd, ce, g = _grads("native", s, t, y, 2.0, 1.5, 0.7)
    assert _native_taken(total)
    s2 = s.clone().requires_grad_()
    two = 0.7 * F.cross_entropy(s2, y) + MF.kd_kl_div(s2, t, 2.0, weight=1.5, backend="native")
    (g2,) = torch.autograd.grad(two, (s2,))
    torch.testing.assert_close(total, two.detach(), rtol=2e-6, atol=0)
    assert rel_err(g, g2) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_classes_and_extreme_logits(backend):
    """-inf teacher logits are masked classes (probability 0, exactly no contribution); a -inf student
    logit where the teacher gives 0 probability is finite; logits of +-1e4 do not overflow."""
    require_backend(backend, "cpu")
    s, t = torch.randn(6, 9), torch.randn(6, 9)
    t[:, 3] = -torch.inf
    s[0, 3] = -torch.inf
    s[1] *= 1e4
    t[2] *= 1e4
    y = torch.tensor([0, 1, 2, 4, 5, 8])
    total, kd, ce, g = _grads(backend, s, t, y)
    assert torch.isfinite(total) and torch.isfinite(g).all()
    ref_kd, ref_ce = _reference(s, t, y, 4.0, 1.0, 1.0)
    assert abs(float(kd) - float(ref_kd)) <= 2e-5 * max(1.0, abs(float(ref_kd)))
    assert abs(float(ce) - float(ref_ce)) <= 2e-5 * max(1.0, abs(float(ref_ce)))
    assert torch.all(g[:, 3] >= 0) and g[0, 3] == 0  # only the student's softmax pushes there (none at -inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_int32_targets(backend):
    require_backend(backend, "cpu")
    base_s, base_t = torch.randn(12, 20), torch.randn(20, 12)
    s = base_s[:, ::2]  # row stride 20, column stride 2
    t = base_t.t()[:, :10]  # column stride 12
    y = torch.randint(0, 10, (12,), dtype=torch.int32)
    total, kd, ce, g = _grads(backend, s, t, y)
    ref_total, _, _, ref_g = _grads("torch", s.contiguous(), t.contiguous(), y.long())
    torch.testing.assert_close(total, ref_total, rtol=2e-6, atol=0)
    assert rel_err(g, ref_g) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_refused_as_the_two_terms_refuse_it(backend):
    require_backend(backend, "cpu")
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        MF.kd_ce_loss(s, t, torch.tensor([0, 1, 5, 3]), backend=backend)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        MF.kd_ce_loss(s, t, y.float(), backend=backend)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        MF.kd_ce_loss(s, t, y[:3], backend=backend)
    with pytest.raises(ValueError, match="disagree on the classes C: 5 vs 6"):
        MF.kd_ce_loss(s, torch.randn(4, 6), y, backend=backend)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        MF.kd_ce_loss(s, t, y, 0.0, backend=backend)
    with pytest.raises(ValueError, match="w_kd must be finite"):
        MF.kd_ce_loss(s, t, y, w_kd=float("nan"), backend=backend)
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        MF.kd_ce_loss([1.0], t, y, backend=backend)


def test_fp64_bf16_and_a_trained_teacher_take_the_two_terms_with_their_own_precision():
    """The op is fp32-student only: fp64 logits keep fp64 math (the two-term path), bf16 ones give the
    two terms' fp32 result; a teacher that requires grad is treated as a constant."""
    require_backend("native", "cpu")
    s, t, y = torch.randn(6, 7), torch.randn(6, 7), torch.randint(0, 7, (6,))
    total64, _, _, _ = _grads("native", s.double(), t.double(), y)
    assert total64.dtype == torch.float64 and not _native_taken(total64)
    total16, _, _, _ = _grads("native", s.bfloat16(), t, y)
    assert total16.dtype == torch.float32 and not _native_taken(total16)
    t_grad = t.clone().requires_grad_()
    total, _, _ = MF.kd_ce_loss(s.requires_grad_(), t_grad, y, backend="native")
    total.backward()
    assert _native_taken(total) and t_grad.grad is None


def test_the_backward_hands_on_scales_in_place_or_copies():
    """The graph freed: the stored gradient handed on (scaled in place when the factor is not 1); the
    graph kept: a scaled copy, so that a second backward sees the stored gradient unchanged and a
    gradient returned earlier is never the tensor a later backward scales."""
    require_backend("native", "cpu")
    s0, t, y = torch.randn(8, 6), torch.randn(8, 6), torch.randint(0, 6, (8,))
    s = s0.clone().requires_grad_()
    total, _, _ = MF.kd_ce_loss(s, t, y, backend="native")
    (g1,) = torch.autograd.grad(total, (s,), retain_graph=True)
    (g3,) = torch.autograd.grad(3 * total, (s,), retain_graph=True)  # kept graph: a copy
    (g1_again,) = torch.autograd.grad(total, (s,), retain_graph=True)
    torch.testing.assert_close(g3, 3 * g1, rtol=1e-6, atol=0)
    assert torch.equal(g1_again, g1)
    (g_half,) = torch.autograd.grad(0.5 * total, (s,))  # freed: in place
    torch.testing.assert_close(g_half, 0.5 * g1, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(total, (s,))
    s.grad = None
    total, _, _ = MF.kd_ce_loss(s, t, y, backend="native")
    (total + total).backward()  # one node, factor 2
    torch.testing.assert_close(s.grad, 2 * g1, rtol=1e-6, atol=0)
    total, kd, ce = MF.kd_ce_loss(s, t, y, backend="native")
    assert torch.autograd.grad(kd + total, (s,))[0].shape == s.shape  # the detached terms carry no gradient


def test_no_grad_and_inference_mode_compute_the_loss_without_a_graph():
    require_backend("native", "cpu")
    s, t, y = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4), torch.randint(0, 4, (5,))
    ref = MF.kd_ce_loss(s, t, y, backend="torch")[0].detach()
    with torch.no_grad():
        total, _, _ = MF.kd_ce_loss(s, t, y, backend="native")
    assert total.grad_fn is None and not total.requires_grad
    with torch.inference_mode():
        total_inf, _, _ = MF.kd_ce_loss(s.detach(), t, y, backend="native")
    torch.testing.assert_close(total, ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(total_inf, ref, rtol=2e-6, atol=0)


def test_the_ops_pass_opcheck_and_compile_takes_the_two_terms():
    """The forward op and the autograd op against their fakes and registrations (torch.library.opcheck);
    under torch.compile kd_ce_loss is the two terms and gives the eager value."""
    require_backend("native", "cpu")
    ns = getattr(torch.ops, ops.KD_CE_NAMESPACE)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    for want in (True, False):
        torch.library.opcheck(ns.kd_ce_fwd.default, (s, t, y, 2.0, 1.0, 0.5, want))
    torch.library.opcheck(ns.kd_ce.default, (s.clone().requires_grad_(), t, y, 2.0, 1.0, 0.5))
    torch.library.opcheck(ns.kd_ce.default, (s, t, y, 2.0, 1.0, 0.5))
    eager = MF.kd_ce_loss(s, t, y, 2.0, w_ce=0.5)[0]
    compiled = torch.compile(lambda a, b, c: MF.kd_ce_loss(a, b, c, 2.0, w_ce=0.5)[0], backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(s, t, y), eager, rtol=2e-6, atol=0)


def test_the_kd_method_trains_with_it_and_keeps_its_terms():
    """The kd method's loss, terms and gradient on the one op equal the two terms' (backend torch)."""
    spec = M.ModelSpec(10, 8)
    s, t, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    got = {}
    for backend in ("torch", "auto"):
        kd = M.build("kd", spec, spec, w_ce=0.5, w_kd=2.0, temperature=3.0, backend=backend)
        x = s.clone().requires_grad_()
        loss = kd(M.Outputs(x), M.Outputs(t), y)
        loss.backward()
        got[backend] = (loss.detach(), {k: v for k, v in kd.last.items()}, x.grad)
    (l0, last0, g0), (l1, last1, g1) = got["torch"], got["auto"]
    assert set(last0) == set(last1) == {"ce", "kd", "total"}
    torch.testing.assert_close(l1, l0, rtol=2e-6, atol=0)
    for k in last0:
        torch.testing.assert_close(last1[k], last0[k], rtol=2e-6, atol=0)
    assert rel_err(g1, g0) <= 2e-6
    kd = M.build("kd", spec, spec, w_ce=0.0)
    kd(M.Outputs(s.clone().requires_grad_()), M.Outputs(t), y)
    assert set(kd.last) == {"kd", "total"}


@pytest.mark.parametrize("threads", [1, 2])
def test_the_loss_is_the_same_on_any_thread_count(threads):
    """Rows run in parallel; the terms are summed in row order afterwards, so the value is bitwise stable."""
    require_backend("native", "cpu")
    s, t, y = torch.randn(3000, 37), torch.randn(3000, 37), torch.randint(0, 37, (3000,))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = MF.kd_ce_loss(s, t, y, backend="native")
        torch.set_num_threads(threads)
        many = MF.kd_ce_loss(s, t, y, backend="native")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)

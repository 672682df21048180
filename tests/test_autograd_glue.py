"""The autograd glue of the fused ops (mlkd_fast.ops): stored gradients, the fp16 gradient scale, gradchecks on a reference-kernel namespace."""
import concurrent.futures

import pytest
import torch

from helpers import F64, FUSED_NAMESPACE as FUSED, namespace_ops, require_backend
from mlkd_fast import ops, reference


@pytest.fixture(params=list(FUSED))
def cpu_namespace(request):
    require_backend(request.param, "cpu")
    return getattr(torch.ops, FUSED[request.param])


def _stored_kl(namespace):
    s = torch.randn(5, 30, requires_grad=True)
    t = torch.randn(5, 30)
    rows, stored, _ = namespace.kd_kl(s, t, None, 2.0, True, False)
    handed = []
    s.register_hook(lambda grad: handed.append(grad))
    return s, rows, stored, stored.detach().clone(), handed


def test_stored_gradient_is_scaled_in_place_and_handed_on_when_the_graph_is_freed(cpu_namespace):
    s, rows, stored, before, handed = _stored_kl(cpu_namespace)
    g = torch.tensor([1.0, 0.5, 2.0, 1.0, -3.0])
    rows.backward(g)
    torch.testing.assert_close(stored, before * g[:, None])  # the saved tensor itself, scaled in place
    assert handed[0].data_ptr() == stored.data_ptr()  # handed on, no copy
    torch.testing.assert_close(s.grad, before * g[:, None])
    torch.testing.assert_close(stored[0], before[0], rtol=0, atol=0)  # factor 1: untouched


@pytest.mark.parametrize("keep", ["retain_graph", "create_graph"])
def test_stored_gradient_is_copied_when_the_graph_is_kept(cpu_namespace, keep):
    s, rows, stored, before, handed = _stored_kl(cpu_namespace)
    g = torch.tensor([1.0, 0.5, 2.0, 1.0, -3.0])
    (grad,) = torch.autograd.grad(rows, s, g, **{keep: True})
    torch.testing.assert_close(stored, before, rtol=0, atol=0)  # the saved tensor is left as it was
    assert handed[0].data_ptr() != stored.data_ptr()
    torch.testing.assert_close(grad, before * g[:, None])
    if keep == "retain_graph":  # the graph is still usable: a second backward, which frees it
        (again,) = torch.autograd.grad(rows, s, g)
        torch.testing.assert_close(again, before * g[:, None])


def test_unit_factor_costs_nothing_after_total_backward(cpu_namespace):
    """``total.backward()`` on the summed rows: the factor is 1, the stored gradient is handed on as it is."""
    s, rows, stored, before, handed = _stored_kl(cpu_namespace)
    rows.sum().backward()
    assert handed[0].data_ptr() == stored.data_ptr()
    torch.testing.assert_close(s.grad, before, rtol=0, atol=0)


def test_graph_freed_is_false_outside_a_backward():
    assert not ops.graph_freed_after_this_backward(torch.ones(3))


def test_correlation_autograd_reaches_only_the_student(cpu_namespace):
    a_s = torch.randn(6, 8, dtype=F64, requires_grad=True)
    a_t = torch.randn(6, 5, dtype=F64, requires_grad=True)
    b_s = torch.randn(4, 8, dtype=F64, requires_grad=True)
    b_t = torch.randn(4, 5, dtype=F64, requires_grad=True)
    g = torch.rand(6, dtype=F64)
    rows = cpu_namespace.correlation_fwd(a_s, a_t, b_s, b_t, 0.5, False)[0]
    d_a, d_b = torch.autograd.grad(rows, (a_s, b_s), g)
    ref = reference.correlation_kl_rows(a_s, a_t.detach(), b_s, b_t.detach(), 0.5, False)
    want_a, want_b = torch.autograd.grad(ref, (a_s, b_s), g)
    torch.testing.assert_close(d_a, want_a)
    torch.testing.assert_close(d_b, want_b)
    rows = cpu_namespace.correlation_fwd(a_s, a_t, b_s, b_t, 0.5, False)[0]
    rows.sum().backward()
    assert a_t.grad is None and b_t.grad is None


def test_stored_gradient_outputs_get_no_gradient(cpu_namespace):
    """kd_kl's second and third outputs are the gradients stored in the forward: a backward through
    them reaches nothing (the backward gets no grad_rows), and beside the rows they change nothing."""
    s, _, stored, _, _ = _stored_kl(cpu_namespace)
    assert torch.autograd.grad(stored.sum(), s, allow_unused=True) == (None,)
    s, rows, stored, before, _ = _stored_kl(cpu_namespace)
    (grad,) = torch.autograd.grad(rows.sum() + 3.0 * stored.sum(), s)
    torch.testing.assert_close(grad, before, rtol=0, atol=0)


def test_fp16_gradient_scale():
    """Powers of two that bring the largest stored fp16 student entry to ~1024 (w_i T (q - p) is at
    most w_i T); with the teacher's gradient stored too, only 1 / w_i; none when nothing is fp16 or
    needs a gradient, or under no_grad; 1 for rows of weight 0."""
    w = torch.tensor([1 / 512, 0.0, 1.0, 3.0])
    half = torch.randn(4, 9).half()
    s, t = half.clone().requires_grad_(), half.clone()
    scale = ops.fp16_gradient_scale(s, t, w, 2.0)
    torch.testing.assert_close(scale, torch.tensor([2.0**18, 1.0, 2.0**9, 2.0**7]), rtol=0, atol=0)
    assert ops.fp16_gradient_scale(s, t, None, 4.0).tolist() == [2.0**8] * 4
    assert ops.fp16_gradient_scale(s, t.requires_grad_(), w, 2.0).tolist() == [2.0**9, 1.0, 1.0, 0.25]
    assert ops.fp16_gradient_scale(half.float(), half.clone().requires_grad_(), w, 2.0).tolist() == [2.0**9, 1.0, 1.0, 0.25]
    # no fp16 gradient stored: none
    assert ops.fp16_gradient_scale(half.float().requires_grad_(), half.bfloat16(), w, 2.0) is None
    assert ops.fp16_gradient_scale(half.clone(), half.float().requires_grad_(), w, 2.0) is None
    assert ops.fp16_gradient_scale(half.clone(), half.clone(), w, 2.0) is None
    with torch.no_grad():
        assert ops.fp16_gradient_scale(s, t, w, 2.0) is None
    assert ops.fp16_gradient_scale(s, t, torch.tensor([1e-30, 1.0, 1.0, 1.0]), 1.0)[0] == 2.0**60  # clamped


# A namespace whose kernels are the reference (fp64 autograd inside the kernel): the autograd glue
# of mlkd_fast.ops (register_fakes_and_autograd via define_ops, the per-row functions) on its own.
REFERENCE_NAMESPACE = "mlkd_fast_test_reference"


def _with_autograd(fn):
    """fn() in a fresh thread: a kernel runs below the autograd dispatch key (thread-local state),
    where nothing records a graph; a new thread starts from the default state."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def _ref_kd_kl(s, t, row_weight, temperature, student_grad, teacher_grad):
    def rows_and_grads():
        s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
        rows = reference.kd_kl_rows(s64, t64, temperature, None if row_weight is None else row_weight.double())
        return (rows.detach(),) + torch.autograd.grad(rows.sum(), (s64, t64))

    rows, g_s, g_t = _with_autograd(rows_and_grads)
    return (rows.detach().to(ops.math_dtype(s, t)), g_s.to(s.dtype) if student_grad else s.new_empty(0),
            g_t.to(t.dtype) if teacher_grad else t.new_empty(0))


def _ref_scale_rows(x, g):
    return (x * g[:, None]).to(x.dtype)


def _ref_scale_rows_(x, g):
    x.mul_(g[:, None])


def _ref_correlation_fwd(a_s, a_t, b_s, b_t, tau, exclude_diagonal):
    dtype = ops.math_dtype(a_s, a_t, b_s, b_t)
    rows = reference.correlation_kl_rows(a_s.to(dtype), a_t.to(dtype), None if b_s is None else b_s.to(dtype),
                                         None if b_t is None else b_t.to(dtype), tau, exclude_diagonal)
    return rows, rows.new_zeros(rows.shape), rows.new_zeros(rows.shape)  # no statistics: the backward recomputes


def _ref_correlation_bwd(g, a_s, a_t, b_s, b_t, lse_s, lse_t, tau, exclude_diagonal):
    def grads_of_the_rows():
        leaves = [x.detach().double().requires_grad_() for x in (a_s, b_s) if x is not None]
        rows = reference.correlation_kl_rows(leaves[0], a_t.double(), leaves[1] if b_s is not None else None,
                                             None if b_t is None else b_t.double(), tau, exclude_diagonal)
        return torch.autograd.grad(rows, leaves, g.double())

    grads = _with_autograd(grads_of_the_rows)
    return grads[0].to(a_s.dtype), (grads[1].to(b_s.dtype) if b_s is not None else a_s.new_empty(0))


@pytest.fixture(scope="module")
def reference_namespace():
    if not hasattr(torch.ops, REFERENCE_NAMESPACE) or not namespace_ops(REFERENCE_NAMESPACE):
        ops.define_ops(REFERENCE_NAMESPACE, {"kd_kl": _ref_kd_kl, "scale_rows": _ref_scale_rows,
                                             "scale_rows_": _ref_scale_rows_, "correlation_fwd": _ref_correlation_fwd,
                                             "correlation_bwd": _ref_correlation_bwd})
    return REFERENCE_NAMESPACE


@pytest.mark.parametrize("keep_graph", [False, True])
def test_glue_gives_the_reference_kd_kl_gradients(reference_namespace, keep_graph):
    """Through the glue (the stored gradients scaled by grad_rows, in place or not) the student and
    teacher gradients are the reference's, for any grad_rows, masked rows and a weight."""
    rows_fn = ops.fused_kd_kl_rows(reference_namespace)
    s = torch.randn(5, 7, dtype=F64, requires_grad=True)
    t = torch.randn(5, 7, dtype=F64, requires_grad=True)
    w = torch.tensor([0.5, 0.0, 1.0, 2.0, 1.0], dtype=F64)
    g = torch.rand(5, dtype=F64) - 0.3
    got = torch.autograd.grad(rows_fn(s, t, 2.5, w), (s, t), g, retain_graph=keep_graph)
    want = torch.autograd.grad(reference.kd_kl_rows(s, t, 2.5, w), (s, t), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(rows_fn(s, t, 2.5, w), reference.kd_kl_rows(s, t, 2.5, w))


def test_glue_gradcheck_kd_kl(reference_namespace):
    rows_fn = ops.fused_kd_kl_rows(reference_namespace)
    s = torch.randn(4, 6, dtype=F64, requires_grad=True)
    t = torch.randn(4, 6, dtype=F64, requires_grad=True)
    w = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda a, b: rows_fn(a, b, 1.7, w), (s, t))
    assert torch.autograd.gradcheck(lambda a: rows_fn(a, t.detach(), 1.7, None), (s,))


def test_glue_fp16_student_gradient_survives_a_small_weight(reference_namespace):
    """fp16 inputs: fused_kd_kl_rows stores the gradient scaled up (fp16_gradient_scale) and divides
    the rows by the scale, so the rows and the gradient equal those of the unscaled fp64 math."""
    rows_fn = ops.fused_kd_kl_rows(reference_namespace)
    s = (torch.randn(6, 40) * 3).half().requires_grad_()
    t = (torch.randn(6, 40) * 3).half()
    w = torch.full((6,), 1 / 4096)
    rows = rows_fn(s, t, 2.0, w)
    (grad,) = torch.autograd.grad(rows, s, torch.full((6,), 65536.0))
    s64 = s.detach().double().requires_grad_()
    ref = reference.kd_kl_rows(s64, t.double(), 2.0, w.double())
    (want,) = torch.autograd.grad(ref, s64, torch.full((6,), 65536.0, dtype=F64))
    torch.testing.assert_close(rows.double(), ref, rtol=1e-6, atol=1e-12)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(grad.double(), want, rtol=2**-10, atol=0)


@pytest.mark.parametrize("mode", ["square", "keep_diagonal", "rectangular"])
def test_glue_gradcheck_correlation(reference_namespace, mode):
    """The correlation's glue: gradients to the student rows and columns, none to the teacher."""
    rows_fn = ops.fused_correlation_rows(reference_namespace)
    a_s = torch.randn(6, 4, dtype=F64, requires_grad=True)
    a_t = torch.randn(6, 3, dtype=F64, requires_grad=True)
    if mode == "rectangular":
        b_s = torch.randn(5, 4, dtype=F64, requires_grad=True)
        b_t = torch.randn(5, 3, dtype=F64)
        assert torch.autograd.gradcheck(lambda x, y: rows_fn(x, a_t, y, b_t, 0.7, False), (a_s, b_s))
    else:
        exclude = mode == "square"
        assert torch.autograd.gradcheck(lambda x: rows_fn(x, a_t, None, None, 0.7, exclude), (a_s,))
    rows_fn(a_s, a_t, None, None, 0.7, True).sum().backward()
    assert a_s.grad is not None and a_t.grad is None


@pytest.mark.parametrize("namespace_of", ["reference", "triton", "native"])
def test_correlation_backward_through_the_statistics_alone_reaches_nothing(namespace_of, request):
    """As kd_kl's stored gradients, correlation_fwd's lse outputs get no gradient (materialize_grads
    is off): a backward through them alone gives the student none (gradcheck's undefined-grad check)."""
    if namespace_of == "reference":
        namespace = request.getfixturevalue("reference_namespace")
    else:
        require_backend(namespace_of, "cpu")
        namespace = FUSED[namespace_of]
    a_s = torch.randn(6, 4, dtype=F64, requires_grad=True)
    _, lse_s, _ = getattr(torch.ops, namespace).correlation_fwd(a_s, torch.randn(6, 3, dtype=F64), None, None, 0.5, True)
    assert torch.autograd.grad(lse_s.sum(), a_s, allow_unused=True) == (None,)

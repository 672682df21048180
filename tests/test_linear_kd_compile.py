"""linear_kd_loss under torch.compile(fullgraph=True), and torch.library.opcheck of its op
``torch.ops.mlkd_fast_lm.linear_kd`` with the arguments linear_kd_loss passes (docs/lm.md §2)."""
import pytest
import torch
from torch import nn

from mlkd_fast.functional import linear_kd_loss

V, H, T = 64, 16, 24


class Tiny(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V, bias=bias)


def _batch():
    g = torch.Generator().manual_seed(3)
    x, th = torch.randn(2, T // 2, H, generator=g), torch.randn(2, T // 2, H, generator=g)
    tw = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (2, T // 2), generator=g)
    labels[0, :3] = -100
    return x, th, tw, labels


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_compile_fullgraph_forward_and_backward_match_eager(divergence):
    """One graph through a tiny model and the loss (inductor on CPU): the loss and the gradients of
    every parameter (body, head, bias) equal eager's."""
    torch._dynamo.reset()
    x, th, tw, labels = _batch()

    def step(model, x):
        hidden = torch.tanh(model.body(x))
        return linear_kd_loss(hidden, model.lm_head.weight, student_bias=model.lm_head.bias, teacher_hidden=th,
                              teacher_weight=tw, labels=labels, divergence=divergence, temperature=2.0,
                              ce_weight=0.3, student_softcap=30.0, chunk_size=7)

    eager, compiled_model = Tiny(bias=True), Tiny(bias=True)
    ref = step(eager, x)
    ref.backward()
    got = torch.compile(step, fullgraph=True)(compiled_model, x)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _op_calls(monkeypatch, **kwargs):
    """The argument tuples linear_kd_loss passes to torch.ops.mlkd_fast_lm.linear_kd for one call."""
    op = torch.ops.mlkd_fast_lm.linear_kd
    calls = []

    def recording(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(torch.ops.mlkd_fast_lm, "linear_kd", recording)
    try:
        linear_kd_loss(**kwargs)
    finally:
        monkeypatch.undo()
    assert calls, "linear_kd_loss did not call torch.ops.mlkd_fast_lm.linear_kd"
    return calls


def _leaf(x, requires_grad):
    return x.detach().clone().requires_grad_(requires_grad) if isinstance(x, torch.Tensor) and \
        x.is_floating_point() else x


@pytest.mark.parametrize("teacher", ["live", "dense", "topk"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_with_the_arguments_linear_kd_loss_passes(monkeypatch, teacher, requires_grad):
    """torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) of the op, on the
    exact arguments linear_kd_loss gives it for a live, a dense and a top-k teacher (with labels, CE,
    a bias, softcap and temperature)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(T, H, generator=g, requires_grad=requires_grad)
    w = torch.randn(V, H, generator=g, requires_grad=requires_grad)
    b = torch.randn(V, generator=g, requires_grad=requires_grad)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[:4] = -100
    kw = dict(student_hidden=h, student_weight=w, student_bias=b, labels=labels, ce_weight=0.5, temperature=2.0,
              student_softcap=20.0, chunk_size=10)
    if teacher == "live":
        kw.update(teacher_hidden=torch.randn(T, H, generator=g), teacher_weight=torch.randn(V, H, generator=g))
    elif teacher == "dense":
        kw.update(teacher_logits=torch.randn(T, V, generator=g))
    else:
        logp = torch.log_softmax(torch.randn(T, V, generator=g), dim=-1).topk(5, dim=-1)
        kw.update(teacher_topk=(logp.indices, logp.values))
    for args in _op_calls(monkeypatch, **kw):
        # the student's hidden states, weight and bias as leaves (the op's first three arguments)
        args = tuple(_leaf(a, requires_grad) if i < 3 else a for i, a in enumerate(args))
        torch.library.opcheck(torch.ops.mlkd_fast_lm.linear_kd.default, args)

"""Every bad input of docs/design.md §4 gets a clear error naming the argument."""
import pytest
import torch

import mlkd_fast
from mlkd_fast import functional as MF
from conftest import require_backend
from mlkd_fast.backends import ENV_VAR, resolve_backend

S, T_ = torch.randn(4, 10), torch.randn(4, 10)
F_S, F_T = torch.randn(6, 8), torch.randn(6, 5)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(student_logits=torch.randn(10), teacher_logits=torch.randn(10)), ValueError, "ndim"),
    (dict(student_logits=S, teacher_logits=torch.randn(4, 10, 1)), ValueError, "teacher_logits"),
    (dict(student_logits=S, teacher_logits=torch.randn(5, 10)), ValueError, "rows N"),
    (dict(student_logits=S, teacher_logits=torch.randn(4, 11)), ValueError, "classes C"),
    (dict(student_logits=S.long(), teacher_logits=T_), TypeError, "student_logits"),
    (dict(student_logits=S, teacher_logits=T_.int()), TypeError, "teacher_logits"),
    (dict(student_logits=S.tolist(), teacher_logits=T_), TypeError, "student_logits"),
    (dict(student_logits=S, teacher_logits=T_, temperature=0.0), ValueError, "temperature"),
    (dict(student_logits=S, teacher_logits=T_, temperature=-1.0), ValueError, "temperature"),
    (dict(student_logits=S, teacher_logits=T_, temperature=float("nan")), ValueError, "temperature"),
    (dict(student_logits=S, teacher_logits=T_, temperature=float("inf")), ValueError, "temperature"),
    (dict(student_logits=S, teacher_logits=T_, temperature="4"), TypeError, "temperature"),
    (dict(student_logits=S, teacher_logits=T_, reduction="avg"), ValueError, "reduction"),
    (dict(student_logits=S, teacher_logits=T_, backend="cuda"), ValueError, "backend"),
    (dict(student_logits=torch.randn(0, 10), teacher_logits=torch.randn(0, 10)), ValueError, "empty batch"),
    (dict(student_logits=torch.randn(4, 0), teacher_logits=torch.randn(4, 0)), ValueError, "empty batch"),
    (dict(student_logits=S, teacher_logits=T_, row_mask=torch.ones(4)), TypeError, "row_mask"),
    (dict(student_logits=S, teacher_logits=T_, row_mask=torch.ones(5, dtype=torch.bool)), ValueError, "row_mask"),
    (dict(student_logits=S, teacher_logits=T_.to("meta")), ValueError, "device"),
])
def test_kd_kl_div_bad_input(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        MF.kd_kl_div(**kwargs)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(student_feats=torch.randn(6), teacher_feats=F_T), ValueError, "student_feats"),
    (dict(student_feats=F_S, teacher_feats=torch.randn(6, 5, 1)), ValueError, "teacher_feats"),
    (dict(student_feats=F_S, teacher_feats=torch.randn(7, 5)), ValueError, "rows M"),
    (dict(student_feats=F_S.long(), teacher_feats=F_T), TypeError, "student_feats"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(3, 8)), ValueError, "together"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(3, 8), teacher_cols=torch.randn(4, 5)), ValueError, "columns N"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(3, 9), teacher_cols=torch.randn(3, 5)), ValueError, "Ds"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(3, 8), teacher_cols=torch.randn(3, 4)), ValueError, "Dt"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(3, 8), teacher_cols=torch.randn(3, 5).int()), TypeError, "teacher_cols"),
    (dict(student_feats=F_S, teacher_feats=F_T, tau=0.0), ValueError, "tau"),
    (dict(student_feats=F_S, teacher_feats=F_T, tau=float("inf")), ValueError, "tau"),
    (dict(student_feats=F_S, teacher_feats=F_T, reduction="avg"), ValueError, "reduction"),
    (dict(student_feats=F_S, teacher_feats=F_T, backend="jax"), ValueError, "backend"),
    (dict(student_feats=torch.randn(0, 8), teacher_feats=torch.randn(0, 5)), ValueError, "empty batch"),
    (dict(student_feats=F_S, teacher_feats=F_T, student_cols=torch.randn(0, 8), teacher_cols=torch.randn(0, 5)),
     ValueError, "student_cols and teacher_cols have no rows"),
    (dict(student_feats=torch.randn(5, 8), teacher_feats=torch.randn(5, 5), student_cols=torch.randn(4, 8),
          teacher_cols=torch.randn(4, 5), cols_start_with_rows=True), ValueError, "rows first"),
    (dict(student_feats=F_S, teacher_feats=F_T.to("meta")), ValueError, "device"),
])
def test_correlation_kl_bad_input(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        MF.correlation_kl(**kwargs)


def test_square_correlation_with_three_rows_is_allowed():
    assert torch.isfinite(MF.correlation_kl(torch.randn(3, 4), torch.randn(3, 4), backend="torch"))


# Rows with fewer than 2 columns to compare with: one-point distributions, KL exactly 0.
DEGENERATE = {
    "square-1": (1, None, {}),
    "square-2": (2, None, {}),
    "keep_diagonal-1": (1, None, {"keep_diagonal": True}),
    "shard-1-of-1": (1, 1, {"cols_start_with_rows": True}),
    "shard-2-of-2": (2, 2, {"cols_start_with_rows": True}),
    "shard-1-of-2": (1, 2, {"cols_start_with_rows": True}),
    "rectangular-1-column": (3, 1, {}),
}


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("case", DEGENERATE)
@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_degenerate_correlation_is_exactly_zero_with_zero_gradients(backend, case, reduction):
    require_backend(backend, "cpu")
    m, n, kw = DEGENERATE[case]
    a_s = torch.randn(m, 8, requires_grad=True)
    a_t = torch.randn(m, 5)
    b_s = b_t = None
    if n is not None:
        b_s = torch.cat([a_s.detach(), torch.randn(n - m, 8)]).requires_grad_() if kw else torch.randn(n, 8).requires_grad_()
        b_t = torch.cat([a_t, torch.randn(n - m, 5)]) if kw else torch.randn(n, 5)
    loss = MF.correlation_kl(a_s, a_t, b_s, b_t, reduction=reduction, scale_by_tau_sq=True, backend=backend, **kw)
    assert loss.shape == ((m,) if reduction == "none" else ())
    assert (loss == 0).all() and loss.dtype == torch.float32
    leaves = [x for x in (a_s, b_s) if x is not None]
    grads = torch.autograd.grad(loss.sum(), leaves)
    for g, x in zip(grads, leaves):
        assert g.shape == x.shape and (g == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_degenerate_correlation_keeps_dtype_and_nan(backend):
    require_backend(backend, "cpu")
    a_s = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    loss = MF.correlation_kl(a_s, torch.randn(2, 3, dtype=torch.float64), backend=backend)
    loss.backward()
    assert loss.dtype == torch.float64 and loss == 0 and (a_s.grad == 0).all()
    nan = torch.full((1, 4), float("nan"))
    assert torch.isnan(MF.correlation_kl(nan, torch.randn(1, 3), backend=backend))  # never hidden


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_mlkd_loss_trains_on_a_last_batch_of_one_or_two(backend, batch):
    require_backend(backend, "cpu")
    loss_fn = mlkd_fast.MLKDLoss(backend=backend)
    s = torch.randn(batch, 10, requires_grad=True)
    f_s = torch.randn(batch, 8, requires_grad=True)
    total = loss_fn(s, torch.randn(batch, 10), f_s, torch.randn(batch, 6), torch.randint(0, 10, (batch,)))
    total.backward()
    assert torch.isfinite(total) and loss_fn.last["corr"] == 0
    assert torch.isfinite(s.grad).all() and (f_s.grad == 0).all()


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("dataset", ["cifar100", "imagenet"])
@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_paper_preset_trains_on_a_last_batch_of_one_or_two_images(backend, dataset, images):
    """4 rotation views per image: 1 image is 4 rows (3 rotated rows against 1 plain column)."""
    require_backend(backend, "cpu")
    loss_fn = mlkd_fast.MLKDLoss.paper(dataset, 8, 6, backend=backend)
    rows = 4 * images
    s = torch.randn(rows, 10, requires_grad=True)
    f_s = torch.randn(rows, 8, requires_grad=True)
    total = loss_fn(s, torch.randn(rows, 10), f_s, torch.randn(rows, 6), torch.randint(0, 10, (images,)))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(f_s.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in loss_fn.parameters() if p.grad is not None)
    if images == 1:
        assert loss_fn.last["corr"] == 0


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_unavailable_backend_says_why(backend, monkeypatch):
    device = torch.device("meta")  # no kernel backend runs on meta tensors
    with pytest.raises(ValueError, match=f"backend '{backend}' is not available on meta: .+"):
        resolve_backend(backend, device)


def test_unavailable_triton_on_cpu_without_interpreter(monkeypatch):
    from mlkd_fast import backends
    monkeypatch.setattr(backends, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        MF.kd_kl_div(S, T_)


def test_available_backends_reports_every_backend_with_a_reason():
    status = mlkd_fast.available_backends("cpu")
    assert set(status) == {"torch", "triton", "native"}
    assert status["torch"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason


def test_nan_input_propagates_to_the_loss():
    s = S.clone()
    s[2, 3] = float("nan")
    assert torch.isnan(MF.kd_kl_div(s, T_, backend="torch"))
    f = F_S.clone()
    f[1, 1] = float("nan")
    assert torch.isnan(MF.correlation_kl(f, F_T, backend="torch"))


def test_module_constructors_check_arguments():
    with pytest.raises(ValueError, match="temperature"):
        mlkd_fast.KDLoss(temperature=0)
    with pytest.raises(ValueError, match="tau"):
        mlkd_fast.CorrelationLoss(tau=-1)
    with pytest.raises(ValueError, match="reduction"):
        mlkd_fast.KDLoss(reduction="avg")
    with pytest.raises(ValueError, match="student_dim"):
        mlkd_fast.MLKDLoss(w_align=1.0)
    with pytest.raises(ValueError, match="w_kd"):
        mlkd_fast.MLKDLoss(w_kd=-1.0)
    with pytest.raises(ValueError, match="dataset"):
        mlkd_fast.MLKDLoss.paper("mnist", 8, 8)

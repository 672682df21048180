"""The loss modules (KDLoss, CorrelationLoss, MLKDLoss): default weights, the paper preset's terms,
logged components, heads as parameters, every dtype on every backend, last batches of one or two,
argument checks; and the reference's other MLKD terms (feature alignment, SupCon)."""
import pytest
import torch
import torch.nn.functional as F

import mlkd_fast
from helpers import BACKENDS, BF16, F16, F32, F64, dtype_id, math_dtype, rel_err, require_backend, \
    skip_interpreted_bf16_dots
from mlkd_fast import functional as MF, reference


def _batch(n=12, c=10, ds=8, dt=6, views=1):
    return (torch.randn(n * views, c, requires_grad=True), torch.randn(n * views, c),
            torch.randn(n * views, ds, requires_grad=True), torch.randn(n * views, dt), torch.randint(0, c, (n,)))


def test_default_weights_are_ce_plus_kd_plus_correlation():
    s, t, fs, ft, y = _batch()
    loss_fn = mlkd_fast.MLKDLoss(backend="torch")
    total = loss_fn(s, t, fs, ft, y)
    expected = (F.cross_entropy(s, y) + MF.kd_kl_div(s, t, 4.0, backend="torch")
                + MF.correlation_kl(fs, ft, tau=0.5, backend="torch"))
    torch.testing.assert_close(total, expected)
    assert set(loss_fn.last) == {"ce", "kd", "corr", "total"}
    torch.testing.assert_close(loss_fn.last["total"], expected.detach())
    total.backward()
    assert s.grad is not None and fs.grad is not None


def test_zero_weight_terms_need_no_input():
    s, t, fs, ft, y = _batch()
    kd_only = mlkd_fast.MLKDLoss(w_ce=0, w_corr=0, backend="torch")
    torch.testing.assert_close(kd_only(s, t), MF.kd_kl_div(s, t, 4.0, backend="torch"))
    with pytest.raises(ValueError, match="teacher_logits"):
        mlkd_fast.MLKDLoss(backend="torch")(s, None, fs, ft, y)


@pytest.mark.parametrize("dataset", ["cifar100", "imagenet"])
def test_paper_preset_terms(dataset):
    b, views, ds, dt, c = 6, 4, 8, 6, 10
    s, t, fs, ft, y = _batch(b, c, ds, dt, views)
    torch.manual_seed(1)
    loss_fn = mlkd_fast.MLKDLoss.paper(dataset, ds, dt, backend="torch")
    w = mlkd_fast.PAPER_WEIGHTS[dataset]
    assert loss_fn.weights == {"ce": w["w_ce"], "kd": w["w_kd"], "corr": w["w_corr"], "align": w["w_align"], "supcon": w["w_supcon"]}
    assert loss_fn.views == 4 and loss_fn.corr_head is not None
    # heads: h = Ds -> 16 Dt -> Dt, corr head Ds -> Ds -> Ds, SupCon Linear -> 128
    linears = [m for m in loss_fn.align_head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(ds, 16 * dt), (16 * dt, dt)]
    assert loss_fn.supcon_student.out_features == 128 and loss_fn.supcon_teacher.in_features == dt
    loss_fn.eval()  # BatchNorm with running stats: the heads give the same output twice
    total = loss_fn(s, None, fs, ft, y)
    assert set(loss_fn.last) == {"ce", "corr", "align", "supcon", "total"}
    # each term recomputed by hand
    ce = F.cross_entropy(s[:b], y)
    h = loss_fn.corr_head(fs)
    corr = reference.correlation_kl_rows(h[b:], ft[b:], h[:b], ft[:b], 0.5).mean()
    align = reference.feature_alignment(loss_fn.align_head(fs), ft)
    emb = torch.cat([loss_fn.supcon_student(fs), loss_fn.supcon_teacher(ft)])
    supcon = reference.supcon_loss(emb, y.repeat(8), 0.07)
    for name, value in {"ce": ce, "corr": corr, "align": align, "supcon": supcon}.items():
        torch.testing.assert_close(loss_fn.last[name], value.detach(), msg=name)
    expected = w["w_ce"] * ce + w["w_corr"] * corr + w["w_align"] * align + w["w_supcon"] * supcon
    torch.testing.assert_close(total, expected)


def test_heads_are_parameters_that_train():
    s, t, fs, ft, y = _batch(8, 10, 8, 6, 4)
    loss_fn = mlkd_fast.MLKDLoss.paper("imagenet", 8, 6, backend="torch")
    params = list(loss_fn.parameters())
    assert params, "the heads must be parameters of the loss module"
    loss_fn(s, None, fs, ft, y).backward()
    assert all(p.grad is not None for p in params)


def test_views_must_divide_the_batch():
    s, t, fs, ft, y = _batch(6, 10, 8, 6, 1)
    loss_fn = mlkd_fast.MLKDLoss(views=4, w_kd=0, backend="torch")
    with pytest.raises(ValueError, match="views"):
        loss_fn(s[:5], None, fs[:5], ft[:5], y)


def test_kd_and_correlation_modules_match_functional():
    s, t, fs, ft, _ = _batch()
    torch.testing.assert_close(mlkd_fast.KDLoss(2.0, "sum", backend="torch")(s, t), MF.kd_kl_div(s, t, 2.0, "sum", backend="torch"))
    torch.testing.assert_close(mlkd_fast.CorrelationLoss(0.3, scale_by_tau_sq=True, backend="torch")(fs, ft),
                               0.09 * MF.correlation_kl(fs, ft, tau=0.3, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_kd_term_logs_the_unweighted_value(backend):
    require_backend(backend, "cpu")
    s, t, fs, ft, y = _batch()
    loss_fn = mlkd_fast.MLKDLoss(w_ce=0.5, w_kd=2.5, w_corr=0.25, backend=backend)
    total = loss_fn(s, t, fs, ft, y)
    kd = MF.kd_kl_div(s, t, 4.0, backend="torch")
    expected = 0.5 * F.cross_entropy(s, y) + 2.5 * kd + 0.25 * MF.correlation_kl(fs, ft, tau=0.5, backend="torch")
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(loss_fn.last["kd"], kd.detach())
    total.backward()
    (expected_grad,) = torch.autograd.grad(expected, s)
    torch.testing.assert_close(s.grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_compile_fullgraph_matches_eager(kernel_backend):
    """torch.compile(fullgraph=True) of MLKDLoss on the fused ops: one graph, forward and backward,
    with the loss and both gradients of the reference (the backward of the KL op writes a scaled
    copy under compile instead of scaling in place, a path plain autograd never takes). Inductor,
    except for Triton's CPU interpreter, whose kernels aot_eager runs without code generation."""
    backend, device = kernel_backend
    torch._dynamo.reset()
    s, t, fs, ft, y = (x.detach().to(device) for x in _batch(n=16, c=10, ds=32, dt=24))
    s.requires_grad_()
    fs.requires_grad_()
    compiler = "aot_eager" if (backend, device.type) == ("triton", "cpu") else "inductor"
    compiled = torch.compile(mlkd_fast.MLKDLoss(backend=backend), fullgraph=True, backend=compiler)
    got = [compiled(s, t, fs, ft, y)]
    got += torch.autograd.grad(got[0], (s, fs))
    ref = [mlkd_fast.MLKDLoss(backend="torch")(s, t, fs, ft, y)]
    ref += torch.autograd.grad(ref[0], (s, fs))
    for name, g, r in zip(("loss", "logit gradient", "feature gradient"), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _authors_supcon(embed_s, embed_t, labels, temperature=0.07, base_temperature=0.07):
    """The SupCon of the MLKD authors' released code, restated with their matrix operations: the
    stacked [student; teacher] embeddings, the detached row maximum, 1e-7 inside the log of the
    denominator, the mean over positives, then over all anchors."""
    feats = torch.cat([F.normalize(embed_s, dim=1), F.normalize(embed_t, dim=1)])
    n = feats.shape[0]
    dots = feats @ feats.T / temperature
    logits = dots - dots.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(n, dtype=feats.dtype)
    mask = (labels[:, None] == labels[None, :]).to(feats.dtype).repeat(2, 2) * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True) + 1e-7)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def test_supcon_matches_the_authors_formula_value_and_gradient():
    torch.manual_seed(0)
    es = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    et = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (10,))
    ours = reference.supcon_loss(torch.cat([es, et]), y.repeat(2))
    theirs = _authors_supcon(es, et, y)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, (es, et)), torch.autograd.grad(theirs, (es, et)))


def test_supcon_epsilon_bounds_an_anchor_far_from_every_other_row():
    """Anchor 0 points away from every other row: its denominator (about 1e-12 of its self term) is
    below the 1e-7 the authors add, which then sets its loss (a plain softmax gives another value)."""
    es = torch.tensor([[1.0, 0.0], [-1.0, 0.1]], dtype=torch.float64)
    et = torch.tensor([[-1.0, 0.05], [-1.0, -0.1]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    ours = reference.supcon_loss(torch.cat([es, et]), y.repeat(2))
    torch.testing.assert_close(ours, _authors_supcon(es, et, y))
    z, labels, self_mask = F.normalize(torch.cat([es, et]), dim=1), y.repeat(2), torch.eye(4, dtype=torch.bool)
    log_prob = torch.log_softmax((z @ z.T / 0.07).masked_fill(self_mask, float("-inf")), 1).masked_fill(self_mask, 0)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    plain_softmax = (-(log_prob * positives).sum(1) / positives.sum(1)).mean()
    assert (ours - plain_softmax).abs() > 1.0
    for dtype in (torch.float32, torch.bfloat16):  # fp32 math for low precision, still finite
        low = reference.supcon_loss(torch.cat([es, et]).to(dtype), y.repeat(2))
        assert low.dtype == torch.float32 and torch.isfinite(low)
        torch.testing.assert_close(low.double(), ours, rtol=1e-2, atol=1e-2)


def test_mlkd_supcon_term_is_the_authors_loss_on_the_heads():
    torch.manual_seed(1)
    loss_fn = mlkd_fast.MLKDLoss(8, 6, w_ce=0, w_kd=0, w_corr=0, w_supcon=1).double()
    fs, ft = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    expected = _authors_supcon(loss_fn.supcon_student(fs), loss_fn.supcon_teacher(ft), y)
    torch.testing.assert_close(loss_fn(student_feats=fs, teacher_feats=ft, target=y), expected)


def test_cross_entropy_follows_the_logits_dtype():
    y = torch.tensor([0, 3, 1, 2])
    logits = torch.randn(4, 5, dtype=torch.float64) * 30
    ce_only = mlkd_fast.MLKDLoss(w_kd=0, w_corr=0)
    exact = ce_only(logits, target=y)
    assert exact.dtype == torch.float64  # not rounded through fp32
    torch.testing.assert_close(exact, F.cross_entropy(logits, y), rtol=1e-15, atol=0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        low = logits.to(dtype).requires_grad_()
        value = ce_only(low, target=y)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, F.cross_entropy(low.detach().float(), y))
        value.backward()
        assert low.grad.dtype == dtype


# ---------------------------------------------------------------------------------------------
# every dtype on every backend: the terms in fp32 or better, fp64 staying fp64
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=dtype_id)
def test_loss_modules_in_every_dtype(op_backend, dtype):
    backend, device = op_backend
    skip_interpreted_bf16_dots(backend, device, dtype)
    s = (torch.randn(6, 11) * 2).to(dtype).to(device).requires_grad_()
    t = (torch.randn(6, 11) * 2).to(dtype).to(device)
    f_s = torch.randn(6, 8).to(dtype).to(device).requires_grad_()
    f_t = torch.randn(6, 5).to(dtype).to(device)
    kd = mlkd_fast.KDLoss(backend=backend)(s, t)
    corr = mlkd_fast.CorrelationLoss(backend=backend)(f_s, f_t)
    assert kd.dtype == corr.dtype == math_dtype(dtype)
    (kd + corr).backward()
    assert s.grad.dtype == f_s.grad.dtype == dtype
    assert torch.isfinite(s.grad).all() and torch.isfinite(f_s.grad).all()


def test_mlkd_loss_in_double(op_backend):
    """``MLKDLoss().double()`` (heads in fp64) on fp64 inputs: every term in fp64, gradients fp64."""
    backend, device = op_backend
    loss_fn = mlkd_fast.MLKDLoss(8, 5, w_align=1.0, w_supcon=0.5, backend=backend).double().to(device)
    s = torch.randn(6, 11, dtype=F64, device=device, requires_grad=True)
    f_s = torch.randn(6, 8, dtype=F64, device=device, requires_grad=True)
    total = loss_fn(s, torch.randn(6, 11, dtype=F64, device=device), f_s,
                    torch.randn(6, 5, dtype=F64, device=device), torch.randint(0, 3, (6,), device=device))
    total.backward()
    assert total.dtype == F64 and s.grad.dtype == F64 and f_s.grad.dtype == F64
    assert loss_fn.last["kd"].dtype == F64 and loss_fn.last["corr"].dtype == F64
    assert all(p.grad is not None and p.grad.dtype == F64 for p in loss_fn.parameters() if p.requires_grad)
    # the fp64 loss of the fused terms agrees with the reference to fp64 precision
    ref_fn = mlkd_fast.MLKDLoss(backend="torch")
    x = [torch.randn(5, 7, dtype=F64), torch.randn(5, 7, dtype=F64), torch.randn(5, 4, dtype=F64),
         torch.randn(5, 3, dtype=F64), torch.randint(0, 7, (5,))]
    ours = mlkd_fast.MLKDLoss(backend=backend)(*(v.to(device) for v in x))
    assert rel_err(ours, ref_fn(*x)) <= 1e-12


@pytest.mark.parametrize("s_dtype, t_dtype", [(F32, F64), (BF16, F32), (F16, F64)],
                         ids=dtype_id)
def test_mlkd_loss_with_mixed_student_and_teacher(op_backend, s_dtype, t_dtype):
    backend, device = op_backend
    skip_interpreted_bf16_dots(backend, device, s_dtype, t_dtype)
    loss_fn = mlkd_fast.MLKDLoss(backend=backend)
    s = torch.randn(6, 11).to(s_dtype).to(device).requires_grad_()
    f_s = torch.randn(6, 8).to(s_dtype).to(device).requires_grad_()
    total = loss_fn(s, torch.randn(6, 11).to(t_dtype).to(device), f_s, torch.randn(6, 5).to(t_dtype).to(device),
                    torch.randint(0, 11, (6,), device=device))
    total.backward()
    assert s.grad.dtype == s_dtype and f_s.grad.dtype == s_dtype
    assert torch.isfinite(total) and torch.isfinite(s.grad).all() and torch.isfinite(f_s.grad).all()


# ---------------------------------------------------------------------------------------------
# last batches of one or two (degenerate correlation), argument checks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
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
@pytest.mark.parametrize("backend", BACKENDS)
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


# ---------------------------------------------------------------------------------------------
# the reference's other terms: feature alignment, SupCon
# ---------------------------------------------------------------------------------------------
def test_feature_alignment_value_and_gradcheck():
    a = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 8, dtype=torch.float64)
    expected = (2 - 2 * F.cosine_similarity(a, b, dim=1)).mean()
    torch.testing.assert_close(reference.feature_alignment(a, b), expected)
    assert reference.feature_alignment(b, b).abs() < 1e-12
    assert torch.autograd.gradcheck(lambda x: reference.feature_alignment(x, b), (a,))


def test_supcon_matches_loop_and_gradcheck():
    z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])  # label 3 has no positive: left out
    zn = F.normalize(z.detach(), dim=1)
    terms = []
    for i in range(8):
        others = [a for a in range(8) if a != i]
        pos = [p for p in others if y[p] == y[i]]
        if not pos:
            continue
        row_max = max(zn[i] @ zn[a] / 0.07 for a in range(8))  # self included; 1e-7 as the authors' code
        denom = row_max + torch.log(sum(torch.exp(zn[i] @ zn[a] / 0.07 - row_max) for a in others) + 1e-7)
        terms.append(-sum(zn[i] @ zn[p] / 0.07 - denom for p in pos) / len(pos))
    torch.testing.assert_close(reference.supcon_loss(z.detach(), y), torch.stack(terms).mean())
    assert torch.autograd.gradcheck(lambda x: reference.supcon_loss(x, y, 0.5), (z,))


def test_supcon_against_contrast_rows_matches_loop_and_gradcheck():
    """The sharded form: 4 anchors (labels far apart, one without a positive) against 9 contrast rows that
    start with them; the positives' per-label sums and the self exclusion must match the loop."""
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([7, 900, 7, 31])  # 31 appears nowhere else: left out
    cy = torch.cat([y, torch.tensor([900, 7, 5, 900, 12])])
    contrast = torch.cat([z, extra])
    zn, cn = F.normalize(z.detach(), dim=1), F.normalize(contrast.detach(), dim=1)
    terms = []
    for i in range(4):
        others = [a for a in range(9) if a != i]
        pos = [p for p in others if cy[p] == y[i]]
        if not pos:
            continue
        row_max = max(zn[i] @ cn[a] / 0.3 for a in range(9))
        denom = row_max + torch.log(sum(torch.exp(zn[i] @ cn[a] / 0.3 - row_max) for a in others) + 1e-7)
        terms.append(-sum(zn[i] @ cn[p] / 0.3 - denom for p in pos) / len(pos))
    got = reference.supcon_loss(z.detach(), y, 0.3, contrast.detach(), cy)
    torch.testing.assert_close(got, torch.stack(terms).mean())
    assert torch.autograd.gradcheck(
        lambda a, b: reference.supcon_loss(a, y, 0.3, torch.cat([a, b]), cy), (z, extra))


def test_supcon_compiles_as_one_graph():
    """SupCon's label ids come from fixed-shape ops (sort, searchsorted, index_add): torch.compile
    captures it in one graph, with the eager value and gradient."""
    torch._dynamo.reset()
    z = torch.randn(12, 6, requires_grad=True)
    y = torch.tensor([3, 1, 3, 0, 1, 9, 3, 1, 0, 0, 7, 9])
    compiled = torch.compile(lambda e, lab: reference.supcon_loss(e, lab, 0.1), fullgraph=True, backend="aot_eager")
    got = compiled(z, y)
    (got_grad,) = torch.autograd.grad(got, z)
    ref = reference.supcon_loss(z, y, 0.1)
    (ref_grad,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_grad, ref_grad)

"""The pure-PyTorch reference against independent computations, and its fp64 gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from mlkd_fast import reference


def test_kd_rows_match_torch_kl_div_times_t_squared():
    s, t, T = torch.randn(13, 29, dtype=torch.float64), torch.randn(13, 29, dtype=torch.float64), 3.0
    expected = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1) * T * T
    torch.testing.assert_close(reference.kd_kl_rows(s, t, T), expected)


def test_kd_rows_low_precision_inputs_use_fp32_math():
    s, t = torch.randn(8, 50), torch.randn(8, 50)
    rows = reference.kd_kl_rows(s.bfloat16(), t.bfloat16(), 2.0)
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, reference.kd_kl_rows(s.bfloat16().double(), t.bfloat16().double(), 2.0).float())


def test_kd_rows_minus_inf_teacher_gives_finite_values_and_grads():
    s = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 10, dtype=torch.float64)
    t[:, :3] = float("-inf")
    t.requires_grad_()
    rows = reference.kd_kl_rows(s, t, 2.0)
    gs, gt = torch.autograd.grad(rows.sum(), (s, t))
    assert torch.isfinite(rows).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gt[:, :3] == 0).all()


def test_kd_rows_direct_sum_with_masked_classes():
    s = torch.randn(3, 6, dtype=torch.float64)
    t = torch.randn(3, 6, dtype=torch.float64)
    t[0, 0] = float("-inf")
    T = 1.5
    p, log_q = torch.softmax(t / T, -1), torch.log_softmax(s / T, -1)
    expected = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        for c in range(6):
            if p[i, c] > 0:
                expected[i] += p[i, c] * (math.log(p[i, c]) - log_q[i, c])
    torch.testing.assert_close(reference.kd_kl_rows(s, t, T), expected * T * T)


def test_kd_rows_nan_propagates():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    t[1, 2] = float("nan")
    rows = reference.kd_kl_rows(s, t, 2.0)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1])


def test_kd_rows_gradcheck_student_and_teacher():
    s = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False])
    assert torch.autograd.gradcheck(lambda a, b: reference.kd_kl_rows(a, b, 2.5, mask.double()), (s, t))


def _explicit_correlation(a_s, a_t, b_s, b_t, tau, exclude_diag):
    """Independent loop form: explicit cosine matrices, explicit softmax, explicit KL sum."""
    def cos_matrix(a, b):
        out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
        for i in range(a.shape[0]):
            for j in range(b.shape[0]):
                out[i, j] = torch.dot(a[i], b[j]) / (max(a[i].norm(), 1e-8) * max(b[j].norm(), 1e-8))
        return out
    sim_s, sim_t = cos_matrix(a_s, b_s) / tau, cos_matrix(a_t, b_t) / tau
    rows = []
    for i in range(sim_s.shape[0]):
        cols = [j for j in range(sim_s.shape[1]) if not (exclude_diag and j == i)]
        zs = torch.exp(sim_s[i, cols]).sum()
        zt = torch.exp(sim_t[i, cols]).sum()
        rows.append(sum(torch.exp(sim_t[i, j]) / zt * (sim_t[i, j] - torch.log(zt) - sim_s[i, j] + torch.log(zs)) for j in cols))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["square", "keep_diagonal", "rectangular"])
def test_correlation_rows_match_explicit_computation(mode):
    a_s, a_t = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 7, dtype=torch.float64)
    if mode == "rectangular":
        b_s, b_t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
        got = reference.correlation_kl_rows(a_s, a_t, b_s, b_t, tau=0.5)
        expected = _explicit_correlation(a_s, a_t, b_s, b_t, 0.5, False)
    else:
        keep = mode == "keep_diagonal"
        got = reference.correlation_kl_rows(a_s, a_t, tau=0.5, exclude_diagonal=not keep)
        expected = _explicit_correlation(a_s, a_t, a_s, a_t, 0.5, not keep)
    torch.testing.assert_close(got, expected)


def test_correlation_rows_gradcheck_square_and_rectangular():
    a_s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    a_t = torch.randn(6, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: reference.correlation_kl_rows(x, a_t, tau=0.7), (a_s,))
    b_s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b_t = torch.randn(5, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, y: reference.correlation_kl_rows(x, a_t, y, b_t, tau=0.7), (a_s, b_s))


@pytest.mark.parametrize("keep_diagonal", [False, True])
def test_correlation_shards_make_up_the_square_loss(keep_diagonal):
    """Each shard's rows against the whole batch, its own rows first (cols_start_with_rows), gives
    the square loss's rows of that shard; summed over the shards, the loss and the gradient of the
    features (reaching them as rows and as columns) are the square ones."""
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(12, 7, dtype=torch.float64)
    square = reference.correlation_kl_rows(x, t, tau=0.5, exclude_diagonal=not keep_diagonal)
    (want,) = torch.autograd.grad(square.sum(), x)
    shards, total = [], 0.0
    for lo, hi in ((0, 4), (4, 8), (8, 12)):
        rest = torch.cat([torch.arange(0, lo), torch.arange(hi, 12)])
        rows = reference.correlation_kl_rows(x[lo:hi], t[lo:hi], torch.cat([x[lo:hi], x[rest]]),
                                             torch.cat([t[lo:hi], t[rest]]), tau=0.5,
                                             exclude_diagonal=not keep_diagonal)
        shards.append(rows)
        total = total + rows.sum()
    (got,) = torch.autograd.grad(total, x)
    torch.testing.assert_close(torch.cat(shards), square)
    torch.testing.assert_close(got, want)


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

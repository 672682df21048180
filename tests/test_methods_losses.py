"""The distiller zoo's loss functions (mlkd_fast.methods) against independent fp64 re-statements.

Each oracle below is written from the paper / reference-code formula with a different code path
than the implementation (explicit loops over samples, classes or triples, einsum), in fp64. Then:
fp64 gradcheck on tiny shapes, degenerate batches (exactly 0, exactly zero gradients), bad inputs,
and fp32 / bf16 / mixed dtypes.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import require_backend
from mlkd_fast import methods as M

D64 = torch.float64


def close(x, ref, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(x.double(), torch.as_tensor(ref, dtype=D64), rtol=rtol, atol=atol)


def softmax_row(z):
    e = [math.exp(v - max(z)) for v in z]
    s = sum(e)
    return [v / s for v in e]


# ---------------------------------------------------------------------------------------------
# fp64 oracles (loops)
# ---------------------------------------------------------------------------------------------
def kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def kd_oracle(s, t, temp):
    rows = [kl(softmax_row((t[i] / temp).tolist()), softmax_row((s[i] / temp).tolist())) for i in range(s.shape[0])]
    return temp * temp * sum(rows) / len(rows)


def dkd_oracle(s, t, y, alpha, beta, temp):
    total = 0.0
    for i in range(s.shape[0]):
        ps = softmax_row((s[i] / temp).tolist())
        pt = softmax_row((t[i] / temp).tolist())
        g = int(y[i])
        tckd = kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
        rest_s = [p for c, p in enumerate(ps) if c != g]
        rest_t = [p for c, p in enumerate(pt) if c != g]
        nckd = kl([p / sum(rest_t) for p in rest_t], [p / sum(rest_s) for p in rest_s])
        total += alpha * tckd + beta * nckd
    return temp * temp * total / s.shape[0]


def pearson(a, b, eps=1e-8):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    ca, cb = [v - ma for v in a], [v - mb for v in b]
    num = sum(x * y for x, y in zip(ca, cb))
    return num / (math.sqrt(sum(x * x for x in ca)) * math.sqrt(sum(y * y for y in cb)) + eps)


def dist_oracle(s, t, beta, gamma, tau):
    ys = [softmax_row((s[i] / tau).tolist()) for i in range(s.shape[0])]
    yt = [softmax_row((t[i] / tau).tolist()) for i in range(s.shape[0])]
    n, c = len(ys), len(ys[0])
    inter = 1 - sum(pearson(ys[i], yt[i]) for i in range(n)) / n
    intra = 1 - sum(pearson([ys[i][k] for i in range(n)], [yt[i][k] for i in range(n)]) for k in range(c)) / c
    return tau * tau * (beta * inter + gamma * intra)


def attention_oracle(f):
    a = torch.einsum("bchw,bchw->bhw", f, f).flatten(1) / f.shape[1]
    return a / a.norm(dim=1, keepdim=True)


def pool2(f):
    """2x2 average pooling by reshaping (a different path from adaptive_avg_pool2d)."""
    b, c, h, w = f.shape
    return f.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def fsp_oracle(f1, f2):
    if f1.shape[2] > f2.shape[2]:
        f1 = pool2(f1)
    return torch.einsum("bihw,bjhw->bij", f1, f2) / (f2.shape[2] * f2.shape[3])


def nst_oracle(fs, ft):
    total = 0.0
    for n in range(fs.shape[0]):
        xs = [v / v.norm() for v in fs[n].flatten(1)]
        xt = [v / v.norm() for v in ft[n].flatten(1)]
        kmean = lambda a, b: sum(float(x @ y) ** 2 for x in a for y in b) / (len(a) * len(b))
        total += kmean(xt, xt) + kmean(xs, xs) - 2 * kmean(xs, xt)
    return total / fs.shape[0]


def sp_oracle(fs, ft):
    b = fs.shape[0]
    xs, xt = fs.reshape(b, -1), ft.reshape(b, -1)
    total = 0.0
    for i in range(b):
        gs = [float(xs[i] @ xs[j]) for j in range(b)]
        gt = [float(xt[i] @ xt[j]) for j in range(b)]
        ns, nt = math.sqrt(sum(v * v for v in gs)), math.sqrt(sum(v * v for v in gt))
        total += sum((gt[j] / nt - gs[j] / ns) ** 2 for j in range(b))
    return total / (b * b)


def pkt_oracle(fs, ft, eps=1e-7):
    def probs(x):
        x = [v / (v.norm() + eps) for v in x]
        k = [[(float(a @ b) + 1) / 2 for b in x] for a in x]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(fs), probs(ft)
    b = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / (b * b)


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def rkd_oracle(fs, ft, wd=25.0, wa=50.0):
    b = fs.shape[0]
    xs, xt = fs.reshape(b, -1), ft.reshape(b, -1)

    def dists(x):
        # off-diagonal distances are floored at sqrt(1e-12), as the references' pdist does
        d = [[max(float((x[i] - x[j]).norm()), 1e-6) if i != j else 0.0 for j in range(b)] for i in range(b)]
        mean = sum(map(sum, d)) / (b * (b - 1))
        return [[v / mean for v in row] for row in d]

    def cos(x, a, i, k):
        u, v = x[i] - x[a], x[k] - x[a]
        nu, nv = float(u.norm()), float(v.norm())
        if nu == 0 or nv == 0:
            return 0.0
        return float(u @ v) / (nu * nv)

    ds, dt = dists(xs), dists(xt)
    dist = sum(smooth_l1(ds[i][j], dt[i][j]) for i in range(b) for j in range(b)) / b ** 2
    angle = sum(smooth_l1(cos(xs, a, i, k), cos(xt, a, i, k))
                for a, i, k in itertools.product(range(b), repeat=3)) / b ** 3
    return wd * dist + wa * angle, dist, angle


def cc_oracle(es, et, gamma=0.4, p_order=2):
    b = es.shape[0]

    def k(x, i, j):
        g = float(x[i] @ x[j])
        return math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * g ** p for p in range(p_order + 1))

    return sum((k(et, i, j) - k(es, i, j)) ** 2 for i in range(b) for j in range(b)) / (b * b)


def crd_oracle(es, et, bank_s, bank_t, idx, num_data, tau, z_s, z_t):
    es = [v / v.norm() for v in es]
    et = [v / v.norm() for v in et]
    m = idx.shape[1] - 1
    noise = m / num_data

    def nce(anchor, bank, z):
        total = 0.0
        for i in range(len(anchor)):
            for j in range(idx.shape[1]):
                p = math.exp(float(bank[idx[i, j]] @ anchor[i]) / tau) / z
                total += math.log(p / (p + noise + 1e-7)) if j == 0 else math.log(noise / (p + noise + 1e-7))
        return -total / len(anchor)

    return nce(es, bank_t, z_s) + nce(et, bank_s, z_t)


def infonce_oracle(es, et, tau):
    b = es.shape[0]
    s = [[float(F.normalize(es[i], dim=0) @ F.normalize(et[j], dim=0)) / tau for j in range(b)] for i in range(b)]
    rows = sum(-math.log(softmax_row(s[i])[i]) for i in range(b)) / b
    cols = sum(-math.log(softmax_row([s[j][i] for j in range(b)])[i]) for i in range(b)) / b
    return (rows + cols) / 2


# ---------------------------------------------------------------------------------------------
# values against the oracles (fp64)
# ---------------------------------------------------------------------------------------------
def logits(b=5, c=7, scale=2.0, dtype=D64):
    return (torch.randn(b, c, dtype=D64) * scale).to(dtype), (torch.randn(b, c, dtype=D64) * scale).to(dtype)


def test_kd_matches_oracle():
    s, t = logits()
    close(M.kd_loss(s, t), kd_oracle(s, t, 4.0))
    close(M.kd_loss(s, t, 1.5), kd_oracle(s, t, 1.5))


@pytest.mark.parametrize("alpha,beta,temp", [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.3, 2.0, 2.5)])
def test_dkd_matches_oracle(alpha, beta, temp):
    s, t = logits(6, 9)
    y = torch.randint(0, 9, (6,))
    close(M.dkd_loss(s, t, y, alpha, beta, temp), dkd_oracle(s, t, y, alpha, beta, temp))


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_dkd_nckd_runs_on_every_backend(backend):
    """NCKD goes through kd_kl_div with the target logit at -inf on both sides: every backend must
    give the same loss and a finite gradient that is exactly 0 at the target entry."""
    require_backend(backend, "cpu")
    s, t = logits(4, 6, dtype=torch.float32)
    y = torch.tensor([0, 5, 2, 2])
    s.requires_grad_(True)
    loss = M.dkd_loss(s, t, y, backend=backend)
    loss.backward()
    close(loss, dkd_oracle(s.detach().double(), t.double(), y, 1.0, 8.0, 4.0), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(s.grad).all()


def test_dkd_extreme_logits_finite():
    s = torch.tensor([[60.0, -60.0, 0.0], [0.0, 0.0, 1e4]])
    t = torch.tensor([[1e4, 0.0, -1e4], [-30.0, 30.0, 0.0]])
    y = torch.tensor([0, 2])
    s.requires_grad_(True)
    loss = M.dkd_loss(s, t, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_matches_oracle(tau):
    s, t = logits(6, 5)
    close(M.dist_loss(s, t, 1.0, 1.0, tau), dist_oracle(s, t, 1.0, 1.0, tau))
    close(M.dist_loss(s, t, 0.5, 2.0, tau), dist_oracle(s, t, 0.5, 2.0, tau))


@pytest.mark.parametrize("detach", [True, False])
def test_dml_matches_oracle_and_peer_gradients(detach):
    zs = [torch.randn(4, 5, dtype=D64, requires_grad=True) for _ in range(3)]
    terms = M.dml_loss(zs, temperature=2.0, detach_peers=detach)
    assert len(terms) == 3
    for k, term in enumerate(terms):
        ref = sum(kd_oracle(zs[k].detach(), zs[l].detach(), 2.0) for l in range(3) if l != k) / 2
        close(term, ref)
    terms[0].backward()
    assert zs[0].grad is not None and zs[0].grad.abs().sum() > 0
    if detach:
        assert zs[1].grad is None and zs[2].grad is None
    else:
        assert zs[1].grad.abs().sum() > 0 and zs[2].grad.abs().sum() > 0


def test_fitnet_matches_oracle():
    a, b = torch.randn(2, 3, 4, 4, dtype=D64), torch.randn(2, 3, 4, 4, dtype=D64)
    close(M.fitnet_loss(a, b), sum(float(x - y) ** 2 for x, y in zip(a.flatten(), b.flatten())) / a.numel())


def test_at_matches_oracle_over_stages():
    s = [torch.randn(3, 4, 6, 6, dtype=D64), torch.randn(3, 8, 3, 3, dtype=D64)]
    t = [torch.randn(3, 6, 6, 6, dtype=D64), torch.randn(3, 5, 3, 3, dtype=D64)]
    ref = sum(float((attention_oracle(a) - attention_oracle(b)).square().mean()) for a, b in zip(s, t))
    close(M.at_loss(s, t), ref)
    close(M.at_loss(s[0], t[0]), float((attention_oracle(s[0]) - attention_oracle(t[0])).square().mean()))
    # p = 4 on non-negative maps: mean_c f^4
    a, b = s[0].abs(), t[0].abs()
    at4 = lambda f: F.normalize(torch.einsum("bchw->bhw", f ** 4).flatten(1) / f.shape[1], dim=1)
    close(M.at_loss(a, b, p=4), float((at4(a) - at4(b)).square().mean()))


def test_fsp_matches_oracle_with_pooling():
    s = [(torch.randn(2, 3, 8, 8, dtype=D64), torch.randn(2, 4, 4, 4, dtype=D64)),
         (torch.randn(2, 4, 4, 4, dtype=D64), torch.randn(2, 5, 4, 4, dtype=D64))]
    t = [(torch.randn(2, 3, 8, 8, dtype=D64), torch.randn(2, 4, 4, 4, dtype=D64)),
         (torch.randn(2, 4, 4, 4, dtype=D64), torch.randn(2, 5, 4, 4, dtype=D64))]
    ref = sum(float((fsp_oracle(*a) - fsp_oracle(*b)).square().mean()) for a, b in zip(s, t))
    close(M.fsp_loss(s, t), ref)
    close(M.fsp_matrix(*s[0]), fsp_oracle(*s[0]))
    close(M.fsp_loss(s[1], t[1]), float((fsp_oracle(*s[1]) - fsp_oracle(*t[1])).square().mean()))


def test_nst_matches_oracle():
    s, t = torch.randn(2, 3, 4, 4, dtype=D64), torch.randn(2, 5, 4, 4, dtype=D64)
    close(M.nst_loss(s, t), nst_oracle(s, t))


def test_sp_matches_oracle_over_stages():
    s = [torch.randn(5, 3, 4, 4, dtype=D64), torch.randn(5, 7, dtype=D64)]
    t = [torch.randn(5, 6, 2, 2, dtype=D64), torch.randn(5, 4, dtype=D64)]
    close(M.sp_loss(s, t), sum(sp_oracle(a, b) for a, b in zip(s, t)))


def test_pkt_matches_oracle():
    s, t = torch.randn(6, 5, dtype=D64), torch.randn(6, 9, dtype=D64)
    close(M.pkt_loss(s, t), pkt_oracle(s, t))


def test_rkd_matches_naive_triple_loop():
    s, t = torch.randn(5, 4, dtype=D64), torch.randn(5, 7, dtype=D64)
    total, dist, angle = rkd_oracle(s, t)
    close(M.rkd_distance_loss(s, t), dist)
    close(M.rkd_angle_loss(s, t), angle)
    close(M.rkd_loss(s, t), total)
    close(M.rkd_loss(s, t, 1.0, 0.0), dist)
    # duplicate samples: zero difference vectors have cosine 0 on both sides, as in the references
    s2, t2 = s.clone(), t.clone()
    s2[1], t2[1] = s2[0], t2[0]
    close(M.rkd_loss(s2, t2), rkd_oracle(s2, t2)[0])


def naive_angle(x):
    """The references' all-at-once form: the full (B, B, D) difference tensor and (B, B, B) cosines."""
    unit = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, None])
def test_rkd_chunked_angle_equals_naive_b3(chunk):
    s = torch.randn(13, 6, dtype=D64, requires_grad=True)
    t = torch.randn(13, 10, dtype=D64)
    loss = M.rkd_angle_loss(s, t, chunk=chunk)
    naive = F.smooth_l1_loss(naive_angle(s), naive_angle(t))
    close(loss, naive.detach(), rtol=1e-12)
    (g,) = torch.autograd.grad(loss, s)
    (g_ref,) = torch.autograd.grad(naive, s)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)


def test_rkd_chunk_default_caps_the_work_tensors():
    from mlkd_fast.methods.rkd import _default_angle_chunk

    assert _default_angle_chunk(4096, 4096) == 1
    assert _default_angle_chunk(64, 128) == 64
    assert _default_angle_chunk(1024, 512) * 1024 * 1536 <= 1 << 24


def test_cc_matches_oracle():
    s, t = torch.randn(5, 4, dtype=D64), torch.randn(5, 6, dtype=D64)
    s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    close(M.cc_loss(s, t), cc_oracle(s, t))
    close(M.cc_loss(s, t, gamma=0.2, p_order=3), cc_oracle(s, t, 0.2, 3))
    # the Taylor kernel approximates the Gaussian RBF on unit vectors
    exact = torch.exp(-0.4 * torch.cdist(s, s).square())
    assert (M.cc_correlation(s, 0.4, 6) - exact).abs().max() < 1e-4


def test_crd_matches_oracle_and_updates_memory():
    num_data, dim, b, k = 40, 6, 3, 9
    mem = M.CRDMemory(num_data, dim, generator=torch.Generator().manual_seed(0)).double()
    es = torch.randn(b, dim, dtype=D64)
    et = torch.randn(b, dim, dtype=D64)
    index = torch.tensor([2, 17, 33])
    idx = M.crd_sample_indices(index, num_data, k, torch.Generator().manual_seed(1))
    assert idx.shape == (b, k + 1) and torch.equal(idx[:, 0], index)
    bank_s, bank_t = mem.memory_s.clone(), mem.memory_t.clone()
    loss = M.crd_loss(es, et, index, mem, idx, tau=0.07)
    # Z from the first batch: mean of exp(score / tau) times the dataset size
    esn, etn = F.normalize(es, dim=1), F.normalize(et, dim=1)
    z_s = torch.exp(torch.einsum("bkd,bd->bk", bank_t[idx], esn) / 0.07).mean() * num_data
    z_t = torch.exp(torch.einsum("bkd,bd->bk", bank_s[idx], etn) / 0.07).mean() * num_data
    close(mem.z_s, z_s)
    close(mem.z_t, z_t)
    close(loss, crd_oracle(es, et, bank_s, bank_t, idx, num_data, 0.07, float(z_s), float(z_t)))
    # momentum update of the positives, normalised
    for i, j in enumerate(index.tolist()):
        want = F.normalize(0.5 * bank_s[j] + 0.5 * esn[i], dim=0)
        close(mem.memory_s[j], want)
        want = F.normalize(0.5 * bank_t[j] + 0.5 * etn[i], dim=0)
        close(mem.memory_t[j], want)
    untouched = [j for j in range(num_data) if j not in index.tolist()]
    assert torch.equal(mem.memory_s[untouched], bank_s[untouched])
    # Z stays fixed after the first call
    M.crd_loss(es * 3, et, index, mem, idx, update=False)
    close(mem.z_s, z_s)
    assert set(mem.state_dict()) == {"memory_s", "memory_t", "z_s", "z_t"}


def test_crd_sampling_reproducible_and_class_aware():
    index = torch.tensor([0, 5, 9])
    a = M.crd_sample_indices(index, 20, 50, torch.Generator().manual_seed(3))
    b = M.crd_sample_indices(index, 20, 50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 20
    labels = torch.arange(20) % 4
    c = M.crd_sample_indices(index, 20, 400, torch.Generator().manual_seed(4), target=labels[index], data_labels=labels)
    assert torch.equal(c[:, 0], index)
    assert (labels[c[:, 1:]] != labels[index][:, None]).all()
    # every other-class sample is reachable (uniform over them)
    for i in range(3):
        assert set(c[i, 1:].tolist()) == {j for j in range(20) if labels[j] != labels[index[i]]}


def test_crd_inbatch_matches_oracle():
    s, t = torch.randn(5, 4, dtype=D64), torch.randn(5, 4, dtype=D64)
    close(M.crd_inbatch_loss(s, t, 0.5), infonce_oracle(s, t, 0.5))
    close(M.crd_inbatch_loss(s, t), infonce_oracle(s, t, 0.07))


def test_bss_loss_is_kl_without_t_squared():
    s, t = logits(4, 6)
    close(M.bss_loss(s, t), kd_oracle(s, t, 3.0) / 9.0)


# ---------------------------------------------------------------------------------------------
# BSS attack
# ---------------------------------------------------------------------------------------------
class LinearTeacher(torch.nn.Module):
    def __init__(self, d=6, c=4):
        super().__init__()
        self.lin = torch.nn.Linear(d, c).double()

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_bss_attack_single_step_formula_and_no_param_grads():
    teacher = LinearTeacher()
    x = torch.randn(3, 6, dtype=D64)
    out = teacher(x).detach()
    base = out.argmax(1)
    cls = (base + 1) % 4
    adv = M.bss_attack(teacher, x, cls, steps=1, step_size=0.3)
    w = teacher.lin.weight.detach()
    for i in range(3):
        g = w[cls[i]] - w[base[i]]
        gap = out[i, base[i]] - out[i, cls[i]]
        close(adv[i], x[i] + 0.3 * (gap + 1e-4) * g / g.norm())
    assert all(p.grad is None for p in teacher.parameters())
    assert not adv.requires_grad and adv.dtype == x.dtype


def test_bss_attack_moves_to_the_boundary_and_stops():
    teacher = LinearTeacher()
    x = torch.randn(4, 2, 3, dtype=D64)
    out = teacher(x).detach()
    base = out.argmax(1)
    cls = M.bss_attack_classes(out, torch.Generator().manual_seed(0))
    assert (cls != base).all()
    adv = M.bss_attack(teacher, x, cls, steps=10, step_size=0.05)
    # a linear teacher, one sample at a time: the gradient is the constant w_c - w_b, and a sample
    # moves while the teacher still predicts its original class
    w, bias = teacher.lin.weight.detach(), teacher.lin.bias.detach()
    for i in range(4):
        xi = x[i].flatten().clone()
        g = w[cls[i]] - w[base[i]]
        for _ in range(10):
            logit = w @ xi + bias
            if int(logit.argmax()) != int(base[i]):
                break
            xi = xi + 0.05 * (float(logit[base[i]] - logit[cls[i]]) + 1e-4) * g / g.norm()
        torch.testing.assert_close(adv[i].flatten(), xi, rtol=1e-10, atol=1e-12)
    gap = lambda z: (z.gather(1, base[:, None]) - z.gather(1, cls[:, None])).squeeze(1)
    assert (gap(teacher(adv)) < gap(out)).all()
    # a big step crosses the boundary at once; then the sample stops moving
    adv1 = M.bss_attack(teacher, x, cls, steps=1, step_size=5.0)
    assert (teacher(adv1).argmax(1) != base).all()
    torch.testing.assert_close(M.bss_attack(teacher, x, cls, steps=5, step_size=5.0), adv1)
    clamped = M.bss_attack(teacher, x, cls, steps=3, step_size=5.0, clamp=(-0.5, 0.5))
    assert clamped.min() >= -0.5 and clamped.max() <= 0.5


def test_bss_attack_classes_follow_teacher_probabilities():
    z = torch.tensor([[3.0, 1.0, math.log(3.0) + 1.0, -50.0]]).repeat(4000, 1)
    cls = M.bss_attack_classes(z, torch.Generator().manual_seed(1))
    freq = torch.bincount(cls, minlength=4).double() / 4000
    assert freq[0] == 0 and freq[3] < 0.01
    assert abs(freq[2] - 0.75) < 0.03  # p2 / (p1 + p2) = 3 / 4
    again = M.bss_attack_classes(z, torch.Generator().manual_seed(1))
    assert torch.equal(cls, again)


def test_bss_select():
    t = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    s = torch.tensor([[4.0, 0, 0], [0, 1.0, 0.9], [5.0, 0, 0], [1.0, 0.8, 0.0]])
    y = torch.tensor([0, 1, 2, 0])
    assert M.bss_select(s, t, y).tolist() == [0, 1, 3]
    assert M.bss_select(s, t, y, max_samples=1).tolist() == [1]


# ---------------------------------------------------------------------------------------------
# gradients (fp64 gradcheck, tiny shapes)
# ---------------------------------------------------------------------------------------------
def req(*shape):
    return torch.randn(*shape, dtype=D64, requires_grad=True)


def test_gradcheck_logit_losses():
    s, t = req(3, 5), req(3, 5)
    y = torch.tensor([0, 4, 2])
    assert torch.autograd.gradcheck(lambda a: M.kd_loss(a, t.detach()), (s,))
    assert torch.autograd.gradcheck(lambda a, b: M.dkd_loss(a, b, y), (s, t))
    assert torch.autograd.gradcheck(lambda a: M.dkd_loss(a, t.detach(), y), (s,))
    assert torch.autograd.gradcheck(lambda a, b: M.dist_loss(a, b, tau=2.0), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: M.dml_loss([a, b], detach_peers=False)[0], (s, t))
    assert torch.autograd.gradcheck(lambda a: M.bss_loss(a, t.detach()), (s,))


def test_gradcheck_feature_losses():
    assert torch.autograd.gradcheck(M.fitnet_loss, (req(2, 2, 3, 3), req(2, 2, 3, 3)))
    assert torch.autograd.gradcheck(M.at_loss, (req(2, 3, 3, 3), req(2, 2, 3, 3)))
    assert torch.autograd.gradcheck(lambda a, b: M.at_loss(a.abs() + 0.1, b.abs() + 0.1, p=3),
                                    (req(2, 3, 2, 2), req(2, 2, 2, 2)))
    assert torch.autograd.gradcheck(lambda a, b, c, d: M.fsp_loss((a, b), (c, d)),
                                    (req(2, 2, 4, 4), req(2, 3, 2, 2), req(2, 2, 4, 4), req(2, 3, 2, 2)))
    assert torch.autograd.gradcheck(M.nst_loss, (req(2, 2, 3, 3), req(2, 3, 3, 3)))


def test_gradcheck_relational_losses():
    assert torch.autograd.gradcheck(M.sp_loss, (req(4, 2, 2, 2), req(4, 3)))
    assert torch.autograd.gradcheck(M.pkt_loss, (req(4, 3), req(4, 5)))
    assert torch.autograd.gradcheck(lambda a, b: M.rkd_loss(a, b, angle_chunk=2), (req(4, 3), req(4, 5)))
    assert torch.autograd.gradcheck(M.cc_loss, (req(4, 3), req(4, 5)))
    assert torch.autograd.gradcheck(M.crd_inbatch_loss, (req(4, 3), req(4, 3)))
    mem = M.CRDMemory(12, 3, generator=torch.Generator().manual_seed(0)).double()
    index = torch.tensor([1, 7, 4])
    idx = M.crd_sample_indices(index, 12, 5, torch.Generator().manual_seed(0))
    M.crd_loss(torch.randn(3, 3, dtype=D64), torch.randn(3, 3, dtype=D64), index, mem, idx, update=False)  # sets Z
    assert torch.autograd.gradcheck(lambda a, b: M.crd_loss(a, b, index, mem, idx, tau=0.5, update=False),
                                    (req(3, 3), req(3, 3)))


# ---------------------------------------------------------------------------------------------
# degenerate batches, NaN, bad inputs
# ---------------------------------------------------------------------------------------------
RELATIONAL = {
    "sp": lambda s, t: M.sp_loss(s, t),
    "pkt": lambda s, t: M.pkt_loss(s, t),
    "rkd": lambda s, t: M.rkd_loss(s, t),
    "rkd_angle": lambda s, t: M.rkd_angle_loss(s, t),
    "cc": lambda s, t: M.cc_loss(s, t),
    "crd_inbatch": lambda s, t: M.crd_inbatch_loss(s, t[:, :4]),
    "dist": lambda s, t: M.dist_loss(s, t[:, :4], gamma=1.0, beta=0.0),
}


@pytest.mark.parametrize("name", sorted(RELATIONAL))
@pytest.mark.parametrize("dtype", [D64, torch.float32, torch.bfloat16])
def test_single_sample_batch_is_exactly_zero(name, dtype):
    s = torch.randn(1, 4, dtype=dtype, requires_grad=True)
    t = torch.randn(1, 6, dtype=dtype, requires_grad=True)
    loss = RELATIONAL[name](s, t)
    assert loss.dtype == dtype and loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("name", sorted(RELATIONAL))
def test_nan_propagates(name):
    for b in (1, 4):
        s, t = torch.randn(b, 4), torch.randn(b, 6)
        s[0, 1] = float("nan")
        assert torch.isnan(RELATIONAL[name](s, t))


def test_nan_propagates_other_losses():
    s, t = logits(3, 4, dtype=torch.float32)
    s[1, 2] = float("nan")
    y = torch.tensor([0, 1, 2])
    assert torch.isnan(M.dkd_loss(s, t, y)) and torch.isnan(M.kd_loss(s, t)) and torch.isnan(M.dist_loss(s, t))
    m = torch.randn(2, 3, 4, 4)
    m2 = m.clone()
    m2[0, 0, 0, 0] = float("nan")
    assert torch.isnan(M.at_loss(m2, m)) and torch.isnan(M.nst_loss(m2, m)) and torch.isnan(M.fitnet_loss(m2, m))


LABELS3 = torch.zeros(3, dtype=torch.long)

BAD_BATCH = [
    ("kd", lambda: M.kd_loss(torch.randn(3, 4), torch.randn(2, 4)), "teacher_logits|student_logits"),
    ("dkd", lambda: M.dkd_loss(torch.randn(3, 4), torch.randn(2, 4), LABELS3), "teacher_logits"),
    ("dkd_target", lambda: M.dkd_loss(torch.randn(3, 4), torch.randn(3, 4), LABELS3[:2]), "target"),
    ("dist", lambda: M.dist_loss(torch.randn(3, 4), torch.randn(3, 5)), "classes"),
    ("dml", lambda: M.dml_loss([torch.randn(3, 4), torch.randn(2, 4)]), r"logits_list\[1\]"),
    ("fitnet", lambda: M.fitnet_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)), "student_map_regressed"),
    ("at", lambda: M.at_loss(torch.randn(2, 3, 4, 2), torch.randn(2, 3, 2, 4)), "cannot be pooled"),
    ("nst", lambda: M.nst_loss(torch.randn(2, 3, 4, 2), torch.randn(2, 3, 2, 4)), "cannot be pooled"),
    ("at_batch", lambda: M.at_loss([torch.randn(2, 3, 4, 4)], [torch.randn(3, 3, 4, 4)]), r"teacher_maps\[0\]"),
    ("fsp", lambda: M.fsp_loss((torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)),
                               (torch.randn(2, 2, 4, 4), torch.randn(2, 4, 4, 4))), "channel"),
    ("nst", lambda: M.nst_loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4)), "teacher_map"),
    ("sp", lambda: M.sp_loss(torch.randn(2, 3), torch.randn(3, 3)), "teacher_feats"),
    ("pkt", lambda: M.pkt_loss(torch.randn(2, 3), torch.randn(3, 3)), "f_t"),
    ("rkd", lambda: M.rkd_loss(torch.randn(2, 3), torch.randn(3, 3)), "f_t"),
    ("cc", lambda: M.cc_loss(torch.randn(2, 3), torch.randn(3, 3)), "emb_t"),
    ("crd_inbatch", lambda: M.crd_inbatch_loss(torch.randn(2, 3), torch.randn(3, 3)), "emb_t"),
    ("crd_width", lambda: M.crd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), M.CRDMemory(5, 4)),
     "emb_s"),
]

BAD_NDIM = [
    ("dkd", lambda: M.dkd_loss(torch.randn(3, 4, 2), torch.randn(3, 4, 2), LABELS3), "student_logits"),
    ("dist", lambda: M.dist_loss(torch.randn(4), torch.randn(4)), "student_logits"),
    ("at", lambda: M.at_loss(torch.randn(2, 16), torch.randn(2, 16)), "student_maps"),
    ("fsp", lambda: M.fsp_loss((torch.randn(2, 3, 4), torch.randn(2, 3, 4)),
                               (torch.randn(2, 3, 4), torch.randn(2, 3, 4))), "student_pairs"),
    ("nst", lambda: M.nst_loss(torch.randn(2, 16), torch.randn(2, 3, 4, 4)), "student_map"),
    ("sp", lambda: M.sp_loss(torch.randn(3), torch.randn(3, 2)), "student_feats"),
    ("pkt", lambda: M.pkt_loss(torch.randn(3, 2, 2), torch.randn(3, 2)), "f_s"),
    ("rkd", lambda: M.rkd_loss(torch.randn(3, 2), torch.randn(3)), "f_t"),
    ("cc", lambda: M.cc_loss(torch.randn(3), torch.randn(3, 2)), "emb_s"),
    ("crd_inbatch", lambda: M.crd_inbatch_loss(torch.randn(3, 2), torch.randn(3, 2, 1)), "emb_t"),
]


@pytest.mark.parametrize("case", BAD_BATCH + BAD_NDIM,
                         ids=[f"batch-{c[0]}" for c in BAD_BATCH] + [f"ndim-{c[0]}" for c in BAD_NDIM])
def test_bad_input_raises_value_error_naming_the_argument(case):
    _, fn, name = case
    with pytest.raises(ValueError, match=name):
        fn()


def test_other_bad_inputs():
    with pytest.raises(TypeError, match="student_logits"):
        M.dist_loss(torch.ones(2, 3, dtype=torch.long), torch.randn(2, 3))
    with pytest.raises(TypeError, match="target"):
        M.dkd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="at least 2 classes"):
        M.dkd_loss(torch.randn(2, 1), torch.randn(2, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        M.dkd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="K >= 2"):
        M.dml_loss([torch.randn(2, 3)])
    with pytest.raises(ValueError, match="empty batch"):
        M.pkt_loss(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="p must be"):
        M.at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), p=0)
    with pytest.raises(ValueError, match="pair up"):
        M.at_loss([torch.randn(2, 3, 4, 4)], [])
    with pytest.raises(ValueError, match="momentum"):
        M.CRDMemory(10, 4, momentum=1.0)
    with pytest.raises(ValueError, match="contrast_idx"):
        M.crd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]), M.CRDMemory(5, 4),
                   contrast_idx=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher must return"):
        M.bss_attack(lambda x: x.sum(), torch.randn(2, 3), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------
# dtypes: fp32 / bf16 / mixed inputs, fp32-or-better math, result in the inputs' precision
# ---------------------------------------------------------------------------------------------
def _all_losses():
    y = torch.tensor([0, 3, 2, 1, 4, 0])
    mem = M.CRDMemory(30, 4, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 4, 8, 12, 16, 20])
    idx = M.crd_sample_indices(index, 30, 7, torch.Generator().manual_seed(0))
    return {
        "kd": ((6, 5), (6, 5), lambda s, t: M.kd_loss(s, t)),
        "dkd": ((6, 5), (6, 5), lambda s, t: M.dkd_loss(s, t, y)),
        "dist": ((6, 5), (6, 5), lambda s, t: M.dist_loss(s, t)),
        "dml": ((6, 5), (6, 5), lambda s, t: M.dml_loss([s, t])[0]),
        "bss": ((6, 5), (6, 5), lambda s, t: M.bss_loss(s, t)),
        "fitnet": ((6, 2, 3, 3), (6, 2, 3, 3), lambda s, t: M.fitnet_loss(s, t)),
        "at": ((6, 2, 3, 3), (6, 3, 3, 3), lambda s, t: M.at_loss(s, t)),
        "fsp": ((6, 2, 4, 4), (6, 2, 4, 4), lambda s, t: M.fsp_loss((s, s[:, :, ::2, ::2]), (t, t[:, :, ::2, ::2]))),
        "nst": ((6, 2, 3, 3), (6, 3, 3, 3), lambda s, t: M.nst_loss(s, t)),
        "sp": ((6, 2, 3, 3), (6, 3, 2, 2), lambda s, t: M.sp_loss(s, t)),
        "pkt": ((6, 4), (6, 5), lambda s, t: M.pkt_loss(s, t)),
        "rkd": ((6, 4), (6, 5), lambda s, t: M.rkd_loss(s, t)),
        "cc": ((6, 4), (6, 5), lambda s, t: M.cc_loss(s, t)),
        "crd": ((6, 4), (6, 4), lambda s, t: M.crd_loss(s, t, index, mem, idx, update=False)),
        "crd_inbatch": ((6, 4), (6, 4), lambda s, t: M.crd_inbatch_loss(s, t)),
    }


LOSSES = _all_losses()


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float64)],
                         ids=["fp32", "bf16", "bf16+fp32", "fp16+fp64"])
def test_dtypes(name, dtypes):
    s_shape, t_shape, fn = LOSSES[name]
    gen = torch.Generator().manual_seed(7)
    s64 = torch.randn(*s_shape, generator=gen, dtype=D64)
    t64 = torch.randn(*t_shape, generator=gen, dtype=D64)
    s = s64.to(dtypes[0]).requires_grad_(True)
    t = t64.to(dtypes[1])
    loss = fn(s, t)
    assert loss.dtype == torch.promote_types(*dtypes)
    # the same inputs (rounded to their dtypes) in fp64 give the same value up to the math precision
    ref = fn(s.detach().double(), t.double())
    tol = 1e-5 if loss.dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol * 1e-2)
    loss.backward()
    assert s.grad.dtype == dtypes[0] and torch.isfinite(s.grad).all()

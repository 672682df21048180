"""Loss forward+backward of every method of the zoo at batch 256 and 4096, beside an eager twin.

The twin is the loss as its reference implementation writes it in plain PyTorch (RepDistiller,
mdistiller, the DIST authors), materialising whatever it materialises. Providers: ``zoo`` (the
function of :mod:`mlkd_fast.methods`, on the fused kernels where the method is a KL over logits:
kd, dkd, dml) and ``eager``. Inputs: logits (B, 1000), pooled features (B, 512), stage maps
(B, 32, 8, 8). Run: ``python -m pytest benchmarks/test_bench_methods.py --benchmark-json
benchmarks/results/cpu_methods.json``; ``MLKD_BENCH_TINY=1`` shrinks the batch to 32 (CI).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from mlkd_fast import methods as M

from test_bench_losses import DEVICES, measure

TINY = os.environ.get("MLKD_BENCH_TINY") == "1"
BATCHES = [32] if TINY else [256, 4096]
CLASSES, FEATURES, MAP = (10, 16, (4, 4, 4)) if TINY else (1000, 512, (32, 8, 8))
T = 4.0


# ---- eager twins: the reference implementations' formulas, written the way they write them ----
def eager_kd(s, t):
    return F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T


def eager_dkd(s, t, y, alpha=1.0, beta=8.0):
    gt = torch.zeros_like(s).scatter_(1, y[:, None], 1).bool()
    p_s, p_t = F.softmax(s / T, 1), F.softmax(t / T, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * T * T / s.shape[0]
    nckd = F.kl_div(F.log_softmax(s / T - 1000.0 * gt, 1), F.softmax(t / T - 1000.0 * gt, 1),
                    reduction="sum") * T * T / s.shape[0]
    return alpha * tckd + beta * nckd


def eager_dist(s, t, tau=1.0):
    y_s, y_t = F.softmax(s / tau, 1), F.softmax(t / tau, 1)

    def pearson(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return F.cosine_similarity(a, b, dim=1, eps=1e-8)

    return tau * tau * ((1 - pearson(y_s, y_t).mean()) + (1 - pearson(y_s.t(), y_t.t()).mean()))


def eager_dml(s, t):
    return F.kl_div(F.log_softmax(s, 1), F.softmax(t.detach(), 1), reduction="batchmean")


def _attention(f):
    return F.normalize(f.pow(2).mean(1).view(f.shape[0], -1))


def eager_at(f_s, f_t):
    return (_attention(f_s) - _attention(f_t)).pow(2).mean()


def eager_nst(f_s, f_t):
    f_s, f_t = F.normalize(f_s.flatten(2), dim=2), F.normalize(f_t.flatten(2), dim=2)
    poly = lambda a, b: (a @ b.transpose(1, 2)).pow(2).mean()  # noqa: E731
    return poly(f_t, f_t) + poly(f_s, f_s) - 2 * poly(f_s, f_t)


def eager_fsp(f_s, f_t):
    gram = lambda a, b: torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / a[0, 0].numel()  # noqa: E731
    return (gram(f_s, f_s) - gram(f_t, f_t)).pow(2).mean()


def eager_sp(f_s, f_t):
    g_s = F.normalize(f_s.view(f_s.shape[0], -1) @ f_s.view(f_s.shape[0], -1).t())
    g_t = F.normalize(f_t.view(f_t.shape[0], -1) @ f_t.view(f_t.shape[0], -1).t())
    return (g_s - g_t).pow(2).sum() / f_s.shape[0] ** 2


def eager_pkt(f_s, f_t, eps=1e-7):
    def probs(x):
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        k = (x @ x.t() + 1.0) / 2.0
        return k / k.sum(1, keepdim=True)

    p_s, p_t = probs(f_s), probs(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _eager_pdist(e):
    d = (e.pow(2).sum(1)[:, None] + e.pow(2).sum(1)[None] - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
    d = d.clone()
    d[range(len(e)), range(len(e))] = 0
    return d / d[d > 0].mean()


def eager_rkd_distance(f_s, f_t):
    return F.smooth_l1_loss(_eager_pdist(f_s), _eager_pdist(f_t))


def eager_cc(e_s, e_t, gamma=0.4):
    def kernel(e):  # the Gaussian RBF to order 2 in the dot products
        g = e @ e.t()
        return torch.exp(torch.tensor(-2 * gamma)) * (1 + 2 * gamma * g + 2 * gamma ** 2 * g * g)

    return (kernel(e_t) - kernel(e_s)).pow(2).sum() / e_s.shape[0] ** 2


def eager_rkd(f_s, f_t):
    dist = _eager_pdist

    def angle(e):
        v = F.normalize(e[None] - e[:, None], p=2, dim=2)
        return torch.bmm(v, v.transpose(1, 2)).view(-1)

    return 25 * F.smooth_l1_loss(dist(f_s), dist(f_t)) + 50 * F.smooth_l1_loss(angle(f_s), angle(f_t))


def eager_crd_inbatch(e_s, e_t, tau=0.07):
    logits = F.normalize(e_s, dim=1) @ F.normalize(e_t, dim=1).t() / tau
    labels = torch.arange(e_s.shape[0], device=e_s.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


# (inputs, zoo function, eager twin); inputs: "logits", "labels", "feats", "maps"
CASES = {
    "kd": ("logits", lambda s, t, y: M.kd_loss(s, t, T), lambda s, t, y: eager_kd(s, t)),
    "dkd": ("logits", lambda s, t, y: M.dkd_loss(s, t, y), eager_dkd),
    "dist": ("logits", lambda s, t, y: M.dist_loss(s, t), lambda s, t, y: eager_dist(s, t)),
    "dml": ("logits", lambda s, t, y: M.dml_loss([s, t])[0], lambda s, t, y: eager_dml(s, t)),
    "at": ("maps", lambda s, t: M.at_loss(s, t), eager_at),
    "fitnet": ("maps", M.fitnet_loss, F.mse_loss),
    "fsp": ("maps", lambda s, t: M.fsp_loss([(s, s)], [(t, t)]), eager_fsp),
    "nst": ("maps", M.nst_loss, eager_nst),
    "sp": ("maps", M.sp_loss, eager_sp),
    "pkt": ("feats", M.pkt_loss, eager_pkt),
    "rkd": ("feats", M.rkd_loss, eager_rkd),
    "rkd_distance": ("feats", M.rkd_distance_loss, eager_rkd_distance),
    "cc": ("feats", M.cc_loss, eager_cc),
    "crd_inbatch": ("feats", M.crd_inbatch_loss, eager_crd_inbatch),
}


@pytest.mark.parametrize("provider", ["eager", "zoo"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(CASES))
def test_method_loss(benchmark, method, device, batch, provider):
    kind, zoo, eager = CASES[method]
    if method == "rkd" and batch > 1024 and device == "cpu":
        pytest.skip("rkd's angle term is O(B^3): 4096^3 angles take hours on 2 cores (the eager twin "
                    "would also hold a B^3 tensor, 275 GB in fp32)")
    benchmark.group = f"{method} fwd+bwd float32 B={batch} {device}"
    benchmark.extra_info.update(op=method, pass_="fwd+bwd", provider=provider, device=device, n=batch,
                                dtype="float32")
    gen = torch.Generator(device=device).manual_seed(0)
    shape = {"logits": (batch, CLASSES), "feats": (batch, FEATURES), "maps": (batch, *MAP)}[kind]
    s = torch.randn(shape, generator=gen, device=device, requires_grad=True)
    t = torch.randn(shape, generator=gen, device=device)
    fn = zoo if provider == "zoo" else eager
    args = (s, t, torch.randint(0, CLASSES, (batch,), generator=gen, device=device)) if kind == "logits" else (s, t)

    def step():
        return torch.autograd.grad(fn(*args), s)[0]

    measure(benchmark, step, device)

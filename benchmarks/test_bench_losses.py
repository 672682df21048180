"""Throughput and memory of the KD KL, the correlation KL and MLKDLoss end to end, every provider per shape.

Groups: ``<op> <pass> <dtype> <shape> <device>``, pass = ``fwd`` or ``fwd+bwd``. Providers:
``eager`` (what a user writes in plain PyTorch: for the KL ``F.kl_div`` of two ``log_softmax`` with
``log_target=True`` times T^2; for the correlation the explicit M x N matrices from ``F.normalize``
and ``mm``, the diagonal removed in square mode, ``log_softmax`` and ``kl_div``; for MLKDLoss the
same terms, with the module's own heads, written so), ``compile`` (torch.compile of that same
function), ``reference`` (this package's pure-PyTorch reference, ``backend="torch"``), ``triton``,
``native`` (C++ CPU or CUDA), ``liger`` (Liger-Kernel's KL when installed: log_softmax of both
inputs + its KL op; CUDA), and for MLKDLoss ``auto`` (the module with ``backend="auto"``). A provider
that cannot run here, or a shape marked GPU-only for this CPU (``CPU_ONLY_SKIPS``, with the reason),
is skipped with the reason.

The shapes are the training loop's (docs/design.md §5): the KL at (256..8192, 1000..32000) and a tiny
(64, 100) for the per-call overhead; the correlation at D in {128, 512, 2048} x B in {64, ..., 16384},
square (M = N = B) and the rotations' rectangle (rows: the 3B rotated views, columns: the B plain
views, no diagonal); MLKDLoss (CE + KD + correlation) and its paper preset
(``MLKDLoss.paper("imagenet", 512, 512)``, 4 views) at B = 256, C = 1000, D = 512, and MLKDLoss at the
tiny (64, 100, 512). fp32 on CPU, bf16 on CUDA. Every row records ``auto_pick`` (whether this provider
is what ``backend="auto"`` runs for the shape) and, for the fused backends, the ``path``
(``mlkd_fast.explain``), which the report uses for its summary.

Run on CPU: ``python -m pytest benchmarks/test_bench_losses.py --benchmark-json benchmarks/results/cpu.json``
(an estimated 15-20 minutes on the 2-core development machine); on a GPU the same command times the CUDA shapes
(see benchmarks/gpu_pass.sh). Every result carries in ``extra_info``: the shape, ``bytes`` (KL: inputs
read once + gradient written once) or ``flops`` (correlation), ``peak_extra_mib`` (CUDA:
max_memory_allocated over the inputs; CPU: sampled peak RSS growth) and, on CUDA,
``device_median_ms`` timed with CUDA events (``triton.testing.do_bench``). ``python -m benchmarks.report``
turns the JSON into tables and plots. ``MLKD_BENCH_TINY=1`` shrinks every shape (CI runs the suite
that way so that it never rots).
"""
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import mlkd_fast
from mlkd_fast import backends
from mlkd_fast import functional as MF
from mlkd_fast import terms
from mlkd_fast.backends import backend_status

TINY = os.environ.get("MLKD_BENCH_TINY") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

KL_SHAPES = {"cpu": [(64, 100)] if TINY else [(64, 100), (256, 1000), (1024, 1000), (4096, 1000), (1024, 32000),
                                               (8192, 32000)],
             "cuda": [(64, 100)] if TINY else [(256, 1000), (1024, 1000), (4096, 1000), (8192, 32000),
                                               (16384, 131072)]}
# The forward alone is timed at the target shapes (docs/design.md §5); fwd+bwd everywhere.
KL_FWD = {"cpu": {(64, 100), (4096, 1000), (1024, 32000)}, "cuda": {(64, 100), (1024, 1000), (8192, 32000), (16384, 131072)}}

# Correlation cases: (rows M, columns N, D, mode); mode "square" (M = N = B, diagonal excluded) or
# "rotations" (M = 3B rotated views against N = B plain views, no diagonal).
BATCHES = (64, 256, 1024, 4096, 16384)
DIMS = (128, 512, 2048)


def _grid(batches, dims):
    return [case for d in dims for b in batches for case in ((b, b, d, "square"), (3 * b, b, d, "rotations"))]


CORR_CASES = {"cpu": [(64, 64, 16, "square"), (96, 32, 16, "rotations")] if TINY else _grid(BATCHES, DIMS),
              # beyond the loop's grid: the GPU memory targets (65536, eager out of memory) and D = 2048 at 16384
              "cuda": [(64, 64, 16, "square")] if TINY else _grid(BATCHES, DIMS)
              + [(65536, 65536, d, "square") for d in (128, 512)]}
CORR_FWD = {"cpu": {(4096, 4096, 128, "square")}, "cuda": {(m, n, d, "square") for m, n, d, _ in
                                                          [(4096, 4096, 128, 0), (16384, 16384, 128, 0),
                                                           (65536, 65536, 128, 0), (16384, 16384, 512, 0)]}}


# torch.compile on CUDA (tens of seconds of compilation per shape) at the GPU targets' shapes only
CUDA_COMPILE_CASES = {(m, m, d, "square") for d in (128, 512) for m in (4096, 16384, 65536)} | {(16384, 16384, 2048, "square")}


def corr_skip(device: str, provider: str, m: int, n: int, d: int, mode: str):
    """Why a (provider, correlation case) is not timed here, or None. The 2-core development machine
    (24 GiB) should run the whole suite in 15-20 minutes; what would not fit in that is GPU-only there."""
    if TINY:
        return None
    if device == "cuda":
        if provider == "compile" and (m, n, d, mode) not in CUDA_COMPILE_CASES:
            return "torch.compile on CUDA is timed at the GPU targets' shapes only (its compilation per shape)"
        return None
    if mode == "rotations" and n >= 16384:
        return ("GPU-only on this CPU: 49152 x 16384 matrices of 3 GiB each; eager holds about ten of them "
                "(beyond 24 GiB) and the fused path alone takes ~10 s a call at D = 128, minutes at 2048")
    if n >= 16384 and d >= 2048:
        return ("GPU-only on this CPU: eager takes ~20 s a call (four 16384^2 x 2048 matmuls at ~0.3 TFLOP/s "
                "and 1 GiB elementwise passes); a provider's rounds alone would exceed the suite's budget")
    if provider == "reference" and m * n > 1 << 24:
        return ("the reference materialises like eager (eager is the baseline): left out above 2^24 entries "
                "to keep the suite's time")
    if provider == "compile" and n >= 16384:
        return "torch.compile of eager at 16384 rows: ~10 s a call, left out to keep the suite's time"
    return None


def kl_skip(device: str, provider: str, n: int, c: int):
    if device == "cpu" and not TINY and provider == "reference" and n * c > 1 << 25:
        return "the reference at 8192 x 32000: ~10 s a call, left out to keep the suite's time"
    return None


# MLKDLoss end to end: (name, images B, classes C, feature width D).
MLKD_CASES = {"cpu": [("default", 8, 10, 16), ("paper", 8, 10, 16)] if TINY else
              [("default", 64, 100, 512), ("default", 256, 1000, 512), ("paper", 256, 1000, 512)],
              "cuda": [("default", 8, 10, 16)] if TINY else [("default", 256, 1000, 512), ("paper", 256, 1000, 512)]}

DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
KL_PROVIDERS = ["eager", "compile", "reference", "triton", "native", "liger"]
# native-tiled: the native backend with its CPU path forced to the fused tiles (MLKD_FAST_CORR_PATH=tiled)
# where auto takes the materialised one: the crossover of docs/design.md §5.1, measured in every run.
CORR_PROVIDERS = ["eager", "compile", "reference", "triton", "native", "native-tiled"]
MLKD_PROVIDERS = ["eager", "reference", "auto"]
PASSES = ["fwd", "fwd+bwd"]
# MLKD_BENCH_SET=headline times what the first GPU command of benchmarks/gpu_pass.sh must bring back
# (fwd+bwd of the three target KL shapes, the correlation at D = 128 and M = N >= 16384), =rest
# everything else, =all (default) both; the rooflines run in every set so that each file has its own peaks.
BENCH_SET = os.environ.get("MLKD_BENCH_SET", "all")
if BENCH_SET not in ("headline", "rest", "all"):
    raise ValueError(f"MLKD_BENCH_SET must be headline, rest or all, not {BENCH_SET!r}")
HEADLINE_KL = {(1024, 1000), (8192, 32000), (16384, 131072)}


def _headline(op: str, pass_: str, case: tuple, device: str) -> bool:
    if pass_ != "fwd+bwd":
        return False
    if TINY:
        return True
    if op == "kd_kl":
        return device == "cpu" or case in HEADLINE_KL
    if op == "mlkd":
        return False
    m, n, d, mode = case
    return mode == "square" and d == 128 and n >= 16384


def _cases(op: str, cases: dict, fwd: dict) -> list:
    return [(case, device, pass_) for device in DEVICES for case in cases[device] for pass_ in PASSES
            if (pass_ == "fwd+bwd" or (op != "mlkd" and (TINY or case in fwd[device])))
            and (BENCH_SET == "all" or (BENCH_SET == "headline") == _headline(op, pass_, case, device))]


TEMPERATURE = 4.0
TAU = 0.5


def _need(provider: str, device: str) -> None:
    if provider in ("triton", "native"):
        if provider == "triton" and device == "cpu":
            pytest.skip("Triton on CPU is its interpreter: a test tool, not a backend to time")
        status = backend_status(provider, device)
        if not status:
            pytest.skip(f"{provider} unavailable on {device}: {status.reason}")
    if provider == "liger":
        if device != "cuda":
            pytest.skip("Liger-Kernel runs on CUDA only")
        pytest.importorskip("liger_kernel", reason="Liger-Kernel is not installed")
    if provider == "compile" and TINY and device == "cpu" and os.environ.get("MLKD_BENCH_COMPILE") != "1":
        pytest.skip("torch.compile is left out of the tiny CPU run (set MLKD_BENCH_COMPILE=1)")


def eager_kd_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The temperature KL as a user writes it in plain PyTorch (the baseline every ratio is against)."""
    return F.kl_div(F.log_softmax(s / TEMPERATURE, 1), F.log_softmax(t / TEMPERATURE, 1), log_target=True,
                    reduction="batchmean") * TEMPERATURE * TEMPERATURE


def eager_correlation(a_s: torch.Tensor, a_t: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """The square correlation KL as a user writes it: both M x M cosine matrices, the diagonal removed."""
    m = a_s.shape[0]
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=a_s.device)
    n_s, n_t = F.normalize(a_s, dim=1), F.normalize(a_t, dim=1)
    # matmuls in the features' dtype (tensor cores for bf16), the softmaxes in fp32 as autocast would
    sim_s = (torch.mm(n_s, n_s.t()).float() / tau)[off_diagonal].view(m, m - 1)
    sim_t = (torch.mm(n_t, n_t.t()).float() / tau)[off_diagonal].view(m, m - 1)
    return F.kl_div(F.log_softmax(sim_s, 1), F.log_softmax(sim_t, 1), log_target=True, reduction="batchmean")


def eager_correlation_rect(a_s, a_t, b_s, b_t, tau: float = TAU) -> torch.Tensor:
    """The rotations' correlation as the MLKD authors write it: rotated rows against plain columns."""
    sim_s = torch.mm(F.normalize(a_s, dim=1), F.normalize(b_s, dim=1).t()).float() / tau
    sim_t = torch.mm(F.normalize(a_t, dim=1), F.normalize(b_t, dim=1).t()).float() / tau
    return F.kl_div(F.log_softmax(sim_s, 1), F.log_softmax(sim_t, 1), log_target=True, reduction="batchmean")


def kl_fn(provider: str):
    """loss(s, t) for a provider; the batchmean T^2 KL in each."""
    if provider == "liger":
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss

        kl = LigerKLDIVLoss(reduction="batchmean")
        return lambda s, t: kl(F.log_softmax(s / TEMPERATURE, -1), F.softmax(t / TEMPERATURE, -1)) * TEMPERATURE ** 2
    if provider in ("eager", "compile"):
        return torch.compile(eager_kd_kl) if provider == "compile" else eager_kd_kl
    backend = "torch" if provider == "reference" else provider
    return lambda s, t: MF.kd_kl_div(s, t, TEMPERATURE, backend=backend)


def corr_fn(provider: str, square: bool = True):
    """loss(rows_s, rows_t[, cols_s, cols_t]) for a provider."""
    if provider in ("eager", "compile"):
        fn = eager_correlation if square else eager_correlation_rect
        return torch.compile(fn) if provider == "compile" else fn
    backend = {"reference": "torch", "native-tiled": "native"}.get(provider, provider)
    return lambda *feats: MF.correlation_kl(*feats, tau=TAU, backend=backend)


def eager_supcon(emb_s, emb_t, labels, temperature: float):
    """SupCon as the MLKD authors' released code writes it (their SupConLoss on the stacked [student;
    teacher] embeddings: the detached row maximum, a 2N x 2N self mask and positive mask, 1e-7 inside the
    log of the denominator); equal in value to ``mlkd_fast.terms.supcon_loss`` (tests/test_mlkd_loss.py)."""
    feats = torch.cat([F.normalize(emb_s, dim=1), F.normalize(emb_t, dim=1)])
    n = feats.shape[0]
    dots = feats @ feats.T / temperature
    logits = dots - dots.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(n, dtype=feats.dtype, device=feats.device)
    mask = (labels[:, None] == labels[None, :]).to(feats.dtype) * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True) + 1e-7)
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def eager_mlkd(loss_fn, s, t, f_s, f_t, y):
    """The terms of ``loss_fn`` (an MLKDLoss) written in plain PyTorch with its own heads: CE, the eager KL,
    the eager correlation (square, or the rotations' rectangle, as the authors write it), the alignment
    (plain PyTorch in the package too) and SupCon as the authors write it."""
    w, views = loss_fn.weights, loss_fn.views
    b = s.shape[0] // views
    total = w["ce"] * F.cross_entropy(s[:b], y)
    if w["kd"]:
        total = total + w["kd"] * eager_kd_kl(s, t.detach())
    if w["corr"]:
        g = loss_fn.corr_head(f_s) if loss_fn.corr_head is not None else f_s
        f_td = f_t.detach()
        corr = eager_correlation(g, f_td, loss_fn.tau) if views == 1 else \
            eager_correlation_rect(g[b:], f_td[b:], g[:b], f_td[:b], loss_fn.tau)
        total = total + w["corr"] * corr
    if w["align"]:
        total = total + w["align"] * terms.feature_alignment(loss_fn.align_head(f_s), f_t.detach())
    if w["supcon"]:
        total = total + w["supcon"] * eager_supcon(loss_fn.supcon_student(f_s), loss_fn.supcon_teacher(f_t.detach()),
                                                   y.repeat(2 * views), loss_fn.supcon_temperature)
    return total


class PeakRss:
    """Peak resident-memory growth of this process while the block runs (sampled every ~1 ms)."""

    def __enter__(self):
        import psutil

        self._proc, self._stop = psutil.Process(), False
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def measure(benchmark, step, device: str) -> None:
    """Times ``step`` (CUDA events on GPU), records its peak extra memory, then lets
    pytest-benchmark time it too (synchronised, so its wall times are honest on GPU). A step slower
    than a second gets 3 rounds without a warm-up round (the first call already warmed it)."""
    try:
        t0 = time.perf_counter()
        step()  # warm-up: compilation, autotuning, caches
        warm_s = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            benchmark.extra_info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
            from triton.testing import do_bench

            benchmark.extra_info["device_median_ms"] = do_bench(step, warmup=25, rep=200, return_mode="median")
        else:
            try:
                with PeakRss() as rss:
                    step()
                benchmark.extra_info["peak_extra_mib"] = rss.mib
            except ImportError:
                benchmark.extra_info["peak_extra_mib"] = None
    except torch.cuda.OutOfMemoryError as exc:
        benchmark.extra_info["oom"] = True
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {str(exc).splitlines()[0]}")

    def synced():
        out = step()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    slow = warm_s > 1.0 and device == "cpu"
    benchmark.pedantic(synced, rounds=1 if TINY else (3 if slow else 5), iterations=1,
                       warmup_rounds=0 if TINY or slow else 1)


def measure_pass(benchmark, fn, inputs, backward: bool, device: str, wrt=None) -> None:
    """Times ``fn(*inputs)``: the forward alone (no autograd) or forward + the gradients of ``wrt``
    (default: the inputs that require grad)."""
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad] if wrt is None else wrt

    def step():
        loss = fn(*inputs)
        return torch.autograd.grad(loss, wrt) if backward else loss

    measure(benchmark, step if backward else torch.no_grad()(step), device)


def _record_choice(benchmark, provider: str, choice) -> None:
    """Whether this provider is what ``backend="auto"`` runs here, and the fused backends' path."""
    backend = {"reference": "torch", "native": "native", "triton": "triton"}.get(provider)
    benchmark.extra_info["auto_pick"] = backend is not None and backend == choice.backend
    if backend is not None and backend == choice.backend:
        benchmark.extra_info["path"] = choice.path


@pytest.mark.parametrize("provider", KL_PROVIDERS)
@pytest.mark.parametrize("shape_dev", _cases("kd_kl", KL_SHAPES, KL_FWD),
                         ids=lambda p: f"{p[0][0]}x{p[0][1]}-{p[1]}-{p[2]}")
def test_kd_kl(benchmark, provider, shape_dev):
    (n, c), device, pass_ = shape_dev
    _need(provider, device)
    reason = kl_skip(device, provider, n, c)
    if reason:
        pytest.skip(reason)
    dtype = DTYPES[device]
    elem = torch.finfo(dtype).bits // 8
    benchmark.group = f"kd_kl {pass_} {str(dtype)[6:]} {n}x{c} {device}"
    backward = pass_ == "fwd+bwd"
    benchmark.extra_info.update(op="kd_kl", pass_=pass_, provider=provider, device=device, n=n, c=c,
                                dtype=str(dtype)[6:], bytes=(3 if backward else 2) * n * c * elem)
    s = torch.randn(n, c, device=device, dtype=dtype, requires_grad=backward)
    t = torch.randn(n, c, device=device, dtype=dtype)
    _record_choice(benchmark, provider, mlkd_fast.explain(MF.kd_kl_div, s, t))
    measure_pass(benchmark, kl_fn(provider), (s, t), backward, device)


def _corr_id(p) -> str:
    (m, n, d, mode), device, pass_ = p
    return f"{mode}-{m}x{n}xD{d}-{device}-{pass_}"


@pytest.mark.parametrize("provider", CORR_PROVIDERS)
@pytest.mark.parametrize("case_dev", _cases("correlation", CORR_CASES, CORR_FWD), ids=_corr_id)
def test_correlation(benchmark, provider, case_dev, monkeypatch):
    (m, n, d, mode), device, pass_ = case_dev
    _need("native" if provider == "native-tiled" else provider, device)
    reason = corr_skip(device, provider, m, n, d, mode)
    if reason:
        pytest.skip(reason)
    if provider == "native-tiled":
        if device != "cpu" or m * n > backends.DENSE_MAX_ENTRIES:
            pytest.skip("the tiled path is forced only where the CPU's native correlation is materialised")
        monkeypatch.setattr(backends, "CORRELATION_PATH", "tiled")
    dtype = DTYPES[device]
    backward = pass_ == "fwd+bwd"
    square = mode == "square"
    # useful flops: S_s and S_t (2 * 2MND); the backward recomputes them and forms dA, dB (4MND more + 4MND)
    flops = 4 * m * n * d * (3 if backward else 1)
    shape = f"M=N={m} D={d}" if square else f"M={m} N={n} D={d}"
    benchmark.group = f"correlation {pass_} {str(dtype)[6:]} {shape} {device}"
    benchmark.extra_info.update(op="correlation", pass_=pass_, provider=provider, device=device, m=m, n=n, d=d,
                                mode=mode, dtype=str(dtype)[6:], flops=flops)
    feats = [torch.randn(m, d, device=device, dtype=dtype, requires_grad=backward), torch.randn(m, d, device=device, dtype=dtype)]
    if not square:
        feats += [torch.randn(n, d, device=device, dtype=dtype, requires_grad=backward),
                  torch.randn(n, d, device=device, dtype=dtype)]
    choice = mlkd_fast.explain(MF.correlation_kl, *feats)
    _record_choice(benchmark, provider, choice)
    if provider == "native-tiled":
        benchmark.extra_info["path"] = choice.path
    if provider == "native" and choice.path == "dense" and backward:
        # the stored gradient operand: from the output block cache after the first call, so the sampled RSS
        # growth of the timed calls does not show it
        benchmark.extra_info["held_mib"] = m * n * 4 / 2 ** 20
    measure_pass(benchmark, corr_fn(provider, square), feats, backward, device)


def _mlkd_id(p) -> str:
    (name, b, c, d), device, pass_ = p
    return f"{name}-B{b}-C{c}-D{d}-{device}-{pass_}"


@pytest.mark.parametrize("provider", MLKD_PROVIDERS)
@pytest.mark.parametrize("case_dev", _cases("mlkd", MLKD_CASES, {"cpu": set(), "cuda": set()}), ids=_mlkd_id)
def test_mlkd_loss(benchmark, provider, case_dev):
    """MLKDLoss forward + backward (to the logits, the features and the loss's heads), end to end."""
    (name, b, c, d), device, pass_ = case_dev
    dtype = DTYPES[device]
    torch.manual_seed(0)
    backend = {"reference": "torch", "auto": "auto"}.get(provider, "torch")
    loss_fn = (mlkd_fast.MLKDLoss.paper("imagenet", d, d, backend=backend) if name == "paper"
               else mlkd_fast.MLKDLoss(backend=backend)).to(device)
    rows = b * loss_fn.views
    benchmark.group = f"mlkd {pass_} {str(dtype)[6:]} {name} B={b} C={c} D={d} {device}"
    benchmark.extra_info.update(op="mlkd", pass_=pass_, provider=provider, device=device, preset=name, b=b, c=c, d=d,
                                views=loss_fn.views, dtype=str(dtype)[6:])
    s = torch.randn(rows, c, device=device, dtype=dtype, requires_grad=True)
    t = torch.randn(rows, c, device=device, dtype=dtype)
    f_s = torch.randn(rows, d, device=device, dtype=dtype, requires_grad=True)
    f_t = torch.randn(rows, d, device=device, dtype=dtype)
    y = torch.randint(0, c, (b,), device=device)
    benchmark.extra_info["auto_pick"] = provider == "auto"
    fn = (lambda *x: eager_mlkd(loss_fn, *x)) if provider == "eager" else loss_fn
    ctx = torch.autocast(device, dtype=dtype) if device == "cuda" else torch.autocast(device, enabled=False)
    inputs, wrt = (s, t, f_s, f_t, y), [s, f_s, *loss_fn.parameters()]
    with ctx:
        measure_pass(benchmark, fn, inputs, True, device, wrt=wrt)
        if provider == "auto" and not TINY:
            paired(benchmark, lambda: torch.autograd.grad(eager_mlkd(loss_fn, *inputs), wrt),
                   lambda: torch.autograd.grad(loss_fn(*inputs), wrt), device)


def paired(benchmark, eager_step, step, device: str, pairs: int = 7) -> None:
    """eager and this provider timed alternately, ``pairs`` times each, in the same test: their ratio
    (``paired_vs_eager``, medians) is what the report shows for end-to-end groups, where the two differ
    by a few percent and separate tests would compare the machine's noise (other jobs on 2 cores)."""
    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    eager_step()
    times = [(timed(eager_step), timed(step)) for _ in range(pairs)]
    e = sorted(x for x, _ in times)[pairs // 2]
    a = sorted(x for _, x in times)[pairs // 2]
    benchmark.extra_info.update(paired_eager_ms=e * 1e3, paired_ms=a * 1e3, paired_vs_eager=e / a)


@pytest.mark.parametrize("device", DEVICES)
def test_roofline_copy_bandwidth(benchmark, device):
    """Device-to-device copy (bytes read + written) in the same run as the loss timings."""
    nbytes = (8 << 20) if TINY else ((1 << 30) if device == "cuda" else (256 << 20))
    x = torch.randn(nbytes // 4, device=device)
    y = torch.empty_like(x)
    benchmark.group = f"roofline copy {device}"
    benchmark.extra_info.update(op="copy", provider="torch", device=device, bytes=2 * nbytes)
    measure(benchmark, lambda: y.copy_(x), device)


@pytest.mark.parametrize("device", DEVICES)
def test_roofline_matmul(benchmark, device):
    """Dense matmul peak (bf16 on CUDA, fp32 on CPU) for the correlation's TFLOP/s fraction."""
    n = 256 if TINY else (8192 if device == "cuda" else 2048)
    dtype = DTYPES[device]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    benchmark.group = f"roofline matmul {device}"
    benchmark.extra_info.update(op="matmul", provider="torch", device=device, n=n, dtype=str(dtype)[6:],
                                flops=2 * n ** 3)
    measure(benchmark, lambda: a @ b, device)

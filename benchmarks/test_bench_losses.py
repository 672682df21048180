"""Throughput and memory of the KD KL and the correlation KL, every provider on one shape per group.

Groups: ``<op> <pass> <dtype> <shape> <device>``, pass = ``fwd`` or ``fwd+bwd``. Providers:
``eager`` (what a user writes in plain PyTorch: for the KL ``F.kl_div`` of two ``log_softmax`` with
``log_target=True`` times T^2; for the correlation the explicit M x N matrices from ``F.normalize``
and ``mm``, the diagonal removed, ``log_softmax`` and ``kl_div``), ``compile`` (torch.compile of that
same function), ``reference`` (this package's pure-PyTorch reference, ``backend="torch"``),
``triton``, ``native`` (C++ CPU or CUDA), ``liger`` (Liger-Kernel's KL when installed: log_softmax of
both inputs + its KL op; CUDA). A provider that cannot run here is skipped with the reason.

Run on CPU: ``python -m pytest benchmarks --benchmark-json benchmarks/results/cpu.json``; on a GPU
the same command times the CUDA shapes (docs/design.md §5) too (see benchmarks/gpu_pass.sh). Every result
carries in ``extra_info``: the shape, ``bytes`` (KL: inputs read once + gradient written once) or
``flops`` (correlation), ``peak_extra_mib`` (CUDA: max_memory_allocated over the inputs; CPU:
sampled peak RSS growth) and, on CUDA, ``device_median_ms`` timed with CUDA events
(``triton.testing.do_bench``). ``python -m benchmarks.report`` turns the JSON into tables and plots.
``MLKD_BENCH_TINY=1`` shrinks every shape (CI runs the suite that way so that it never rots).
"""
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from mlkd_fast import functional as MF
from mlkd_fast.backends import backend_status

TINY = os.environ.get("MLKD_BENCH_TINY") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

KL_SHAPES = {"cpu": [(64, 100)] if TINY else [(4096, 1000), (1024, 32000)],
             "cuda": [(64, 100)] if TINY else [(1024, 1000), (8192, 32000), (16384, 131072)]}
CORR_SIZES = {"cpu": [(64, 16)] if TINY else [(4096, 128)],
              # D = 2048 (a ResNet-50 teacher's width): wider than the fused Triton kernels hold, so their
              # tiled path (cuBLAS tiles) against the native fused kernel
              "cuda": [(64, 16)] if TINY else [(m, d) for d in (128, 512) for m in (4096, 16384, 65536)]
              + [(16384, 2048)]}
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
KL_PROVIDERS = ["eager", "compile", "reference", "triton", "native", "liger"]
CORR_PROVIDERS = ["eager", "compile", "reference", "triton", "native"]
PASSES = ["fwd", "fwd+bwd"]
# MLKD_BENCH_SET=headline times what the first GPU command of benchmarks/gpu_pass.sh must bring back
# (fwd+bwd of every KL shape, the correlation at D = 128 and M = N >= 16384), =rest everything else,
# =all (default) both; the rooflines run in every set so that each file has its own peaks.
BENCH_SET = os.environ.get("MLKD_BENCH_SET", "all")
if BENCH_SET not in ("headline", "rest", "all"):
    raise ValueError(f"MLKD_BENCH_SET must be headline, rest or all, not {BENCH_SET!r}")


def _headline(op: str, pass_: str, size: tuple, device: str) -> bool:
    if pass_ != "fwd+bwd":
        return False
    if TINY or op == "kd_kl":
        return True
    return size[1] == 128 and size[0] >= 16384


def _cases(op: str, sizes: dict) -> list:
    return [(size, device, pass_) for device in DEVICES for size in sizes[device] for pass_ in PASSES
            if BENCH_SET == "all" or (BENCH_SET == "headline") == _headline(op, pass_, size, device)]
TEMPERATURE = 4.0


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


def eager_correlation(a_s: torch.Tensor, a_t: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """The square correlation KL as a user writes it: both M x M cosine matrices, the diagonal removed."""
    m = a_s.shape[0]
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=a_s.device)
    n_s, n_t = F.normalize(a_s, dim=1), F.normalize(a_t, dim=1)
    # matmuls in the features' dtype (tensor cores for bf16), the softmaxes in fp32 as autocast would
    sim_s = (torch.mm(n_s, n_s.t()).float() / tau)[off_diagonal].view(m, m - 1)
    sim_t = (torch.mm(n_t, n_t.t()).float() / tau)[off_diagonal].view(m, m - 1)
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


def corr_fn(provider: str):
    if provider in ("eager", "compile"):
        return torch.compile(eager_correlation) if provider == "compile" else eager_correlation
    backend = "torch" if provider == "reference" else provider
    return lambda a_s, a_t: MF.correlation_kl(a_s, a_t, tau=0.5, backend=backend)


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
    pytest-benchmark time it too (synchronised, so its wall times are honest on GPU)."""
    try:
        step()  # warm-up: compilation, autotuning, caches
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

    benchmark.pedantic(synced, rounds=1 if TINY else 5, iterations=1, warmup_rounds=0 if TINY else 1)


def measure_pass(benchmark, fn, student, teacher, backward: bool, device: str) -> None:
    """Times ``fn(student, teacher)``: the forward alone (no autograd) or forward + the student's gradient."""
    def step():
        loss = fn(student, teacher)
        return torch.autograd.grad(loss, student)[0] if backward else loss

    measure(benchmark, step if backward else torch.no_grad()(step), device)


@pytest.mark.parametrize("provider", KL_PROVIDERS)
@pytest.mark.parametrize("shape_dev", _cases("kd_kl", KL_SHAPES),
                         ids=lambda p: f"{p[0][0]}x{p[0][1]}-{p[1]}-{p[2]}")
def test_kd_kl(benchmark, provider, shape_dev):
    (n, c), device, pass_ = shape_dev
    _need(provider, device)
    dtype = DTYPES[device]
    elem = torch.finfo(dtype).bits // 8
    benchmark.group = f"kd_kl {pass_} {str(dtype)[6:]} {n}x{c} {device}"
    backward = pass_ == "fwd+bwd"
    benchmark.extra_info.update(op="kd_kl", pass_=pass_, provider=provider, device=device, n=n, c=c,
                                dtype=str(dtype)[6:], bytes=(3 if backward else 2) * n * c * elem)
    s = torch.randn(n, c, device=device, dtype=dtype, requires_grad=backward)
    t = torch.randn(n, c, device=device, dtype=dtype)
    measure_pass(benchmark, kl_fn(provider), s, t, backward, device)


@pytest.mark.parametrize("provider", CORR_PROVIDERS)
@pytest.mark.parametrize("size_dev", _cases("correlation", CORR_SIZES),
                         ids=lambda p: f"{p[0][0]}xD{p[0][1]}-{p[1]}-{p[2]}")
def test_correlation(benchmark, provider, size_dev):
    (m, d), device, pass_ = size_dev
    _need(provider, device)
    dtype = DTYPES[device]
    backward = pass_ == "fwd+bwd"
    # useful flops: S_s and S_t tiles (2 * 2MND); the backward recomputes them and forms dA, dB (4MND more + 4MND)
    flops = 4 * m * m * d * (3 if backward else 1)
    benchmark.group = f"correlation {pass_} {str(dtype)[6:]} M=N={m} D={d} {device}"
    benchmark.extra_info.update(op="correlation", pass_=pass_, provider=provider, device=device, m=m, d=d,
                                dtype=str(dtype)[6:], flops=flops)
    a_s = torch.randn(m, d, device=device, dtype=dtype, requires_grad=backward)
    a_t = torch.randn(m, d, device=device, dtype=dtype)
    measure_pass(benchmark, corr_fn(provider), a_s, a_t, backward, device)


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

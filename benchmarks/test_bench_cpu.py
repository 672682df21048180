"""CPU throughput of the KL and the correlation, fwd+bwd, every available provider on one shape per
group. Run: ``python -m pytest benchmarks/test_bench_cpu.py --benchmark-json benchmarks/results/cpu.json``.

Providers: ``eager`` (the reference), ``compile`` (torch.compile of the reference), ``native`` (the
C++ CPU kernels). Triton is not timed on CPU (its interpreter is a test tool, not a backend to time).
"""
import os

import pytest
import torch

import mlkd_fast
from mlkd_fast import functional as MF

TINY = os.environ.get("MLKD_BENCH_TINY") == "1"
KL_SHAPES = [(64, 100)] if TINY else [(4096, 1000), (1024, 32000)]
CORR_SIZES = [(64, 16)] if TINY else [(4096, 128)]
PROVIDERS = ["eager", "compile", "native"]


def _kl_fn(provider):
    if provider == "native":
        return lambda s, t: MF.kd_kl_div(s, t, 4.0, backend="native")
    fn = lambda s, t: MF.kd_kl_div(s, t, 4.0, backend="torch")  # noqa: E731
    return torch.compile(fn) if provider == "compile" else fn


def _need(provider):
    if provider == "native" and not mlkd_fast.available_backends("cpu")["native"]:
        pytest.skip(mlkd_fast.available_backends("cpu")["native"].reason)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kd_kl_fwd_bwd(benchmark, provider, shape):
    _need(provider)
    benchmark.group = f"kd_kl fwd+bwd fp32 {shape[0]}x{shape[1]}"
    benchmark.extra_info.update(op="kd_kl", provider=provider, n=shape[0], c=shape[1], dtype="float32",
                                bytes=6 * shape[0] * shape[1] * 2, threads=torch.get_num_threads())
    s = torch.randn(shape, requires_grad=True)
    t = torch.randn(shape)
    fn = _kl_fn(provider)

    def step():
        loss = fn(s, t)
        (g,) = torch.autograd.grad(loss, s)
        return g

    step()  # warm-up (compilation)
    benchmark(step)


@pytest.mark.parametrize("provider", ["eager", "native"])
@pytest.mark.parametrize("size", CORR_SIZES, ids=lambda s: f"{s[0]}xD{s[1]}")
def test_correlation_fwd_bwd(benchmark, provider, size):
    _need(provider)
    n, d = size
    benchmark.group = f"correlation fwd+bwd fp32 M=N={n} D={d}"
    benchmark.extra_info.update(op="correlation", provider=provider, m=n, d=d, dtype="float32",
                                flops=2 * n * n * d * 2 * 4, threads=torch.get_num_threads())
    a_s = torch.randn(n, d, requires_grad=True)
    a_t = torch.randn(n, d)
    backend = "torch" if provider == "eager" else "native"

    def step():
        loss = MF.correlation_kl(a_s, a_t, backend=backend)
        (g,) = torch.autograd.grad(loss, a_s)
        return g

    step()
    benchmark(step)

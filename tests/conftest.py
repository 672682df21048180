"""Test setup: Triton runs under its interpreter on CPU-only machines.

TRITON_INTERPRET must be set before mlkd_fast (and so its kernels) is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mlkd_fast  # noqa: E402
from mlkd_fast.backends import backend_status  # noqa: E402

KERNEL_BACKENDS = ("triton", "native")
DEVICES = ("cpu", "cuda")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest |ref| (0 where both are NaN), in fp64."""
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    same_nan = torch.isnan(x) & torch.isnan(ref)
    diff = torch.where(same_nan, torch.zeros_like(x), (x - ref).abs())
    return float(diff.max() / ref.abs().nan_to_num(0).max().clamp_min(1e-30))


def require_backend(backend: str, device: str) -> None:
    """Skip (with the reason) when a backend cannot run on a device here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CPU twin of this test runs on CPU)")
    status = backend_status(backend, device)
    if not status:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {status.reason}")


@pytest.fixture(params=[(b, d) for d in DEVICES for b in KERNEL_BACKENDS], ids=lambda p: f"{p[0]}-{p[1]}")
def kernel_backend(request):
    backend, device = request.param
    require_backend(backend, device)
    return backend, torch.device(device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

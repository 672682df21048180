"""Test setup and fixtures; shared helpers are in tests/helpers.py (``from helpers import ...``).

Triton runs under its interpreter on CPU-only machines: TRITON_INTERPRET must be set before mlkd_fast
(and so its kernels) is imported.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/ on sys.path, so that the test files import helpers (and simt_emulator) under any import mode
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import mlkd_fast  # noqa: E402,F401
from helpers import BACKENDS, DEVICES, KERNEL_BACKENDS, backend_device_id, require_backend  # noqa: E402


@pytest.fixture(params=[(b, d) for d in DEVICES for b in BACKENDS], ids=backend_device_id)
def op_backend(request):
    """(backend, device) for every backend, the reference "torch" included, on CPU and CUDA (the CUDA
    ones skip with the reason without a GPU, as does a backend that cannot run here)."""
    backend, device = request.param
    require_backend(backend, device)
    return backend, torch.device(device)


@pytest.fixture(params=[(b, d) for d in DEVICES for b in KERNEL_BACKENDS], ids=backend_device_id)
def kernel_backend(request):
    """(backend, device) for the backends with fused kernels of their own (Triton, native): for what
    only they have (custom ops, stored gradients, compiled graphs)."""
    backend, device = request.param
    require_backend(backend, device)
    return backend, torch.device(device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

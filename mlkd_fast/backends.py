"""Which backends can run here, and which one an op uses (SPEC section 3).

Backends:
- ``torch``: the pure-PyTorch reference (:mod:`mlkd_fast.reference`); always available.
- ``triton``: the fused kernels of :mod:`mlkd_fast.kernels`; needs Triton and a CUDA device, or CPU
  tensors with ``TRITON_INTERPRET=1`` set before ``mlkd_fast`` is imported (slow; for testing).
- ``native``: the compiled ``csrc/`` extension: CUDA kernels for CUDA tensors, C++ kernels for CPU
  tensors.

``auto`` picks Triton, then native, on CUDA and native, then torch, on CPU. (Triton leads on CUDA
until the native CUDA kernels have been checked and timed on a GPU; its correlation is the fused
flash-style kernel, the native one cuBLAS tiles.) ``MLKD_FAST_BACKEND`` replaces ``auto`` (an
explicit ``backend=`` argument wins over the variable).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import _native

BACKENDS = ("torch", "triton", "native")
ENV_VAR = "MLKD_FAST_BACKEND"

try:  # Triton is optional (it is missing on macOS / Windows wheels of torch).
    from . import kernels as _kernels

    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the platform
    _kernels = None
    _TRITON_ERROR = f"triton could not be imported ({type(exc).__name__}: {exc})"


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on a device, and if not, why."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


def _interpreting() -> bool:
    return _kernels is not None and _kernels.INTERPRET


def backend_status(backend: str, device: Union[str, torch.device]) -> BackendStatus:
    """Status of one backend for tensors on ``device``."""
    device = torch.device(device)
    if backend == "torch":
        return BackendStatus(True, "pure PyTorch reference")
    if backend == "triton":
        if _kernels is None:
            return BackendStatus(False, _TRITON_ERROR or "triton missing")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return BackendStatus(False, "no CUDA GPU is available")
            return BackendStatus(True, "Triton kernels on CUDA")
        if device.type == "cpu":
            if _interpreting():
                return BackendStatus(True, "Triton interpreter on CPU (TRITON_INTERPRET=1; slow)")
            return BackendStatus(
                False,
                "Triton needs a CUDA GPU; on CPU only under TRITON_INTERPRET=1 set before "
                "importing mlkd_fast",
            )
        return BackendStatus(False, f"Triton does not run on device type {device.type!r}")
    if backend == "native":
        return _native.status(device)
    raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def available_backends(device: Union[str, torch.device, None] = None) -> dict[str, BackendStatus]:
    """Every backend's status on ``device`` (default: CUDA when present, else CPU).

    >>> {name: s.available for name, s in available_backends("cpu").items()}["torch"]
    True
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: backend_status(name, device) for name in BACKENDS}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend an op runs with; raises ValueError when the request cannot be met."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f" (from the environment variable {ENV_VAR})"
    else:
        source = ""
    if backend == "auto":
        order = ("triton", "native") if device.type == "cuda" else ("native", "torch")
        for name in order:
            if backend_status(name, device):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}{source}"
        )
    status = backend_status(backend, device)
    if not status:
        raise ValueError(f"backend {backend!r}{source} is not available on {device}: {status.reason}")
    return backend

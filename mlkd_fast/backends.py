"""The backend registry: which backends can run here, and which one an op uses (docs/design.md §3).

Every backend is one :class:`Backend` entry of :data:`REGISTRY` with the same per-row functions:
- ``kd_kl_rows(student, teacher, temperature, row_weight)`` -> ``w_i T^2 l_i`` (docs/design.md §1.1);
- ``correlation_rows(student_rows, teacher_rows, student_cols, teacher_cols, tau, exclude_diagonal)``
  -> ``l_i`` (docs/design.md §1.2);
and a status function saying whether it runs on a device, and why not.

- ``torch``: the pure-PyTorch reference (:mod:`mlkd_fast.reference`); always available.
- ``triton``: the fused kernels of :mod:`mlkd_fast.kernels`; needs Triton and a CUDA device, or CPU
  tensors with ``TRITON_INTERPRET=1`` set before ``mlkd_fast`` is imported (slow; for testing).
- ``native``: the compiled ``csrc/`` library: CUDA kernels for CUDA tensors, C++ kernels for CPU
  tensors.

``auto`` takes the first available backend of :data:`AUTO_ORDER` for the device: Triton, then
native, on CUDA and native, then torch, on CPU. (Triton leads on CUDA until the native CUDA kernels
have been checked and timed on a GPU; its correlation is the fused flash-style kernel, the native one
cuBLAS tiles.) ``MLKD_FAST_BACKEND`` replaces ``auto`` (an explicit ``backend=`` argument wins over
the variable); :func:`resolve` reads it once per call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import _native, ops, reference

ENV_VAR = "MLKD_FAST_BACKEND"

try:  # Triton is optional (it is missing on macOS / Windows wheels of torch).
    from . import _triton

    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the platform
    _triton = None
    _TRITON_ERROR = f"triton could not be imported ({type(exc).__name__}: {exc})"


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on a device, and if not, why."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


KdKlRows = Callable[[Tensor, Tensor, float, Optional[Tensor]], Tensor]
CorrelationRows = Callable[[Tensor, Tensor, Optional[Tensor], Optional[Tensor], float, bool], Tensor]


@dataclass(frozen=True)
class Backend:
    """One backend: where it runs and its per-row functions (the signatures in the module docstring)."""

    name: str
    status: Callable[[torch.device], BackendStatus]
    kd_kl_rows: KdKlRows
    correlation_rows: CorrelationRows


# ---------------------------------------------------------------------------------------------
# status functions
# ---------------------------------------------------------------------------------------------
def _torch_status(device: torch.device) -> BackendStatus:
    return BackendStatus(True, "pure PyTorch reference")


def _interpreting() -> bool:
    return _triton is not None and _triton.INTERPRET


def _triton_status(device: torch.device) -> BackendStatus:
    if _triton is None:
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
            "Triton needs a CUDA GPU; on CPU only under TRITON_INTERPRET=1 set before importing mlkd_fast",
        )
    return BackendStatus(False, f"Triton does not run on device type {device.type!r}")


def _native_status(device: torch.device) -> BackendStatus:
    if not _native.LOADED:
        return BackendStatus(False, _native.LOAD_ERROR)
    if device.type == "cpu":
        return BackendStatus(True, "compiled C++ CPU kernels")
    if device.type == "cuda":
        if not _native.has_cuda_kernels():
            return BackendStatus(False, "the compiled extension was built without CUDA kernels")
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA GPU is available")
        return BackendStatus(True, "compiled CUDA kernels")
    return BackendStatus(False, f"no native kernels for device type {device.type!r}")


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------
REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("torch", _torch_status, reference.kd_kl_rows, reference.correlation_kl_rows),
        Backend("triton", _triton_status, ops.fused_kd_kl_rows(ops.TRITON_NAMESPACE),
                ops.fused_correlation_rows(ops.TRITON_NAMESPACE)),
        Backend("native", _native_status, ops.fused_kd_kl_rows(ops.NATIVE_NAMESPACE),
                ops.fused_correlation_rows(ops.NATIVE_NAMESPACE)),
    )
}
BACKENDS = tuple(REGISTRY)  # ("torch", "triton", "native")

# What ``auto`` tries, in order, per device type; the reference runs everywhere and ends every list.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "native", "torch"),
    "cpu": ("native", "torch"),
}
_AUTO_FALLBACK = ("torch",)


def _unknown(backend: object, source: str = "") -> ValueError:
    return ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}{source}")


def backend_status(backend: str, device: Union[str, torch.device]) -> BackendStatus:
    """Status of one backend for tensors on ``device``."""
    entry = REGISTRY.get(backend) if isinstance(backend, str) else None
    if entry is None:
        raise _unknown(backend)
    return entry.status(torch.device(device))


def available_backends(device: Union[str, torch.device, None] = None) -> dict[str, BackendStatus]:
    """Every backend's status on ``device`` (default: CUDA when present, else CPU).

    >>> {name: s.available for name, s in available_backends("cpu").items()}["torch"]
    True
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: backend_status(name, device) for name in BACKENDS}


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend an op runs with on ``device``, resolved once per call: ``"auto"`` (replaced by
    ``MLKD_FAST_BACKEND`` when set, read here once) takes the first available entry of
    :data:`AUTO_ORDER`; a name asked for that cannot run raises a ValueError saying why."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    source = ""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f" (from the environment variable {ENV_VAR})"
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, _AUTO_FALLBACK):
            if REGISTRY[name].status(device):
                return REGISTRY[name]
        return REGISTRY["torch"]
    entry = REGISTRY.get(backend)
    if entry is None:
        raise _unknown(backend, source)
    status = entry.status(device)
    if not status:
        raise ValueError(f"backend {backend!r}{source} is not available on {device}: {status.reason}")
    return entry


def resolve_backend(backend: str, device: torch.device) -> str:
    """The name of the backend :func:`resolve` picks (for callers that only report it)."""
    return resolve(backend, device).name

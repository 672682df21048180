"""The backend registry: which backends can run here, and which one an op uses (docs/design.md §3).

Every backend is one :class:`Backend` entry of :data:`REGISTRY`: a status function saying whether it
runs on a device, and why not, and per-row functions for the ops of :data:`OPS` (the same signature
on every backend):
- ``kd_kl_rows(student, teacher, temperature, row_weight)`` -> ``w_i T^2 l_i`` (docs/design.md §1.1);
- ``correlation_rows(student_rows, teacher_rows, student_cols, teacher_cols, tau, exclude_diagonal)``
  -> ``l_i`` (docs/design.md §1.2).
A backend may implement a subset of the ops (None for the others): ``auto`` then takes each op from
the first available backend that implements it, and a backend asked for by name refuses an op it
lacks with an error naming the op and the backends that have it.

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

Paths. The native correlation on CPU has two (docs/design.md §5.1): ``dense``, the materialised one
(both M x N matrices from BLAS in blocks of rows, the gradient operand stored for a BLAS-only
backward: as many matmuls as eager PyTorch, without its elementwise passes), taken while the batch
has at most :data:`DENSE_MAX_ENTRIES` similarity entries, and ``tiled``, the fused O(M + N) one (tiles
recomputed in the backward: more matmul work, no M x N matrix) beyond, where memory decides.
:func:`correlation_path` is the rule and :func:`choose` says which backend and path a call takes and
why (``mlkd_fast.explain``). ``MLKD_FAST_CORR_PATH=dense|tiled`` (read at import;
:data:`CORRELATION_PATH`) forces one CPU path, for tests and benchmarks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import cached_property
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


#: op name -> the :class:`Backend` field holding its per-row function
OPS: dict[str, str] = {"kd_kl": "kd_kl_rows", "correlation": "correlation_rows"}


@dataclass(frozen=True)
class Backend:
    """One backend: where it runs and its per-row functions (the signatures in the module docstring),
    None for an op it does not implement (at least one it must)."""

    name: str
    status: Callable[[torch.device], BackendStatus]
    kd_kl_rows: Optional[KdKlRows] = None
    correlation_rows: Optional[CorrelationRows] = None

    def __post_init__(self) -> None:
        if not self.ops:
            raise ValueError(f"backend {self.name!r} implements none of the ops {', '.join(OPS)}")

    @cached_property  # resolution asks on every call of an op: computed once per entry
    def ops(self) -> tuple[str, ...]:
        """The ops this backend implements."""
        return tuple(op for op, fn in OPS.items() if getattr(self, fn) is not None)

    @cached_property
    def complete(self) -> bool:
        """Whether it implements every op."""
        return len(self.ops) == len(OPS)

    def implements(self, op: str) -> bool:
        return op in self.ops


def _op_field(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(map(repr, OPS))}; got {op!r}")
    return OPS[op]


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
# the native correlation's paths (docs/design.md §5.1)
# ---------------------------------------------------------------------------------------------
# The largest M x N (similarity entries of one matrix) that the CPU takes materialised ("dense"): 2^28,
# so that the stored gradient operand stays within 1 GiB of fp32 (square B <= 16384; the rotations'
# 3B x B up to B = 9459). Measured on the development CPU (docs/design.md §5.1): the dense path was
# faster than both eager and the tiled path at every batch up to there (2-3x the tiled one at 4096 and
# 8192, whose backward recomputes both matrices; the tiled path is even slower than eager on the
# rotations' rectangle, which has no symmetry to save the recomputation); so below it time decides,
# and beyond it memory: eager would hold about ten such matrices, the tiled path holds none.
DENSE_MAX_ENTRIES = 1 << 28
PATH_ENV_VAR = "MLKD_FAST_CORR_PATH"
CORRELATION_PATHS = ("dense", "tiled")
CORRELATION_PATH = os.environ.get(PATH_ENV_VAR, "auto").strip().lower() or "auto"  # "auto", "dense" or "tiled"


def correlation_path(device: torch.device, rows: int, cols: int) -> tuple[str, str]:
    """(path, reason) of the native correlation for ``rows`` x ``cols`` similarity matrices on ``device``."""
    if device.type != "cpu":
        return "fused", ("the CUDA kernels: fused tensor-core tiles for fp16/bf16 features (cuBLAS tiles for fp32), "
                         "O(M + N) extra memory")
    if CORRELATION_PATH in CORRELATION_PATHS:
        return CORRELATION_PATH, f"forced by {PATH_ENV_VAR}={CORRELATION_PATH}"
    if CORRELATION_PATH != "auto":
        raise ValueError(f"{PATH_ENV_VAR} must be one of 'auto', 'dense', 'tiled'; got {CORRELATION_PATH!r}")
    entries = rows * cols
    size = entries * 4
    size = f"{size / 2 ** 20:.0f} MiB" if size >= 2 ** 20 else f"{size / 2 ** 10:.0f} KiB"
    if entries <= DENSE_MAX_ENTRIES:
        return "dense", (f"M x N = {rows} x {cols} <= 2^{DENSE_MAX_ENTRIES.bit_length() - 1} entries: materialised, "
                         "faster than eager and than recomputing tiles (docs/design.md §5.1); the stored gradient "
                         f"operand takes {size}")
    return "tiled", (f"M x N = {rows} x {cols} > 2^{DENSE_MAX_ENTRIES.bit_length() - 1} entries: memory decides "
                     f"(a stored operand would take {size}): fused tiles, O(M + N) extra memory, the "
                     "backward recomputes them")


_native_tiled_correlation_rows = ops.fused_correlation_rows(ops.NATIVE_NAMESPACE)


def _native_correlation_rows(student_rows: Tensor, teacher_rows: Tensor, student_cols: Optional[Tensor],
                             teacher_cols: Optional[Tensor], tau: float, exclude_diagonal: bool) -> Tensor:
    """The native per-row correlation: the path :func:`correlation_path` picks for the shapes."""
    cols = student_rows.shape[0] if student_cols is None else student_cols.shape[0]
    path, _ = correlation_path(student_rows.device, student_rows.shape[0], cols)
    impl = ops.dense_correlation_rows if path == "dense" else _native_tiled_correlation_rows
    return impl(student_rows, teacher_rows, student_cols, teacher_cols, tau, exclude_diagonal)


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------
REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("torch", _torch_status, reference.kd_kl_rows, reference.correlation_kl_rows),
        Backend("triton", _triton_status, ops.fused_kd_kl_rows(ops.TRITON_NAMESPACE),
                ops.fused_correlation_rows(ops.TRITON_NAMESPACE)),
        Backend("native", _native_status, ops.fused_kd_kl_rows(ops.NATIVE_NAMESPACE), _native_correlation_rows),
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


def _lacks(name: str, op: str, source: str = "") -> ValueError:
    having = [n for n, entry in REGISTRY.items() if entry.implements(op)]
    return ValueError(f"backend {name!r}{source} does not implement the {op} op (it has: "
                      f"{', '.join(REGISTRY[name].ops)}); backends that do: {', '.join(having)}")


def _missing_op(name: str, op: str, source: str) -> Callable[..., Tensor]:
    """A per-row function standing for an op a backend asked for by name lacks: raises naming the op."""

    def missing(*args, **kwargs) -> Tensor:
        raise _lacks(name, op, source)

    return missing


def _auto(device: torch.device, op: Optional[str]) -> Backend:
    """``auto``: the first available backend of :data:`AUTO_ORDER` (implementing ``op`` when given). With
    no op, one lacking some op gets it from the next available backend that has it. Statuses are asked
    in order and no further than needed (this runs on every call of an op)."""
    up = (REGISTRY[name] for name in AUTO_ORDER.get(device.type, _AUTO_FALLBACK)
          if name in REGISTRY and REGISTRY[name].status(device))
    for entry in up:
        if op is not None and not entry.implements(op):
            continue
        if op is not None or entry.complete:
            return entry
        rest = [*up, REGISTRY["torch"]]  # the gaps of a partial first backend, from those after it
        return replace(entry, **{fn: getattr(next(e for e in rest if e.implements(o)), fn)
                                 for o, fn in OPS.items() if not entry.implements(o)})
    return REGISTRY["torch"]


def resolve(backend: str, device: torch.device, op: Optional[str] = None) -> Backend:
    """The backend an op runs with on ``device``, resolved once per call: ``"auto"`` (replaced by
    ``MLKD_FAST_BACKEND`` when set, read here once) takes the first available entry of
    :data:`AUTO_ORDER` that implements ``op`` (every op, with ``op`` None: each from the first that has
    it); a name asked for that cannot run, or lacks ``op``, raises a ValueError saying why (with ``op``
    None, the lacking op's function raises it when called)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if op is not None:
        _op_field(op)
    source = ""
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f" (from the environment variable {ENV_VAR})"
    if backend == "auto":
        return _auto(device, op)
    entry = REGISTRY.get(backend)
    if entry is None:
        raise _unknown(backend, source)
    status = entry.status(device)
    if not status:
        raise ValueError(f"backend {backend!r}{source} is not available on {device}: {status.reason}")
    if op is not None and not entry.implements(op):
        raise _lacks(backend, op, source)
    if op is None and not entry.complete:
        entry = replace(entry, **{fn: _missing_op(backend, o, source) for o, fn in OPS.items()
                                  if not entry.implements(o)})
    return entry


def pinned_backend(backend: str, device: torch.device) -> str:
    """The name ``backend`` resolves to on ``device`` when that backend implements every op, for a caller
    that calls the ops every step on one device (a training run): its calls then skip ``auto``'s
    search and the environment variable, read here once. A backend implementing only some ops is
    returned as given (each op then resolves per call)."""
    entry = resolve(backend, device)
    return entry.name if REGISTRY.get(entry.name) is entry and entry.complete else backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The name of the backend :func:`resolve` picks (for callers that only report it)."""
    return resolve(backend, device).name


# ---------------------------------------------------------------------------------------------
# which backend and path a call takes, and why (mlkd_fast.explain)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """What one call of an op runs: the backend, its path and the reason (``mlkd_fast.explain``)."""

    op: str
    backend: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op}: backend {self.backend!r}, path {self.path!r}: {self.reason}"


_KL_PATHS = {
    "torch": ("reference", "the pure-PyTorch reference: log_softmax of both inputs, autograd's backward"),
    "triton": ("fused", "one Triton kernel per row block: online softmax of both inputs, the gradient stored in the forward"),
    "native": ("fused", "one sweep per row from memory (compiled SIMD sweeps, rows over the cores); the gradient "
                        "stored in the forward, the backward a no-op after total.backward()"),
}
_CORR_PATHS = {
    "torch": ("materialised", "the pure-PyTorch reference: both M x N matrices, log_softmax, autograd's backward"),
    "triton": ("fused", "flash-style Triton kernels: tiles never stored, O(M + N) extra memory"),
}


def _backend_reason(backend: str, device: torch.device, op: str) -> tuple[Backend, str]:
    """:func:`resolve`'s answer for ``op``, and why."""
    entry = resolve(backend, device, op)
    if backend != "auto":
        return entry, "asked for"
    env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if env != "auto":
        return entry, f"from the environment variable {ENV_VAR}={env}"
    order = AUTO_ORDER.get(device.type, _AUTO_FALLBACK)

    def why_not(name: str) -> str:
        status = REGISTRY[name].status(device)
        return status.reason if not status else f"does not implement the {op} op"

    skipped = [f"{name}: {why_not(name)}" for name in order[:order.index(entry.name)]] if entry.name in order else []
    why = f"auto on {device.type}: the first available of {', '.join(order)}"
    return entry, why + (f" ({'; '.join(skipped)})" if skipped else "")


def choose(op: str, device: Union[str, torch.device], rows: int, cols: Optional[int] = None,
           backend: str = "auto") -> Choice:
    """The backend and path that ``op`` (``"kd_kl"`` or ``"correlation"``) takes on ``device`` for
    ``rows`` rows (and, for the correlation, ``cols`` columns: ``rows`` in square mode), and why.
    Decided by the device, the shapes and the environment only, like the call itself."""
    device = torch.device(device)
    if op not in OPS:
        raise ValueError(f"op must be 'kd_kl' or 'correlation', got {op!r}")
    entry, why = _backend_reason(backend, device, op)
    if op == "kd_kl":
        path, detail = _KL_PATHS.get(entry.name, ("custom", "a registered backend"))
    elif op == "correlation":
        cols = rows if cols is None else cols
        if entry.name == "native":
            path, detail = correlation_path(device, rows, cols)
        else:
            path, detail = _CORR_PATHS.get(entry.name, ("custom", "a registered backend"))
    return Choice(op, entry.name, path, f"{why}; {detail}")

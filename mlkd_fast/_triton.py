"""The Triton backend's ops: ``mlkd_fast_triton::*``, defined from :data:`mlkd_fast.ops.SCHEMAS` with
the kernels of :mod:`mlkd_fast.kernels` as their CPU and CUDA implementations (CPU tensors run only
under ``TRITON_INTERPRET=1``), with the fakes and autograd that the compiled ops share.

Importing this module fails where Triton cannot be imported; :mod:`mlkd_fast.backends` catches that
and reports it as the backend's status.
"""
from __future__ import annotations

from . import ops
from .kernels import INTERPRET, correlation, kd_kl

__all__ = ["INTERPRET"]

ops.define_ops(ops.TRITON_NAMESPACE, {
    "kd_kl": kd_kl.kd_kl,
    "scale_rows": kd_kl.scale_rows,
    "scale_rows_": kd_kl.scale_rows_,
    "correlation_fwd": correlation.correlation_fwd,
    "correlation_bwd": correlation.correlation_bwd,
})

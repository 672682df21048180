"""Soft loading of the compiled ``csrc/`` library (``mlkd_fast/_C*.so``).

The library registers its ops with ``TORCH_LIBRARY(mlkd_fast, ...)``; it has no Python module of its
own and is loaded with ``torch.ops.load_library``. The package imports without it.
"""
from __future__ import annotations

import glob
import os
import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _load() -> tuple[bool, str]:
    candidates = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd")))
    if not candidates:
        return False, (
            "the compiled extension is not built (install from source with a C++ compiler; "
            "see csrc/README.md)"
        )
    try:
        torch.ops.load_library(candidates[0])
    except Exception as exc:  # a library built against another torch, say
        return False, f"the compiled extension {os.path.basename(candidates[0])} failed to load: {exc}"
    return True, ""


LOADED, LOAD_ERROR = _load()


def has_cuda_kernels() -> bool:
    """Whether the loaded library registered CUDA implementations."""
    if not LOADED:
        return False
    return bool(torch.ops.mlkd_fast.built_with_cuda())


def status(device: torch.device):
    from .backends import BackendStatus

    if not LOADED:
        return BackendStatus(False, LOAD_ERROR)
    if device.type == "cpu":
        return BackendStatus(True, "compiled C++ CPU kernels")
    if device.type == "cuda":
        if not has_cuda_kernels():
            return BackendStatus(False, "the compiled extension was built without CUDA kernels")
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA GPU is available")
        return BackendStatus(True, "compiled CUDA kernels")
    return BackendStatus(False, f"no native kernels for device type {device.type!r}")


if LOADED:
    from ._autograd import register as _register

    _register("mlkd_fast")


def kd_kl_rows(student, teacher, temperature: float, row_weight=None):
    """Per-row ``w_i T^2 KL`` through the compiled ``mlkd_fast::kd_kl`` op (autograd included); the op
    takes student and teacher in different dtypes."""
    grad_on = torch.is_grad_enabled()
    rows, _, _ = torch.ops.mlkd_fast.kd_kl(student, teacher, row_weight, float(temperature),
                                           grad_on and student.requires_grad, grad_on and teacher.requires_grad)
    return rows


def correlation_kl_rows(student_rows, teacher_rows, student_cols, teacher_cols, tau: float, exclude_diagonal: bool):
    """Per-row correlation KL through the compiled ``mlkd_fast::correlation_fwd`` op (teacher detached)."""
    rows, _, _ = torch.ops.mlkd_fast.correlation_fwd(
        student_rows, teacher_rows.detach(), student_cols,
        None if teacher_cols is None else teacher_cols.detach(), float(tau), bool(exclude_diagonal))
    return rows

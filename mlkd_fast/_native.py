"""Soft loading of the compiled ``csrc/`` library (``mlkd_fast/_C*.so``).

The library registers its ops with ``TORCH_LIBRARY(mlkd_fast, ...)``; it has no Python module of its
own and is loaded with ``torch.ops.load_library``. The package imports without it.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

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


def ops() -> Optional[object]:
    return torch.ops.mlkd_fast if LOADED else None

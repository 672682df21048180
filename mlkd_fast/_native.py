"""Soft loading of the compiled ``csrc/`` library (``mlkd_fast/_C*.so``).

The ops are declared here from :data:`mlkd_fast.ops.SCHEMAS` (:func:`mlkd_fast.ops.define_schemas`);
the library, which has no Python module of its own, is loaded with ``torch.ops.load_library`` and
registers only their CPU and CUDA kernels; this module then adds the fakes and autograd
(:func:`mlkd_fast.ops.register_fakes_and_autograd`). The package imports without it: ``LOADED`` and
``LOAD_ERROR`` say whether it loaded and why not, and :mod:`mlkd_fast.backends` reports them.
"""
from __future__ import annotations

import glob
import os

import torch

from . import ops

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _load() -> tuple[bool, str]:
    candidates = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd")))
    if not candidates:
        return False, (
            "the compiled extension is not built (install from source with a C++ compiler; "
            "see csrc/README.md)"
        )
    ops.define_schemas(ops.NATIVE_NAMESPACE)
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
    return bool(torch.ops.mlkd_fast_build.built_with_cuda())


if LOADED:
    ops.register_fakes_and_autograd(ops.NATIVE_NAMESPACE)

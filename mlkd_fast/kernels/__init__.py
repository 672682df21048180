"""Triton kernels of mlkd_fast, installed as ``mlkd_fast.kernels``: one file per op, each holding
its kernels, their launchers and the implementations of its ``mlkd_fast_triton::*`` ops.

- :mod:`mlkd_fast.kernels.kd_kl`: temperature KL on logits, loss and gradient in one pass.
- :mod:`mlkd_fast.kernels.correlation`: tiled batch-correlation KL (never builds the M x N matrix).

Importing this package defines no op: :mod:`mlkd_fast._triton` defines the ``mlkd_fast_triton::*``
ops from the schemas of :mod:`mlkd_fast.ops` with these implementations.

``TRITON_INTERPRET=1`` must be set before this package is imported for the kernels to run on CPU
tensors (the interpreter reads it when ``@triton.jit`` runs).
"""
import os

import triton  # noqa: F401  (fails fast where Triton is missing; mlkd_fast.backends catches it)

from . import correlation, kd_kl  # noqa: F401
from ._device import sm_count  # noqa: F401

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

"""Triton kernels of mlkd_fast, installed as ``mlkd_fast.kernels``: one file per op, each holding
its kernels, their launchers and the ``torch.library`` custom ops with their autograd.

- :mod:`mlkd_fast.kernels.kd_kl`: temperature KL on logits, loss and gradient in one pass.
- :mod:`mlkd_fast.kernels.correlation`: tiled batch-correlation KL (never builds the M x N matrix).

``TRITON_INTERPRET=1`` must be set before this package is imported for the kernels to run on CPU
tensors (the interpreter reads it when ``@triton.jit`` runs).
"""
import os

import triton  # noqa: F401  (fails fast where Triton is missing; mlkd_fast.backends catches it)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device``, which the launchers plan their grids by. Other devices
    (CPU tensors under the interpreter, meta tensors in ``benchmarks.triton_build``) plan as an H100
    (132 SMs), so that they take the paths an H100 would."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


from .._autograd import register  # noqa: E402
from . import correlation, kd_kl  # noqa: E402,F401

# Fakes and autograd of the mlkd_fast_triton::* ops (the same glue serves the compiled ops).
register("mlkd_fast_triton")

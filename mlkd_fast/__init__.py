"""mlkd_fast: fused Multi-level knowledge-distillation losses for PyTorch.

Where things live:
- losses (``MLKDLoss``, ``KDLoss``, ``CorrelationLoss``): :mod:`mlkd_fast.losses`
- every loss as a function (the fused ops and the zoo's losses): :mod:`mlkd_fast.functional`; the
  fused ops' checks and dispatch: :mod:`mlkd_fast.fused`
- the pure-PyTorch reference of every op (the tests' oracle): :mod:`mlkd_fast.reference`
- language-model distillation (``linear_kd_loss``, ``LinearKDLoss``: the fused lm_head + divergence,
  no (tokens x vocab) logits): :mod:`mlkd_fast.linear_kd`, its row math in :mod:`mlkd_fast.divergences`
- the training-only terms of ``MLKDLoss`` (feature alignment, SupCon): :mod:`mlkd_fast.terms`
- the fused ops' contract (schemas, constants, fakes, autograd): :mod:`mlkd_fast.ops`
- Triton kernels, one file per op: :mod:`mlkd_fast.kernels`, their
  ops defined by :mod:`mlkd_fast._triton`
- the compiled C++/CUDA ops (``csrc/``): :mod:`mlkd_fast._native`
- the backend registry and the choice of a backend: :mod:`mlkd_fast.backends`
- the distiller zoo (registry, distillers, their loss functions, feature taps): :mod:`mlkd_fast.methods`
- the training loop (``mlkd-train``): :mod:`mlkd_fast.train`
- the teacher cache (``mlkd-cache``, ``mlkd-train --teacher-cache``): :mod:`mlkd_fast.cache`, its code in
  :mod:`mlkd_fast.train.cache` (writes) and :mod:`mlkd_fast.train.replay` (reads, replays)
"""
from . import functional, methods, reference
from .backends import BackendStatus, available_backends
from .fused import explain
from .linear_kd import LinearKDLoss
from .losses import PAPER_WEIGHTS, CorrelationLoss, KDLoss, MLKDLoss

__version__ = "0.1.0"

__all__ = [
    "MLKDLoss",
    "KDLoss",
    "CorrelationLoss",
    "LinearKDLoss",
    "PAPER_WEIGHTS",
    "available_backends",
    "explain",
    "BackendStatus",
    "functional",
    "methods",
    "reference",
    "__version__",
]

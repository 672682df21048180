"""Every loss of the library as a pure function.

- the fused ops (one pass for the loss and its gradient, on every backend; :mod:`mlkd_fast.fused`):
  :func:`kd_kl_div`, :func:`correlation_kl`, and :func:`kd_ce_loss` (KD with its CE in one op);
- language-model distillation from hidden states and the lm_head, never forming the (tokens x vocab)
  logits (:mod:`mlkd_fast.linear_kd`): :func:`linear_kd_loss`;
- the distiller zoo's losses, generated from its registry (:mod:`mlkd_fast.methods`): for every
  registered method its ``<method>_loss`` and the helpers it declares (``attention_map``,
  ``fsp_matrix``, ``cc_correlation``, ``bss_attack``, ``CRDMemory``, ...), each defined once in the
  method's own file (``mlkd_fast/methods/<method>.py``); ``ce_loss`` is the no-teacher baseline and
  ``mlkd_loss`` is :class:`mlkd_fast.MLKDLoss` without heads.

The modules (``MLKDLoss``, the distillers) call these same functions.
"""
from . import methods as _methods
from .fused import REDUCTIONS, correlation_kl, kd_ce_loss, kd_kl_div
from .linear_kd import linear_kd_loss

globals().update(_methods.functions())

__all__ = ["REDUCTIONS", "kd_kl_div", "kd_ce_loss", "correlation_kl", "linear_kd_loss", *sorted(_methods.functions())]

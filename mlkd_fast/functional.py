"""Every loss of the library as a pure function.

- the fused ops (one pass for the loss and its gradient, on every backend; :mod:`mlkd_fast.fused`):
  :func:`kd_kl_div`, :func:`correlation_kl`;
- the distiller zoo's losses (:mod:`mlkd_fast.methods`), ``<method>_loss`` for every registered
  method: ``ce`` (the no-teacher baseline), ``mlkd`` (:class:`mlkd_fast.MLKDLoss` without heads), outputs
  and decision boundary (``kd``, ``dkd``, ``dist``, ``dml``, ``bss``), representations (``fitnet``, ``at``,
  ``fsp``, ``nst``), relations between samples (``sp``, ``pkt``, ``rkd``, ``cc``, ``crd``), with the
  helpers they share (``attention_map``, ``fsp_matrix``, ``cc_correlation``, ``bss_attack``, ...).

The modules (``MLKDLoss``, the distillers) call these same functions.
"""
from .fused import REDUCTIONS, correlation_kl, kd_kl_div
from .losses import mlkd_loss
from .methods.features import at_loss, attention_map, fitnet_loss, fsp_loss, fsp_matrix, nst_loss
from .methods.logits import (bss_attack, bss_attack_classes, bss_loss, bss_select, dist_loss, dkd_loss, dml_loss,
                             kd_loss)
from .methods.relations import (CRDMemory, cc_correlation, cc_loss, crd_inbatch_loss, crd_loss, crd_sample_indices,
                                pkt_loss, rkd_angle_loss, rkd_distance_loss, rkd_loss, sp_loss)
from .terms import cross_entropy as ce_loss

__all__ = [
    "REDUCTIONS", "kd_kl_div", "correlation_kl", "ce_loss", "mlkd_loss",
    "kd_loss", "dkd_loss", "dist_loss", "dml_loss", "bss_attack", "bss_attack_classes", "bss_select", "bss_loss",
    "fitnet_loss", "attention_map", "at_loss", "fsp_matrix", "fsp_loss", "nst_loss",
    "sp_loss", "pkt_loss", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "cc_correlation", "cc_loss",
    "CRDMemory", "crd_sample_indices", "crd_loss", "crd_inbatch_loss",
]

"""The distiller zoo: knowledge-distillation methods behind one registry.

``available()`` lists the method names; ``build(name, student_spec, teacher_spec, **overrides)``
returns the method's :class:`Distiller` (an ``nn.Module``: give its parameters to the optimiser and
its state dict to the checkpoint). :func:`model_spec` describes a network for ``build``, and
:class:`FeatureTaps` records the stage outputs a method needs (``distiller.needs``) with forward
hooks. The classes live in :mod:`.distillers`; each method's loss is also a pure function:

- outputs / decision boundary (:mod:`.logits`): :func:`kd_loss`, :func:`dkd_loss`, :func:`dist_loss`,
  :func:`dml_loss` (collaborative learning), :func:`bss_attack` + :func:`bss_loss` (boundary
  supporting samples, with :func:`bss_select` and :func:`bss_attack_classes`);
- representations (:mod:`.features`): :func:`fitnet_loss`, :func:`at_loss`, :func:`fsp_loss`,
  :func:`nst_loss`;
- relations between samples (:mod:`.relations`): :func:`sp_loss`, :func:`pkt_loss`, :func:`rkd_loss`,
  :func:`cc_loss`, :func:`crd_loss` with :class:`CRDMemory` and :func:`crd_sample_indices`,
  :func:`crd_inbatch_loss`.

Every function computes in fp32 (fp64 for fp64 inputs), returns its result in the dtype its inputs
promote to, raises ValueError / TypeError naming the argument on bad input, and carries no loss
weight that the reference implementations apply outside the loss: the docstrings give those.
"""
from . import distillers as _distillers  # noqa: F401  (registers every method)
from .base import Distiller, ModelSpec, Needs, Outputs
from .features import at_loss, attention_map, fitnet_loss, fsp_loss, fsp_matrix, nst_loss
from .registry import available, build, method_class, register
from .taps import FeatureTaps, model_spec, stage_modules
from .logits import bss_attack, bss_attack_classes, bss_loss, bss_select, dist_loss, dkd_loss, dml_loss, kd_loss
from .relations import (
    CRDMemory,
    cc_correlation,
    cc_loss,
    crd_inbatch_loss,
    crd_loss,
    crd_sample_indices,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    sp_loss,
)

__all__ = [
    "available", "build", "method_class", "register", "Distiller", "ModelSpec", "Needs", "Outputs",
    "FeatureTaps", "model_spec", "stage_modules",
    "kd_loss", "dkd_loss", "dist_loss", "dml_loss", "bss_select", "bss_attack_classes", "bss_attack", "bss_loss",
    "fitnet_loss", "attention_map", "at_loss", "fsp_matrix", "fsp_loss", "nst_loss",
    "sp_loss", "pkt_loss", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "cc_correlation", "cc_loss",
    "CRDMemory", "crd_sample_indices", "crd_loss", "crd_inbatch_loss",
]

"""The distiller zoo: knowledge-distillation methods behind one registry.

One file per method holds its loss as pure functions and its :class:`Distiller` class side by side:
``ce`` (the baseline), outputs and decision boundary (``kd``, ``dkd``, ``dist``, ``bss``),
representations (``fitnet``, ``at``, ``fsp``, ``nst``), relations between samples (``sp``, ``pkt``,
``rkd``, ``cc``, ``crd``), a cohort of peers (``dml``) and ours (``mlkd``, with the ``paper`` preset).

- :class:`Distillation` is the object for users: student, teacher and method in one module that
  taps both networks, checks the method's needs when it is built and returns the loss.
- :func:`available`, :func:`build` (a method's :class:`Distiller` from two :class:`ModelSpec`),
  :func:`method_class` (its class: options and traits), :func:`presets`, :func:`baseline`.
- :func:`model_spec`, :func:`stage_modules`, :class:`FeatureTaps`, :class:`TappedNetwork`: what a
  network computes, read with forward hooks.

Every loss function computes in fp32 (fp64 for fp64 inputs), returns its result in the dtype its
inputs promote to, raises ValueError / TypeError naming the argument on bad input, and carries no
loss weight that the reference implementations apply outside the loss: the docstrings give those.
They are also :mod:`mlkd_fast.functional`'s.
"""
from . import at, bss, cc, ce, crd, dist, dkd, dml, fitnet, fsp, kd, mlkd, nst, pkt, rkd, sp  # noqa: F401 (register)
from . import cb, gce, ls  # noqa: F401 (register: the teacher-free controls of the KD study)
from .at import AT, at_loss, attention_map
from .base import Distiller, ModelSpec, Needs, Outputs
from .bss import BSS, bss_attack, bss_attack_classes, bss_loss, bss_select
from .cc import CC, cc_correlation, cc_loss, cc_repdistiller_loss
from .ce import CEOnly, ce_loss
from .crd import CRD, CRDMemory, crd_inbatch_loss, crd_loss, crd_sample_indices
from .dist import DIST, dist_loss
from .distillation import Distillation
from .dkd import DKD, dkd_loss
from .dml import DML, dml_loss
from .fitnet import FitNet, fitnet_loss
from .fsp import FSP, fsp_loss, fsp_matrix
from .kd import KD, kd_loss
from .mlkd import MLKD, mlkd_loss
from .nst import NST, nst_loss
from .pkt import PKT, pkt_loss
from .registry import available, baseline, build, method_class, presets, register, register_preset, resolve
from .rkd import RKD, rkd_angle_loss, rkd_distance_loss, rkd_loss
from .sp import SP, sp_loss
from .taps import FeatureTaps, TappedNetwork, model_spec, split_outputs, stage_modules


def functions() -> dict[str, object]:
    """Every registered method's pure functions by name (what :mod:`mlkd_fast.functional` exports)."""
    out: dict[str, object] = {}
    for name in available():
        for fn in method_class(name).functions:
            out[fn.__name__] = fn
    return out


__all__ = [
    "Distillation", "available", "build", "method_class", "presets", "baseline", "resolve", "register",
    "register_preset", "functions", "Distiller", "ModelSpec", "Needs", "Outputs",
    "FeatureTaps", "TappedNetwork", "model_spec", "split_outputs", "stage_modules",
    "CEOnly", "KD", "DKD", "DIST", "BSS", "FitNet", "AT", "FSP", "NST", "SP", "PKT", "RKD", "CC", "CRD", "DML", "MLKD",
    "ce_loss", "kd_loss", "dkd_loss", "dist_loss", "bss_select", "bss_attack_classes", "bss_attack", "bss_loss",
    "fitnet_loss", "attention_map", "at_loss", "fsp_matrix", "fsp_loss", "nst_loss", "sp_loss", "pkt_loss",
    "rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "cc_correlation", "cc_loss", "cc_repdistiller_loss", "CRDMemory", "crd_sample_indices",
    "crd_loss", "crd_inbatch_loss", "dml_loss", "mlkd_loss",
]

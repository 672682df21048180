"""DKD (Zhao et al., Decoupled Knowledge Distillation, CVPR 2022): the target class and the
non-target classes distilled apart, the whole term warmed up over the first epochs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks as check
from ..fused import kd_kl_div
from ..ops import math_dtype
from ..reference import _kl_terms
from ._common import require_teacher
from .base import Distiller, ModelSpec
from .registry import register

__all__ = ["dkd_loss", "DKD"]


def _binary_log_probs(z: Tensor, target: Tensor, target_mask: Tensor) -> Tensor:
    """``[log p_target, log(1 - p_target)]`` per row of ``softmax(z)``, both from log-sum-exps so that
    neither underflows to ``log 0`` when the target class dominates."""
    lse_all = torch.logsumexp(z, dim=1)
    log_target = z.gather(1, target[:, None]).squeeze(1) - lse_all
    log_rest = z.masked_fill(target_mask, float("-inf")).logsumexp(dim=1) - lse_all
    return torch.stack((log_target, log_rest), dim=1)


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0, *, backend: str = "auto") -> Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD``, each times ``T^2``, mean over rows.

    - TCKD: the KL between the binary distributions ``[p_target, 1 - p_target]`` of teacher and
      student at temperature T.
    - NCKD: the KL between the softmaxes over the non-target classes only. It is computed as the KD
      KL with the target logit set to ``-inf`` on both sides, on the fused kernels
      (:func:`mlkd_fast.functional.kd_kl_div`, whose every backend gives a masked class exactly 0
      loss and 0 gradient); mdistiller subtracts 1000 from the target logit instead, which equals
      this up to ``exp(-1000)``.

    Defaults ``alpha = 1, beta = 8, T = 4`` are mdistiller's CIFAR-100 configuration; its ImageNet
    ResNet-34 -> ResNet-18 configuration uses ``beta = 0.5, T = 1``. The linear warm-up of the DKD
    weight over the first epochs (20 on CIFAR, 1 on ImageNet in mdistiller) is the caller's: this
    function has no notion of epochs.

    Args:
        student_logits, teacher_logits: ``(N, C)`` logits, ``C >= 2``.
        target: ``(N,)`` integer class indices (not range-checked here: checking would need a host
            synchronisation; an out-of-range index fails in the indexing op).
    """
    s, t = check.logit_pair(student_logits, teacher_logits)
    if s.shape[1] < 2:
        raise ValueError(f"dkd needs at least 2 classes (a target and a non-target), got C = {s.shape[1]}")
    target = check.labels(target, s.shape[0])
    if target.device != s.device:
        raise ValueError(f"target is on {target.device} but student_logits is on {s.device}; move them to one device")
    alpha = check.real(alpha, "alpha")
    beta = check.real(beta, "beta")
    temperature = check.real(temperature, "temperature", positive=True)

    n = s.shape[0]
    dtype = math_dtype(s, t)
    target_mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    target_mask.scatter_(1, target[:, None], True)

    log_bin_s = _binary_log_probs(s.to(dtype) / temperature, target, target_mask)
    log_bin_t = _binary_log_probs(t.to(dtype) / temperature, target, target_mask)
    tckd = _kl_terms(log_bin_t, log_bin_s).sum() * (temperature * temperature / n)

    neg_inf = float("-inf")
    nckd = kd_kl_div(s.masked_fill(target_mask, neg_inf), t.masked_fill(target_mask, neg_inf),
                     temperature, reduction="batchmean", backend=backend)
    return (alpha * tckd + beta * nckd.to(dtype)).to(check.out_dtype(s, t))


@register("dkd")
class DKD(Distiller):
    """``alpha TCKD + beta NCKD``, both times T^2, the whole term ramped linearly from 0 over the first
    ``warmup`` epochs (factor ``min((epoch + 1) / warmup, 1)``, epochs counted from 0, as mdistiller
    counts from 1). Defaults alpha 1, beta 8, T 4, warm-up 20 (mdistiller's CIFAR-100 setting;
    ImageNet R34 -> R18 uses T 1, beta 0.5, warm-up 1). With ``warmup > 0`` the distiller refuses to
    run before :meth:`set_epoch`: it never runs silently at the first epoch's strength."""

    source = "Zhao et al., CVPR 2022; mdistiller's DKD config"
    family = "outputs"
    functions = (dkd_loss,)
    main_weight = "beta"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, alpha: float = 1.0,
                 beta: float = 8.0, temperature: float = 4.0, warmup: int = 20) -> None:
        super().__init__(student, require_teacher(teacher, "dkd"), w_ce)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"method 'dkd': warmup must be an int >= 0 (epochs), got {warmup!r}")
        self.alpha, self.beta, self.temperature, self.warmup = float(alpha), float(beta), float(temperature), warmup

    @property
    def schedule(self) -> Optional[str]:
        return f"the DKD term ramps up linearly over the first {self.warmup} epochs" if self.warmup > 0 else None

    def ramp(self) -> float:
        return min(float(self.epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def loss_terms(self, student, teacher, target, **context):
        return {"dkd": self.ramp() * dkd_loss(student.logits, teacher.logits.detach(), target, self.alpha, self.beta,
                                              self.temperature)}

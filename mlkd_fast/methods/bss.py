"""BSS (Heo et al., Knowledge Distillation with Adversarial Samples Supporting Decision Boundary,
AAAI 2019): KD on the batch plus KD on adversarial samples moved to the teacher's decision boundary."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _checks as check
from ..fused import kd_kl_div
from ..ops import math_dtype
from ._common import require_teacher
from .base import Distiller, ModelSpec, Needs
from .registry import register

__all__ = ["bss_select", "bss_attack_classes", "bss_attack", "bss_loss", "BSS", "BSS_CLAMP"]

BSS_CLAMP = (-2.5, 2.5)  # the authors' bound on every attack step (bhheo/BSS_distillation)


def bss_select(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, max_samples: int = 64) -> Tensor:
    """Indices of the samples to attack, as the BSS authors choose them (bhheo/BSS_distillation).

    Candidates are the samples both networks classify correctly. When there are more than
    ``max_samples`` (64 in the authors' code), the ones kept are those where the two networks'
    softmaxes differ most outside the true class (largest sum over non-target classes of the squared
    probability difference). Returns a 1-D long tensor (possibly empty). Data-dependent: reads the
    selection size on the host.
    """
    s, t = check.logit_pair(student_logits, teacher_logits)
    target = check.labels(target, s.shape[0])
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive int, got {max_samples!r}")
    with torch.no_grad():
        dtype = math_dtype(s, t)
        s, t = s.to(dtype), t.to(dtype)
        both_right = (t.argmax(dim=1) == target) & (s.argmax(dim=1) == target)
        idx = both_right.nonzero().squeeze(1)
        if idx.numel() > max_samples:
            diff = (torch.softmax(t[idx], dim=1) - torch.softmax(s[idx], dim=1)).square()
            score = diff.sum(dim=1) - diff.gather(1, target[idx, None]).squeeze(1)
            idx = idx[score.topk(max_samples).indices]
    return idx


def bss_attack_classes(teacher_logits: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """A target class per sample for the attack, drawn from the teacher's softmax restricted to the
    classes other than its top-1 (probability proportional to the teacher's), as the BSS authors do.

    Drawn with the Gumbel-max trick on log-probabilities, so rows whose non-top probabilities
    underflow to 0 still get a valid class. ``generator`` (on the logits' device) makes the draw
    reproducible.
    """
    z = check.float_tensor(teacher_logits, "teacher_logits")
    check.ndim(z, "teacher_logits", 2, "(N, C)")
    if z.shape[1] < 2:
        raise ValueError(f"bss needs at least 2 classes to pick a target class, got C = {z.shape[1]}")
    with torch.no_grad():
        log_p = torch.log_softmax(z.to(math_dtype(z)), dim=1)
        top1 = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, log_p.argmax(dim=1, keepdim=True), True)
        u = torch.rand(log_p.shape, generator=generator, dtype=log_p.dtype, device=log_p.device)
        gumbel = -torch.log(-torch.log(u))
        return (log_p + gumbel).masked_fill(top1, float("-inf")).argmax(dim=1)


def bss_attack(teacher: Callable[[Tensor], Tensor], inputs: Tensor, attack_class: Tensor, *, steps: int = 10,
               step_size: float = 0.3, clamp: Optional[tuple[float, float]] = BSS_CLAMP) -> Tensor:
    """Boundary supporting samples: ``inputs`` moved iteratively towards the teacher's decision
    boundary between its predicted class and ``attack_class``.

    With ``b`` the teacher's prediction on the clean input and ``f`` its logits, each step moves
    every sample still predicted as ``b`` by
    ``step_size * (f_b(x) - f_c(x) + 1e-4) * g / ||g||_2`` with ``g = grad_x (f_c(x) - f_b(x))``:
    along the direction that closes the logit gap fastest, by a length proportional to the gap, so
    that the steps shrink as the sample nears the boundary (the authors' rule, bhheo/BSS_distillation).
    Samples that crossed stop moving, and the loop stops early when all have (one host read per
    step). ``steps = 10, step_size = 0.3`` and the clamp of every step to ``(-2.5, 2.5)`` are the BSS
    authors' values (the clamp bounds their normalised CIFAR-10 pixels, which lie in about
    ``[-2.0, 2.1]``; it keeps the samples near the data's range for inputs normalised by channel
    mean and std, and leaves [0, 1] inputs almost unbounded); ``clamp=None`` turns it off.

    Args:
        teacher: any callable mapping a batch of inputs to ``(N, C)`` logits (put a network in eval
            mode first: batch-norm statistics would otherwise move). Only the gradient with respect
            to the input is taken; no parameter's ``.grad`` is touched.
        inputs: ``(N, ...)`` batch (typically the samples of :func:`bss_select`).
        attack_class: ``(N,)`` target classes (for example :func:`bss_attack_classes`).

    Returns:
        The adversarial inputs, detached, in ``inputs``' dtype (accumulated in fp32 or better).
    """
    x_in = check.float_tensor(inputs, "inputs")
    if x_in.ndim < 1 or x_in.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (N, ...), got shape {tuple(x_in.shape)}")
    cls = check.labels(attack_class, x_in.shape[0], "attack_class")[:, None]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    step_size = check.real(step_size, "step_size", positive=True)
    if clamp is not None:
        lo, hi = (check.real(v, "clamp") for v in clamp)
        if lo > hi:
            raise ValueError(f"clamp must be (low, high) with low <= high, got {clamp}")
    dtype = math_dtype(x_in)
    x = x_in.detach().to(dtype)
    base = None
    view = (-1,) + (1,) * (x.ndim - 1)
    for _ in range(steps):
        with torch.enable_grad():
            xg = x.detach().to(x_in.dtype).requires_grad_(True)
            out = teacher(xg)
            if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"teacher must return (N, C) logits for the {x.shape[0]} inputs, got {shape}")
            out = out.to(dtype)
            if base is None:
                base = out.detach().argmax(dim=1, keepdim=True)
            s_base = out.gather(1, base)
            s_cls = out.gather(1, cls)
            (grad,) = torch.autograd.grad((s_cls - s_base).sum(), xg)
        active = out.detach().argmax(dim=1, keepdim=True) == base
        if not bool(active.any()):
            break
        with torch.no_grad():
            grad = grad.to(dtype)
            norm = grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(dtype).tiny)
            scale = step_size * active.to(dtype) * ((s_base - s_cls).detach() + 1e-4) / norm[:, None]
            x = x + scale.reshape(view) * grad
            if clamp is not None:
                x = x.clamp(lo, hi)
    return x.to(x_in.dtype)


def bss_loss(student_logits_adv: Tensor, teacher_logits_adv: Tensor, temperature: float = 3.0, *,
             backend: str = "auto") -> Tensor:
    """KD on the boundary supporting samples: ``KL(softmax(t / T) || softmax(s / T))``, batchmean,
    on the fused kernels, WITHOUT the ``T^2`` factor.

    The BSS authors distil with the soft cross-entropy ``-sum p_t log p_s / N`` at ``T = 3`` and no
    ``T^2``; the KL differs from it by the teacher's entropy, a constant, so the gradients are theirs
    and their loss weights (2 -> 0 over training for the adversarial term, 4 -> 1 for the clean KD
    term, which they also compute without ``T^2``) carry over. Multiply by ``T^2`` for Hinton's scale.
    """
    s = check.float_tensor(student_logits_adv, "student_logits_adv")
    t = check.float_tensor(teacher_logits_adv, "teacher_logits_adv")
    temperature = check.real(temperature, "temperature", positive=True)
    loss = kd_kl_div(s, t, temperature, reduction="batchmean", backend=backend,
                     weight=1.0 / (temperature * temperature))
    return loss.to(check.out_dtype(s, t))


def _linear(value, name: str) -> tuple[float, float]:
    """A weight as (start, end) of a linear schedule over the run; a number is constant."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), float(value)
    try:
        start, end = value
        return float(start), float(end)
    except (TypeError, ValueError):
        raise ValueError(f"method 'bss': {name} must be a number or a (start, end) pair, got {value!r}") from None


@register("bss")
class BSS(Distiller):
    """KD on the batch, plus KD on adversarial samples that an iterative attack moves from inputs both
    networks classify correctly towards the teacher's decision boundary with another class (drawn
    from the teacher's softmax). It needs the batch's images and both networks as callables
    returning logits (``inputs``, ``teacher_fn``, ``student_fn``: :class:`~mlkd_fast.methods.Distillation`
    and the loop pass them). Defaults are the authors': KD and the adversarial term at T 3 without
    T^2 (:func:`bss_loss`), weights 4 -> 1 and 2 -> 0 linearly over the run (so
    ``set_epoch(epoch, epochs)`` is required; constant weights, e.g. ``w_kd=1.0, w_bss=1.0``, need
    none), at most 64 attacked samples, 10 attack steps of size 0.3, every step clamped to
    ``(-2.5, 2.5)`` (``clamp=None``: no clamp)."""

    source = "Heo et al., AAAI 2019; bhheo/BSS_distillation"
    family = "outputs"
    functions = (bss_select, bss_attack_classes, bss_attack, bss_loss)

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_kd: tuple = (4.0, 1.0),
                 w_bss: tuple = (2.0, 0.0), temperature: float = 3.0, max_samples: int = 64, attack_steps: int = 10,
                 attack_step_size: float = 0.3, clamp: Optional[tuple] = BSS_CLAMP, backend: str = "auto") -> None:
        super().__init__(student, require_teacher(teacher, "bss"), w_ce)
        self.w_kd, self.w_bss = _linear(w_kd, "w_kd"), _linear(w_bss, "w_bss")
        self.temperature, self.max_samples = float(temperature), int(max_samples)
        self.attack_steps, self.attack_step_size, self.backend = int(attack_steps), float(attack_step_size), backend
        if clamp is not None:
            lo, hi = (check.real(v, "clamp") for v in clamp)
            if lo > hi:
                raise ValueError(f"method 'bss': clamp must be (low, high) with low <= high, got {clamp}")
            clamp = (lo, hi)
        self.clamp = clamp

    @property
    def needs(self) -> Needs:
        return Needs(context=("inputs", "teacher_fn", "student_fn"))

    @property
    def schedule(self) -> Optional[str]:
        moving = [f"{n} {a:g} -> {b:g}" for n, (a, b) in (("w_kd", self.w_kd), ("w_bss", self.w_bss)) if a != b]
        return ("linear over the run: " + ", ".join(moving)) if moving else None

    @property
    def schedule_needs_total(self) -> bool:
        return self.schedule is not None

    def _weight(self, schedule: tuple[float, float]) -> float:
        start, end = schedule
        if start == end or self.epochs is None or self.epochs <= 1:
            return start
        return start + (end - start) * min(self.epoch / (self.epochs - 1), 1.0)

    def loss_terms(self, student, teacher, target, inputs=None, teacher_fn=None, student_fn=None, **context):
        t_logits = teacher.logits.detach()
        terms = {"kd": self._weight(self.w_kd) * bss_loss(student.logits, t_logits, self.temperature,
                                                          backend=self.backend)}
        w_bss = self._weight(self.w_bss)
        chosen = bss_select(student.logits.detach(), t_logits, target, self.max_samples) if w_bss > 0 else None
        # one attacked sample cannot go through a student with BatchNorm in training mode (batch statistics
        # of one sample): like none, it gives a zero term (found as a flaky crash of the README's zoo block)
        if chosen is None or chosen.numel() < 2:
            terms["bss"] = student.logits.sum() * 0.0
            return terms
        attack_class = bss_attack_classes(t_logits[chosen])
        adversarial = bss_attack(teacher_fn, inputs[chosen], attack_class, steps=self.attack_steps,
                                 step_size=self.attack_step_size, clamp=self.clamp)
        with torch.no_grad():
            t_adv = teacher_fn(adversarial)
        terms["bss"] = w_bss * bss_loss(student_fn(adversarial), t_adv, self.temperature, backend=self.backend)
        return terms

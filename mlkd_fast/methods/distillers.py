"""The distillers of the zoo: one class per method, registered by name.

Each wraps the method's functional loss (``mlkd_fast.methods.logits``, ``.features``,
``.relations``) with its trainable parts and default weights. Defaults follow each method's paper
and reference implementation (named in the class docstring); every one can be overridden through
``mlkd_fast.methods.build(name, ..., option=value)`` or ``mlkd-train --method-opt option=value``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fused as MF
from ..losses import MLKDLoss
from .base import Distiller, ModelSpec, Needs, Outputs, cross_entropy
from .features import at_loss, fitnet_loss, fsp_loss, nst_loss
from .logits import bss_attack, bss_attack_classes, bss_loss, bss_select, dist_loss, dkd_loss, dml_loss
from .registry import register
from .relations import CRDMemory, cc_loss, crd_inbatch_loss, crd_loss, pkt_loss, rkd_loss, sp_loss


def _pick_stages(spec: ModelSpec, chosen: Optional[Sequence[str]], default: slice, role: str, method: str) -> tuple:
    names = spec.stage_names
    if chosen is None:
        picked = tuple(names[default])
    else:
        picked = tuple(chosen)
        unknown = [n for n in picked if n not in names]
        if unknown:
            raise ValueError(f"method {method!r}: the {role} has no stage {unknown}; its stages are {names}")
    if not picked:
        raise ValueError(f"method {method!r} needs stage outputs, but the {role}'s spec lists none")
    return picked


def _require_teacher(teacher: Optional[ModelSpec], method: str) -> ModelSpec:
    if teacher is None:
        raise ValueError(f"method {method!r} distils from a teacher: pass its ModelSpec")
    return teacher


def _paired(student: ModelSpec, teacher: ModelSpec, s_names, t_names, s_default: slice, t_default: slice,
            method: str) -> tuple[tuple, tuple]:
    s = _pick_stages(student, s_names, s_default, "student", method)
    t = _pick_stages(teacher, t_names, t_default, "teacher", method)
    if len(s) != len(t):
        raise ValueError(f"method {method!r} pairs stages one to one: student {list(s)} vs teacher {list(t)}")
    return s, t


# ---------------------------------------------------------------------------------------------
# outputs and decision boundary
# ---------------------------------------------------------------------------------------------
@register("ce")
class CEOnly(Distiller):
    """Standard training: cross-entropy on the labels, no teacher (the baseline of every study)."""

    source = "-"

    def __init__(self, student: ModelSpec, teacher: Optional[ModelSpec] = None, w_ce: float = 1.0) -> None:
        super().__init__(student, None, w_ce)

    def loss_terms(self, student, teacher, target, **context):
        return {}


@register("kd")
class KD(Distiller):
    """Hinton et al. 2015: ``w_kd T^2 KL(softmax(t/T) || softmax(s/T))``, T = 4, on the fused KL."""

    source = "Hinton et al., arXiv 1503.02531; T = 4 as in RepDistiller / mdistiller"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_kd: float = 1.0,
                 temperature: float = 4.0, backend: str = "auto") -> None:
        super().__init__(student, _require_teacher(teacher, "kd"), w_ce)
        self.w_kd, self.temperature, self.backend = float(w_kd), float(temperature), backend

    def loss_terms(self, student, teacher, target, **context):
        return {"kd": MF.kd_kl_div(student.logits, teacher.logits.detach(), self.temperature,
                                   backend=self.backend, weight=self.w_kd)}


@register("dkd")
class DKD(Distiller):
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha TCKD + beta NCKD``, both times T^2, the whole
    term ramped linearly from 0 over the first ``warmup`` epochs. Defaults alpha 1, beta 8, T 4,
    warm-up 20 (mdistiller's CIFAR-100 setting; ImageNet R34 -> R18 uses T 1, beta 0.5, warm-up 1)."""

    source = "Zhao et al., CVPR 2022; mdistiller's DKD config"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, alpha: float = 1.0,
                 beta: float = 8.0, temperature: float = 4.0, warmup: int = 20) -> None:
        super().__init__(student, _require_teacher(teacher, "dkd"), w_ce)
        self.alpha, self.beta, self.temperature, self.warmup = float(alpha), float(beta), float(temperature), int(warmup)

    def loss_terms(self, student, teacher, target, **context):
        ramp = min(float(self.epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0
        return {"dkd": ramp * dkd_loss(student.logits, teacher.logits.detach(), target, self.alpha, self.beta,
                                       self.temperature)}


@register("dist")
class DIST(Distiller):
    """DIST (Huang et al., NeurIPS 2022): inter- and intra-class Pearson correlation of the
    softmaxes, ``w_dist tau^2 (beta inter + gamma intra)``; weight 2, beta = gamma = 1, tau 1
    (the authors' ImageNet setting; CIFAR uses tau 4)."""

    source = "Huang et al., NeurIPS 2022; the DIST_KD reference code"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_dist: float = 2.0,
                 beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> None:
        super().__init__(student, _require_teacher(teacher, "dist"), w_ce)
        self.w_dist, self.beta, self.gamma, self.tau = float(w_dist), float(beta), float(gamma), float(tau)

    def loss_terms(self, student, teacher, target, **context):
        return {"dist": self.w_dist * dist_loss(student.logits, teacher.logits.detach(), self.beta, self.gamma,
                                                self.tau)}


@register("bss")
class BSS(Distiller):
    """Boundary-supporting samples (Heo et al., AAAI 2019): KD on the batch, plus KD on adversarial
    samples that an iterative attack moves from inputs both networks classify correctly towards the
    teacher's decision boundary with another class (drawn from the teacher's softmax). The loop
    passes the images (``inputs``) and both networks as callables returning logits (``teacher_fn``,
    ``student_fn``). Defaults are the authors': KD and the adversarial term at T 3 without T^2
    (:func:`~mlkd_fast.methods.logits.bss_loss`), weights 4 -> 1 and 2 -> 0 linearly over the run
    (over ``self.epochs`` epochs, set by the loop; constant at their start values when unknown),
    at most 64 attacked samples, 10 attack steps of size 0.3."""

    source = "Heo et al., AAAI 2019; bhheo/BSS_distillation"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_kd: tuple = (4.0, 1.0),
                 w_bss: tuple = (2.0, 0.0), temperature: float = 3.0, max_samples: int = 64, attack_steps: int = 10,
                 attack_step_size: float = 0.3, backend: str = "auto") -> None:
        super().__init__(student, _require_teacher(teacher, "bss"), w_ce)
        self.w_kd, self.w_bss = _schedule(w_kd, "w_kd"), _schedule(w_bss, "w_bss")
        self.temperature, self.max_samples = float(temperature), int(max_samples)
        self.attack_steps, self.attack_step_size, self.backend = int(attack_steps), float(attack_step_size), backend

    @property
    def needs(self) -> Needs:
        return Needs(context=("inputs", "teacher_fn", "student_fn"))

    def _weight(self, schedule: tuple[float, float]) -> float:
        start, end = schedule
        if self.epochs <= 1:
            return start
        return start + (end - start) * min(self.epoch / (self.epochs - 1), 1.0)

    def loss_terms(self, student, teacher, target, inputs=None, teacher_fn=None, student_fn=None, **context):
        t_logits = teacher.logits.detach()
        terms = {"kd": self._weight(self.w_kd) * bss_loss(student.logits, t_logits, self.temperature,
                                                          backend=self.backend)}
        w_bss = self._weight(self.w_bss)
        chosen = bss_select(student.logits.detach(), t_logits, target, self.max_samples) if w_bss > 0 else None
        if chosen is None or chosen.numel() == 0:
            terms["bss"] = student.logits.sum() * 0.0
            return terms
        attack_class = bss_attack_classes(t_logits[chosen])
        adversarial = bss_attack(teacher_fn, inputs[chosen], attack_class, steps=self.attack_steps,
                                 step_size=self.attack_step_size)
        with torch.no_grad():
            t_adv = teacher_fn(adversarial)
        terms["bss"] = w_bss * bss_loss(student_fn(adversarial), t_adv, self.temperature, backend=self.backend)
        return terms


def _schedule(value, name: str) -> tuple[float, float]:
    """A weight as (start, end) of a linear schedule over the run; a number is constant."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    start, end = value
    return float(start), float(end)


# ---------------------------------------------------------------------------------------------
# representations
# ---------------------------------------------------------------------------------------------
class _Regressor(nn.Module):
    """Student map -> teacher map shape: average-pooled to the teacher's size when larger, then a
    1x1 conv, BatchNorm and ReLU (RepDistiller's ConvReg, with pooling for every size ratio)."""

    def __init__(self, s_shape: tuple, t_shape: tuple) -> None:
        super().__init__()
        self.size = tuple(t_shape[1:])
        self.conv = nn.Conv2d(s_shape[0], t_shape[0], 1)
        self.bn = nn.BatchNorm2d(t_shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        return F.relu(self.bn(self.conv(x)))


@register("fitnet")
class FitNet(Distiller):
    """FitNets (Romero et al., ICLR 2015): MSE between a trainable regressor of a middle student
    stage and the teacher's stage, weight 100 (RepDistiller)."""

    source = "Romero et al., ICLR 2015; RepDistiller (-b 100, hint layer 2)"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_fitnet: float = 100.0,
                 student_stage: Optional[str] = None, teacher_stage: Optional[str] = None) -> None:
        teacher = _require_teacher(teacher, "fitnet")
        super().__init__(student, teacher, w_ce)
        mid_s, mid_t = len(student.stages) // 2, len(teacher.stages) // 2
        (self.s_stage,), (self.t_stage,) = _paired(
            student, teacher, None if student_stage is None else [student_stage],
            None if teacher_stage is None else [teacher_stage], slice(mid_s, mid_s + 1), slice(mid_t, mid_t + 1),
            "fitnet")
        self.w_fitnet = float(w_fitnet)
        self.regressor = _Regressor(student.stages[self.s_stage], teacher.stages[self.t_stage])

    @property
    def needs(self) -> Needs:
        return Needs(student_stages=(self.s_stage,), teacher_stages=(self.t_stage,))

    def loss_terms(self, student, teacher, target, **context):
        hint = self.regressor(student.stages[self.s_stage])
        return {"fitnet": self.w_fitnet * fitnet_loss(hint, teacher.stages[self.t_stage].detach())}


class _StagePairs(Distiller):
    """Shared plumbing of the methods that compare the two networks stage by stage."""

    default_stages = slice(None)

    def __init__(self, student, teacher, w_ce, student_stages, teacher_stages) -> None:
        teacher = _require_teacher(teacher, self.name)
        super().__init__(student, teacher, w_ce)
        self.s_stages, self.t_stages = _paired(student, teacher, student_stages, teacher_stages,
                                               self.default_stages, self.default_stages, self.name)

    @property
    def needs(self) -> Needs:
        return Needs(student_stages=self.s_stages, teacher_stages=self.t_stages)

    def maps(self, student: Outputs, teacher: Outputs) -> tuple[list[Tensor], list[Tensor]]:
        return ([student.stages[n] for n in self.s_stages], [teacher.stages[n].detach() for n in self.t_stages])


@register("at")
class AT(_StagePairs):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): the L2-normalised spatial attention
    maps ``mean_c f^p`` of every stage pair, p 2, weight 1000 (RepDistiller)."""

    source = "Zagoruyko & Komodakis, ICLR 2017; RepDistiller (-b 1000, p 2)"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_at: float = 1000.0,
                 p: float = 2.0, student_stages: Optional[Sequence[str]] = None,
                 teacher_stages: Optional[Sequence[str]] = None) -> None:
        super().__init__(student, teacher, w_ce, student_stages, teacher_stages)
        self.w_at, self.p = float(w_at), float(p)

    def loss_terms(self, student, teacher, target, **context):
        s, t = self.maps(student, teacher)
        return {"at": self.w_at * at_loss(s, t, p=self.p)}


@register("fsp")
class FSP(_StagePairs):
    """Flow of solution procedure (Yim et al., CVPR 2017): Gram matrices between consecutive stages,
    ``G = F1 F2^T / (h w)``, matched by MSE; weight 50. FSP compares channel by channel, so where a
    student stage is narrower than the teacher's (a capacity gap) a trainable 1x1 convolution widens
    it first; equal widths are compared as they are, as in the paper."""

    source = "Yim et al., CVPR 2017; RepDistiller's FSP"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_fsp: float = 50.0,
                 student_stages: Optional[Sequence[str]] = None,
                 teacher_stages: Optional[Sequence[str]] = None) -> None:
        super().__init__(student, teacher, w_ce, student_stages, teacher_stages)
        if len(self.s_stages) < 2:
            raise ValueError("method 'fsp' needs at least two stages (it pairs consecutive ones)")
        self.w_fsp = float(w_fsp)
        self.adapters = nn.ModuleList(
            nn.Identity() if student.stages[a][0] == teacher.stages[b][0]
            else nn.Conv2d(student.stages[a][0], teacher.stages[b][0], 1, bias=False)
            for a, b in zip(self.s_stages, self.t_stages))

    def loss_terms(self, student, teacher, target, **context):
        s, t = self.maps(student, teacher)
        s = [adapt(m) for adapt, m in zip(self.adapters, s)]
        return {"fsp": self.w_fsp * fsp_loss(list(zip(s[:-1], s[1:])), list(zip(t[:-1], t[1:])))}


@register("nst")
class NST(_StagePairs):
    """Neuron selectivity transfer (Huang & Wang, arXiv 1707.01219): squared MMD of the channel
    activations with the polynomial kernel, the last stage, weight 50 (RepDistiller)."""

    source = "Huang & Wang, arXiv 1707.01219; RepDistiller (-b 50)"
    default_stages = slice(-1, None)

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_nst: float = 50.0,
                 student_stages: Optional[Sequence[str]] = None,
                 teacher_stages: Optional[Sequence[str]] = None) -> None:
        super().__init__(student, teacher, w_ce, student_stages, teacher_stages)
        self.w_nst = float(w_nst)

    def loss_terms(self, student, teacher, target, **context):
        s, t = self.maps(student, teacher)
        return {"nst": self.w_nst * sum(nst_loss(a, b) for a, b in zip(s, t))}


# ---------------------------------------------------------------------------------------------
# relations between samples
# ---------------------------------------------------------------------------------------------
@register("sp")
class SP(_StagePairs):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): row-normalised batch Gram matrices of the
    last stage's maps, ``||G_t - G_s||_F^2 / B^2``, weight 3000 (RepDistiller)."""

    source = "Tung & Mori, ICCV 2019; RepDistiller (-b 3000)"
    default_stages = slice(-1, None)

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_sp: float = 3000.0,
                 student_stages: Optional[Sequence[str]] = None,
                 teacher_stages: Optional[Sequence[str]] = None) -> None:
        super().__init__(student, teacher, w_ce, student_stages, teacher_stages)
        self.w_sp = float(w_sp)

    def loss_terms(self, student, teacher, target, **context):
        s, t = self.maps(student, teacher)
        return {"sp": self.w_sp * sp_loss(s, t)}


class _PooledFeatures(Distiller):
    def __init__(self, student, teacher, w_ce) -> None:
        super().__init__(student, _require_teacher(teacher, self.name), w_ce)

    @property
    def needs(self) -> Needs:
        return Needs(feats=True)


@register("pkt")
class PKT(_PooledFeatures):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): conditional probabilities
    from the cosine kernel of the pooled features, KL, weight 30000 (RepDistiller)."""

    source = "Passalis & Tefas, ECCV 2018; RepDistiller (-b 30000)"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_pkt: float = 30000.0) -> None:
        super().__init__(student, teacher, w_ce)
        self.w_pkt = float(w_pkt)

    def loss_terms(self, student, teacher, target, **context):
        return {"pkt": self.w_pkt * pkt_loss(student.feats, teacher.feats.detach())}


@register("rkd")
class RKD(_PooledFeatures):
    """Relational KD (Park et al., CVPR 2019): distance (25) and angle (50) potentials of the pooled
    features, smooth L1 (RepDistiller's weights inside the loss, method weight 1)."""

    source = "Park et al., CVPR 2019; RepDistiller (w_d 25, w_a 50)"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_rkd: float = 1.0,
                 distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__(student, teacher, w_ce)
        self.w_rkd, self.distance_weight, self.angle_weight = float(w_rkd), float(distance_weight), float(angle_weight)

    def loss_terms(self, student, teacher, target, **context):
        return {"rkd": self.w_rkd * rkd_loss(student.feats, teacher.feats.detach(), self.distance_weight,
                                             self.angle_weight)}


class _Embed(nn.Module):
    """Linear projection then L2 normalisation (RepDistiller's Embed)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@register("cc")
class CC(_PooledFeatures):
    """Correlation congruence (Peng et al., ICCV 2019): the batch correlation matrices (Gaussian RBF
    kernel, Taylor-expanded) of 128-d embeddings of the pooled features, weight 0.02 (RepDistiller)."""

    source = "Peng et al., ICCV 2019; RepDistiller (-b 0.02, 128-d embeddings)"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_cc: float = 0.02,
                 embed_dim: int = 128) -> None:
        super().__init__(student, teacher, w_ce)
        self.w_cc = float(w_cc)
        self.embed_s = _Embed(student.feature_dim, embed_dim)
        self.embed_t = _Embed(teacher.feature_dim, embed_dim)

    def loss_terms(self, student, teacher, target, **context):
        return {"cc": self.w_cc * cc_loss(self.embed_s(student.feats), self.embed_t(teacher.feats.detach()))}


@register("crd")
class CRD(_PooledFeatures):
    """Contrastive representation distillation (Tian et al., ICLR 2020): 128-d heads, tau 0.07,
    weight 0.8. ``negatives="bank"`` (default) draws K = 16384 negatives per sample from a memory
    bank of the dataset's size (momentum 0.5; ``num_data`` is required and the loop passes each
    sample's dataset ``index``); ``negatives="batch"`` contrasts within the batch (symmetric InfoNCE),
    with no bank. Under DDP every process scores its own samples against its bank and then writes the
    global batch's embeddings into it (``gather``), so the banks of all processes stay identical."""

    source = "Tian et al., ICLR 2020; RepDistiller (-b 0.8, nce_k 16384, nce_t 0.07, nce_m 0.5)"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_crd: float = 0.8,
                 embed_dim: int = 128, tau: float = 0.07, negatives: str = "bank", num_data: Optional[int] = None,
                 num_negatives: int = 16384, momentum: float = 0.5) -> None:
        super().__init__(student, teacher, w_ce)
        if negatives not in ("bank", "batch"):
            raise ValueError(f"method 'crd': negatives must be 'bank' or 'batch', got {negatives!r}")
        self.w_crd, self.tau, self.negatives = float(w_crd), float(tau), negatives
        self.embed_s = _Embed(student.feature_dim, embed_dim)
        self.embed_t = _Embed(teacher.feature_dim, embed_dim)
        self.memory: Optional[CRDMemory] = None
        # under data parallelism: maps this process's (B, ...) rows to the global batch's (the loop
        # sets it to an all-gather), so that every process's bank takes every sample's update
        self.gather: Optional[Callable[[Tensor], Tensor]] = None
        if negatives == "bank":
            if num_data is None:
                raise ValueError("method 'crd' with a memory bank needs num_data (the training set's size)")
            # RepDistiller's 16384 negatives presume a large dataset; no more than the other samples here
            self.num_negatives = min(int(num_negatives), int(num_data) - 1)
            self.memory = CRDMemory(int(num_data), embed_dim, momentum=momentum)

    @property
    def needs(self) -> Needs:
        return Needs(feats=True, context=("index",) if self.negatives == "bank" else ())

    def loss_terms(self, student, teacher, target, index=None, **context):
        e_s, e_t = self.embed_s(student.feats), self.embed_t(teacher.feats.detach())
        if self.memory is None:
            return {"crd": self.w_crd * crd_inbatch_loss(e_s, e_t, self.tau)}
        # negatives drawn from the global RNG, whose state the loop's checkpoints keep (exact resume)
        loss = crd_loss(e_s, e_t, index, self.memory, tau=self.tau, k=self.num_negatives, update=False)
        index, m_s, m_t = index, e_s.detach(), e_t.detach()
        if self.gather is not None:  # every process writes the whole global batch: the banks stay equal
            index, m_s, m_t = self.gather(index), self.gather(m_s), self.gather(m_t)
        self.memory.update(index, m_s, m_t)
        return {"crd": self.w_crd * loss}


# ---------------------------------------------------------------------------------------------
# collaborative learning and ours
# ---------------------------------------------------------------------------------------------
@register("dml")
class DML(Distiller):
    """Deep mutual learning (Zhang et al., CVPR 2018): a cohort of K >= 2 students trained together,
    each with CE plus the mean KL from the others' (detached) predictions to its own, T 1, weight 1.
    No teacher. The other members are the distiller's ``peers`` (the loop fills them): ``forward``
    then takes the first member's outputs and the batch's ``inputs``; or it takes the list of the
    whole cohort's outputs as ``student``. It returns the sum of the members' losses (each member's
    gradient is exactly that of its own loss)."""

    source = "Zhang et al., CVPR 2018"

    def __init__(self, student: ModelSpec, teacher: Optional[ModelSpec] = None, w_ce: float = 1.0,
                 w_dml: float = 1.0, temperature: float = 1.0, cohort: int = 2) -> None:
        super().__init__(student, None, w_ce)
        if int(cohort) < 2:
            raise ValueError(f"method 'dml' needs a cohort of at least 2 students, got {cohort}")
        self.w_dml, self.temperature, self.cohort = float(w_dml), float(temperature), int(cohort)
        self.peers = nn.ModuleList()

    @property
    def needs(self) -> Needs:
        return Needs(context=("inputs",) if len(self.peers) else ())

    def forward(self, student, teacher=None, target: Optional[Tensor] = None, inputs: Optional[Tensor] = None,
                **context) -> Tensor:
        if isinstance(student, Outputs) and len(self.peers) == self.cohort - 1 and inputs is not None:
            student = [student] + [Outputs(*peer(inputs)) for peer in self.peers]
        if isinstance(student, Outputs) or len(student) != self.cohort:
            raise ValueError(f"method 'dml' takes the list of its {self.cohort} students' outputs")
        kl_terms = dml_loss([o.logits for o in student], self.temperature)
        terms: dict[str, Tensor] = {}
        for k, (out, kl) in enumerate(zip(student, kl_terms)):
            if self.w_ce > 0:
                terms[f"ce{k}"] = self.w_ce * cross_entropy(out.logits, target)
            terms[f"dml{k}"] = self.w_dml * kl
        total = sum(terms.values())
        self.last = {k: v.detach() for k, v in terms.items()}
        self.last["total"] = total.detach()
        return total


@register("mlkd")
class MLKD(Distiller):
    """Multi-level KD (Ding et al., arXiv 2012.00573): :class:`mlkd_fast.MLKDLoss` (CE + KD +
    batch correlation, optional alignment and SupCon heads) behind the distiller interface. Options
    are ``MLKDLoss``'s constructor arguments; ``preset="cifar100"|"imagenet"`` starts from
    ``MLKDLoss.paper`` (4 rotation views: the loop must build view-major batches)."""

    source = "Ding et al., arXiv 2012.00573; the authors' released code for the presets"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, preset: Optional[str] = None,
                 **options) -> None:
        teacher = _require_teacher(teacher, "mlkd")
        super().__init__(student, teacher, 0.0)
        if preset is None:
            self.loss = MLKDLoss(student.feature_dim, teacher.feature_dim, w_ce=w_ce, **options)
        else:
            self.loss = MLKDLoss.paper(preset, student.feature_dim, teacher.feature_dim, w_ce=w_ce, **options)
        self.w_ce_inner = w_ce

    @property
    def needs(self) -> Needs:
        return Needs(feats=True)

    def forward(self, student: Outputs, teacher: Outputs, target: Tensor, **context) -> Tensor:
        self.check(student, teacher, context)
        total = self.loss(student.logits, teacher.logits, student.feats, teacher.feats, target)
        self.last = dict(self.loss.last)
        return total

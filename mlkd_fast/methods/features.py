"""Feature-map distillation losses of the zoo: FitNet, AT, FSP and NST.

Pure functions on stage feature maps ``(B, C, H, W)`` (any number of spatial dims ``(B, C, ...)``
where noted). They carry no loss weight: the reference implementations' weights (FitNet 100, AT
1000, NST 50 in RepDistiller / mdistiller) are the caller's. The teacher maps are used as given:
detach them when the teacher is frozen.

Precision: fp32 math, fp64 when an input is fp64; results in the dtype the inputs promote to.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .logits import _check_batch, _check_float, _check_ndim, _math_dtype, _out_dtype

__all__ = ["fitnet_loss", "attention_map", "at_loss", "fsp_matrix", "fsp_loss", "nst_loss"]

Maps = Union[Tensor, Sequence[Tensor]]


def _stage_pairs(student: Maps, teacher: Maps, s_name: str, t_name: str) -> list[tuple[Tensor, Tensor, str, str]]:
    """One map or a list of maps per network -> checked pairs with the names for error messages."""
    single = isinstance(student, Tensor)
    if single != isinstance(teacher, Tensor):
        raise TypeError(f"{s_name} and {t_name} must both be tensors or both be sequences of tensors")
    s_list = [student] if single else list(student)
    t_list = [teacher] if single else list(teacher)
    if len(s_list) != len(t_list):
        raise ValueError(f"{s_name} and {t_name} must pair up stage by stage: {len(s_list)} vs {len(t_list)} maps")
    if not s_list:
        raise ValueError(f"{s_name} and {t_name} hold no maps")
    pairs = []
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        sn, tn = (s_name, t_name) if single else (f"{s_name}[{i}]", f"{t_name}[{i}]")
        pairs.append((_check_float(s, sn), _check_float(t, tn), sn, tn))
    return pairs


# ---------------------------------------------------------------------------------------------
# FitNet (Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015)
# ---------------------------------------------------------------------------------------------
def fitnet_loss(student_map_regressed: Tensor, teacher_map: Tensor) -> Tensor:
    """Hint loss: mean squared error between the regressed student map and the teacher map.

    The regressor (RepDistiller's ``ConvReg``: a conv to the teacher's channels and size) belongs
    to the caller; shapes must match exactly. RepDistiller weights this term 100 at a middle stage.
    """
    s = _check_float(student_map_regressed, "student_map_regressed")
    t = _check_float(teacher_map, "teacher_map")
    _check_ndim(s, "student_map_regressed", 2, "(B, ...)", at_least=True)
    _check_batch(s, t, "student_map_regressed", "teacher_map")
    if s.shape != t.shape:
        raise ValueError(f"student_map_regressed must have the teacher_map's shape {tuple(t.shape)} "
                         f"(regress it first), got {tuple(s.shape)}")
    dtype = _math_dtype(s, t)
    return F.mse_loss(s.to(dtype), t.to(dtype)).to(_out_dtype(s, t))


# ---------------------------------------------------------------------------------------------
# AT (Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017)
# ---------------------------------------------------------------------------------------------
def _check_p(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not math.isfinite(float(p)) or float(p) <= 0:
        raise ValueError(f"p must be a finite number > 0, got {p!r}")
    return float(p)


def attention_map(feature_map: Tensor, p: float = 2.0) -> Tensor:
    """The spatial attention ``a = normalize(mean_c |f|^p)`` of a ``(B, C, ...)`` map, flattened to
    ``(B, prod(spatial))`` and L2-normalised per sample (``F.normalize``, eps 1e-12), in the math dtype.

    ``|f|^p`` is the paper's definition; RepDistiller writes ``f^p``, the same for even ``p`` and for
    the non-negative (post-ReLU) maps it feeds."""
    f = _check_float(feature_map, "feature_map")
    _check_ndim(f, "feature_map", 3, "(B, C, ...)", at_least=True)
    p = _check_p(p)
    f = f.to(_math_dtype(f))
    a = (f * f if p == 2.0 else f.abs().pow(p)).mean(dim=1).flatten(1)
    return F.normalize(a, p=2.0, dim=1)


def at_loss(student_maps: Maps, teacher_maps: Maps, p: float = 2.0) -> Tensor:
    """Attention transfer: ``sum over stage pairs of mean((a_s - a_t)^2)`` with :func:`attention_map`.

    ``student_maps`` / ``teacher_maps``: one ``(B, C, H, W)`` map each, or equal-length sequences of
    them (one per stage). Channels may differ between the networks (they are averaged out); the
    spatial sizes of each pair must match (pool or pick matching stages first: RepDistiller
    average-pools the larger map, which this function leaves to the caller so that a mismatch is
    never silent). No weight inside: RepDistiller and mdistiller weight the sum 1000, ``p = 2``.
    """
    p = _check_p(p)
    pairs = _stage_pairs(student_maps, teacher_maps, "student_maps", "teacher_maps")
    for s, t, sn, tn in pairs:
        _check_ndim(s, sn, 3, "(B, C, ...)", at_least=True)
        _check_ndim(t, tn, 3, "(B, C, ...)", at_least=True)
        _check_batch(s, t, sn, tn)
        if s.shape[2:] != t.shape[2:]:
            raise ValueError(f"{sn} and {tn} must have the same spatial size for attention transfer: "
                             f"{tuple(s.shape[2:])} vs {tuple(t.shape[2:])} (pool the larger one first)")
    tensors = [x for s, t, _, _ in pairs for x in (s, t)]
    dtype = _math_dtype(*tensors)
    total = sum((attention_map(s.to(dtype), p) - attention_map(t.to(dtype), p)).square().mean()
                for s, t, _, _ in pairs)
    return total.to(_out_dtype(*tensors))


# ---------------------------------------------------------------------------------------------
# FSP (Yim et al., A Gift from Knowledge Distillation, CVPR 2017)
# ---------------------------------------------------------------------------------------------
def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """The flow of solution procedure ``G = F1 F2^T / (h w)`` of two ``(B, C, H, W)`` maps of one
    network, shape ``(B, C1, C2)``, in the math dtype.

    When the spatial sizes differ the larger map is average-pooled (``adaptive_avg_pool2d``) to the
    smaller one's size, per dimension, as RepDistiller does (usually ``F1``, the shallower map)."""
    f1 = _check_float(first, "first")
    f2 = _check_float(second, "second")
    _check_ndim(f1, "first", 4, "(B, C1, H, W)")
    _check_ndim(f2, "second", 4, "(B, C2, H, W)")
    _check_batch(f1, f2, "first", "second")
    dtype = _math_dtype(f1, f2)
    f1, f2 = f1.to(dtype), f2.to(dtype)
    size = (min(f1.shape[2], f2.shape[2]), min(f1.shape[3], f2.shape[3]))
    if tuple(f1.shape[2:]) != size:
        f1 = F.adaptive_avg_pool2d(f1, size)
    if tuple(f2.shape[2:]) != size:
        f2 = F.adaptive_avg_pool2d(f2, size)
    hw = size[0] * size[1]
    return torch.bmm(f1.flatten(2), f2.flatten(2).transpose(1, 2)) / hw


PairList = Union[tuple[Tensor, Tensor], Sequence[tuple[Tensor, Tensor]]]


def _fsp_pairs(pairs: object, name: str) -> list[tuple[Tensor, Tensor]]:
    if isinstance(pairs, Sequence) and len(pairs) == 2 and all(isinstance(x, Tensor) for x in pairs):
        return [tuple(pairs)]  # a single (F1, F2) pair
    if isinstance(pairs, Tensor) or not isinstance(pairs, Sequence):
        raise TypeError(f"{name} must be an (F1, F2) pair of maps or a sequence of such pairs")
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise TypeError(f"{name}[{i}] must be an (F1, F2) pair of maps")
        out.append(tuple(pair))
    if not out:
        raise ValueError(f"{name} holds no pairs")
    return out


def fsp_loss(student_pairs: PairList, teacher_pairs: PairList) -> Tensor:
    """FSP: ``sum over pairs of mean((G_s - G_t)^2)`` with :func:`fsp_matrix` (RepDistiller's form).

    ``student_pairs`` / ``teacher_pairs``: one ``(F1, F2)`` pair of maps of each network, or
    equal-length sequences of pairs (usually consecutive stages). The FSP matrices must have equal
    shapes, i.e. the student's stages need the teacher's channel counts (FSP's own requirement).
    """
    s_pairs = _fsp_pairs(student_pairs, "student_pairs")
    t_pairs = _fsp_pairs(teacher_pairs, "teacher_pairs")
    if len(s_pairs) != len(t_pairs):
        raise ValueError(f"student_pairs and teacher_pairs must match one to one: "
                         f"{len(s_pairs)} vs {len(t_pairs)} pairs")
    tensors = [x for pair in s_pairs + t_pairs for x in pair]
    dtype = _math_dtype(*[x for x in tensors if isinstance(x, Tensor)])
    total = 0
    for i, ((s1, s2), (t1, t2)) in enumerate(zip(s_pairs, t_pairs)):
        try:
            g_s = fsp_matrix(s1, s2)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"student_pairs[{i}]: {exc}") from None
        try:
            g_t = fsp_matrix(t1, t2)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"teacher_pairs[{i}]: {exc}") from None
        _check_batch(s1, t1, f"student_pairs[{i}]", f"teacher_pairs[{i}]")
        if g_s.shape != g_t.shape:
            raise ValueError(f"student_pairs[{i}] and teacher_pairs[{i}] give FSP matrices of shapes "
                             f"{tuple(g_s.shape[1:])} vs {tuple(g_t.shape[1:])}: FSP needs equal channel counts")
        total = total + (g_s.to(dtype) - g_t.to(dtype)).square().mean()
    return total.to(_out_dtype(*tensors))


# ---------------------------------------------------------------------------------------------
# NST (Huang & Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, 2017)
# ---------------------------------------------------------------------------------------------
def nst_loss(student_map: Maps, teacher_map: Maps) -> Tensor:
    """Neuron selectivity transfer: the squared MMD between the channel activations of the two maps
    with the polynomial kernel ``k(x, y) = (x^T y)^2``.

    Each channel's activations over the ``H W`` positions are one sample, L2-normalised; per image,
    ``MMD^2 = mean k(t_i, t_j) + mean k(s_i, s_j) - 2 mean k(s_i, t_j)`` over the channel pairs of
    each block (the networks' channel counts may differ), averaged over the batch, as RepDistiller
    computes it (its "full" loss; the teacher-teacher term is a constant when the teacher is
    detached). One map per network or equal-length sequences (summed over stages). Spatial sizes
    must match (RepDistiller pools the larger map; pool first). RepDistiller and mdistiller weight
    this term 50.
    """
    pairs = _stage_pairs(student_map, teacher_map, "student_map", "teacher_map")
    for s, t, sn, tn in pairs:
        _check_ndim(s, sn, 3, "(B, C, ...)", at_least=True)
        _check_ndim(t, tn, 3, "(B, C, ...)", at_least=True)
        _check_batch(s, t, sn, tn)
        if s.shape[2:] != t.shape[2:]:
            raise ValueError(f"{sn} and {tn} must have the same spatial size for NST: "
                             f"{tuple(s.shape[2:])} vs {tuple(t.shape[2:])} (pool the larger one first)")
    tensors = [x for s, t, _, _ in pairs for x in (s, t)]
    dtype = _math_dtype(*tensors)

    def kernel_mean(x: Tensor, y: Tensor) -> Tensor:
        return torch.bmm(x, y.transpose(1, 2)).square().mean()

    total = 0
    for s, t, _, _ in pairs:
        a_s = F.normalize(s.to(dtype).flatten(2), p=2.0, dim=2)
        a_t = F.normalize(t.to(dtype).flatten(2), p=2.0, dim=2)
        total = total + kernel_mean(a_t, a_t) + kernel_mean(a_s, a_s) - 2 * kernel_mean(a_s, a_t)
    return total.to(_out_dtype(*tensors))

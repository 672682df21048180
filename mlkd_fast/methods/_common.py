"""Plumbing that several methods share: choosing and pairing stages, the stage-map and pooled-feature
base classes, the embedding head, and the row-blocked evaluation of B x B relation matrices."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import _checks as check
from .base import Distiller, ModelSpec, Needs, Outputs

Maps = Union[Tensor, Sequence[Tensor]]


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
def pick_stages(spec: ModelSpec, chosen: Optional[Sequence[str]], default: slice, role: str, method: str) -> tuple:
    names = spec.stage_names
    if chosen is None:
        picked = tuple(names[default])
    else:
        picked = tuple(chosen)
        unknown = [n for n in picked if n not in names]
        if unknown:
            raise ValueError(f"method {method!r}: the {role} has no stage {unknown}; its stages are {names}")
    if not picked:
        note = f" ({spec.stage_note})" if spec.stage_note else ""
        raise ValueError(f"method {method!r} needs stage outputs, but the {role}'s spec lists none{note}")
    return picked


def require_teacher(teacher: Optional[ModelSpec], method: str) -> ModelSpec:
    if teacher is None:
        raise ValueError(f"method {method!r} distils from a teacher: pass its ModelSpec")
    return teacher


def paired_stages(student: ModelSpec, teacher: ModelSpec, s_names, t_names, s_default: slice, t_default: slice,
                  method: str, by_resolution: bool = True) -> tuple[tuple, tuple]:
    """The stages a method compares, student and teacher one to one. By default the same slice of
    each network's stages; when the two networks have different numbers of stages (two families,
    say a MobileNet from a ShuffleNet) and ``by_resolution``, the default slice is taken of the
    stages they have at the same resolutions (for each spatial size both have, the last stage of
    that size in each)."""
    if by_resolution and s_names is None and t_names is None and len(student.stages) != len(teacher.stages) \
            and student.stages and teacher.stages:
        s, t = _by_resolution(student, teacher, s_default, method)
    else:
        s = pick_stages(student, s_names, s_default, "student", method)
        t = pick_stages(teacher, t_names, t_default, "teacher", method)
    if len(s) != len(t):
        raise ValueError(f"method {method!r} pairs stages one to one: student {list(s)} vs teacher {list(t)}; name "
                         f"them (student_stages=[...], teacher_stages=[...])")
    return s, t


def _by_resolution(student: ModelSpec, teacher: ModelSpec, default: slice, method: str) -> tuple[tuple, tuple]:
    def last_per_size(spec: ModelSpec) -> dict[tuple, str]:
        out: dict[tuple, str] = {}
        for name, shape in spec.stages.items():
            out[tuple(shape[1:])] = name
        return out

    s_sizes, t_sizes = last_per_size(student), last_per_size(teacher)
    common = [size for size in s_sizes if size in t_sizes]
    if not common:
        raise ValueError(f"method {method!r}: the student's stages {student.stage_names} and the teacher's "
                         f"{teacher.stage_names} share no spatial size to pair them by; name them "
                         f"(student_stages=[...], teacher_stages=[...])")
    return tuple(s_sizes[c] for c in common)[default], tuple(t_sizes[c] for c in common)[default]


def stage_pairs(student: Maps, teacher: Maps, s_name: str, t_name: str) -> list[tuple[Tensor, Tensor, str, str]]:
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
        pairs.append((check.float_tensor(s, sn), check.float_tensor(t, tn), sn, tn))
    return pairs


def pool_to_smaller(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The map of larger spatial size average-pooled to the other's size, as RepDistiller and mdistiller
    do before comparing maps position by position. Sizes that are not whole multiples of each other
    pool to unequal windows (``adaptive_avg_pool2d``); a map smaller in one dimension and larger in
    the other cannot be paired and raises."""
    hs, ws = s.shape[-2:]
    ht, wt = t.shape[-2:]
    if (hs, ws) == (ht, wt):
        return s, t
    if hs >= ht and ws >= wt:
        return F.adaptive_avg_pool2d(s, (ht, wt)), t
    if ht >= hs and wt >= ws:
        return s, F.adaptive_avg_pool2d(t, (hs, ws))
    raise ValueError(f"stage maps of spatial sizes {(hs, ws)} (student) and {(ht, wt)} (teacher) cannot be pooled "
                     f"to one size: neither is at least as large as the other in both dimensions")


def pooled_pair(s: Tensor, t: Tensor, s_name: str, t_name: str) -> tuple[Tensor, Tensor]:
    """:func:`pool_to_smaller` for a checked pair of maps (errors name them); maps that are not
    ``(B, C, H, W)`` must already have equal spatial sizes."""
    if s.ndim != 4 or t.ndim != 4:
        if s.shape[2:] != t.shape[2:]:
            raise ValueError(f"{s_name} and {t_name} must have the same spatial size: {tuple(s.shape[2:])} vs "
                             f"{tuple(t.shape[2:])} (only (B, C, H, W) maps are pooled to the smaller size)")
        return s, t
    try:
        return pool_to_smaller(s, t)
    except ValueError as exc:
        raise ValueError(f"{s_name} and {t_name}: {exc}") from None


class StagePairs(Distiller):
    """Base of the methods that compare the two networks stage by stage (``default_stages`` of each)."""

    default_stages = slice(None)

    def __init__(self, student, teacher, w_ce, student_stages, teacher_stages, min_size: int = 1) -> None:
        teacher = require_teacher(teacher, self.name)
        super().__init__(student, teacher, w_ce)
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
            raise ValueError(f"method {self.name!r}: min_size must be a positive int, got {min_size!r}")
        self.min_size = min_size
        if min_size > 1:  # leave out maps too small to carry spatial structure (a 2 x 2 attention map)
            student, teacher = (dataclasses.replace(spec, stages={n: shape for n, shape in spec.stages.items()
                                                                  if min(shape[1:]) >= min_size})
                                for spec in (student, teacher))
        self.s_stages, self.t_stages = paired_stages(student, teacher, student_stages, teacher_stages,
                                                     self.default_stages, self.default_stages, self.name)

    @property
    def needs(self) -> Needs:
        return Needs(student_stages=self.s_stages, teacher_stages=self.t_stages)

    def maps(self, student: Outputs, teacher: Outputs) -> tuple[list[Tensor], list[Tensor]]:
        return ([student.stages[n] for n in self.s_stages], [teacher.stages[n].detach() for n in self.t_stages])

    def weight_rescaling(self, batch_size: int) -> float:
        """For terms that scale with the positions: against the stages of RepDistiller's CIFAR ResNets,
        32 x 32, 16 x 16, 8 x 8 positions (a quarter fewer each), the ratio of ``sum 1/(H W)``."""
        if self.scales_with != "positions":
            return super().weight_rescaling(batch_size)
        ours = [1.0 / (self.student_spec.stages[n][1] * self.student_spec.stages[n][2]) for n in self.s_stages]
        theirs = [1.0 / (REFERENCE_POSITIONS / 4 ** i) for i in range(len(ours))]
        return sum(theirs) / sum(ours)


REFERENCE_POSITIONS = 32 * 32   # RepDistiller's CIFAR ResNets' first stage


class PooledFeatures(Distiller):
    """Base of the methods on the pooled penultimate features."""

    def __init__(self, student, teacher, w_ce) -> None:
        super().__init__(student, require_teacher(teacher, self.name), w_ce)

    @property
    def needs(self) -> Needs:
        return Needs(feats=True)


class Embed(nn.Module):
    """Linear projection then L2 normalisation (RepDistiller's Embed)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


# ---------------------------------------------------------------------------------------------
# B x B relations a block of rows at a time (docs/design.md §6)
# ---------------------------------------------------------------------------------------------
def default_rows(b: int, width: int = 0) -> int:
    """Rows per block: a block's ``(rows, B)`` matrices and ``(rows, width)`` slices stay near 2^22
    elements each (16 MiB in fp32), at least one row."""
    return max(1, min(b, (1 << 22) // max(1, b + width)))


def sum_over_row_blocks(block_sum: Callable[..., Tensor], b: int, rows: Optional[int], *tensors: Tensor) -> Tensor:
    """``sum over [start, stop) of block_sum(start, stop, *tensors)``, the B x B relation matrices
    built ``rows`` rows at a time. With a graph to build, each block is recomputed in the backward
    (activation checkpointing), so neither pass holds more than one block's ``(rows, B)`` matrices:
    memory O(rows * B + B * D) instead of O(B^2). One block covering every row is the plain
    computation."""
    if rows is None or rows >= b:
        return block_sum(0, b, *tensors)
    needs_graph = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    total = None
    for start in range(0, b, rows):
        stop = min(b, start + rows)
        part = (checkpoint(block_sum, start, stop, *tensors, use_reentrant=False) if needs_graph
                else block_sum(start, stop, *tensors))
        total = part if total is None else total + part
    return total

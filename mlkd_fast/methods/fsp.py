"""FSP (Yim et al., A Gift from Knowledge Distillation, CVPR 2017): the flow (Gram) matrices between
consecutive stages."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks as check
from ..ops import math_dtype
from ._common import StagePairs
from .base import ModelSpec, Outputs
from .registry import register

__all__ = ["fsp_matrix", "fsp_loss", "FSP"]


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """The flow of solution procedure ``G = F1 F2^T / (h w)`` of two ``(B, C, H, W)`` maps of one
    network, shape ``(B, C1, C2)``, in the math dtype.

    When the spatial sizes differ the larger map is average-pooled (``adaptive_avg_pool2d``) to the
    smaller one's size, per dimension, as RepDistiller does (usually ``F1``, the shallower map)."""
    f1 = check.float_tensor(first, "first")
    f2 = check.float_tensor(second, "second")
    check.ndim(f1, "first", 4, "(B, C1, H, W)")
    check.ndim(f2, "second", 4, "(B, C2, H, W)")
    check.batch(f1, f2, "first", "second")
    dtype = math_dtype(f1, f2)
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
    dtype = math_dtype(*[x for x in tensors if isinstance(x, Tensor)])
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
        check.batch(s1, t1, f"student_pairs[{i}]", f"teacher_pairs[{i}]")
        if g_s.shape != g_t.shape:
            raise ValueError(f"student_pairs[{i}] and teacher_pairs[{i}] give FSP matrices of shapes "
                             f"{tuple(g_s.shape[1:])} vs {tuple(g_t.shape[1:])}: FSP needs equal channel counts")
        total = total + (g_s.to(dtype) - g_t.to(dtype)).square().mean()
    return total.to(check.out_dtype(*tensors))


@register("fsp")
class FSP(StagePairs):
    """Gram matrices between consecutive stages, ``G = F1 F2^T / (h w)``, matched by MSE. The two maps
    of a network's pair are pooled to the smaller size (RepDistiller); the networks' maps may differ
    in size (only their channels meet, in G). FSP compares channel by channel, so where a student
    stage is narrower than the teacher's (a capacity gap) a trainable 1x1 convolution widens it
    first; equal widths are compared as they are, as in the paper.

    ``stage="init"`` (default) is RepDistiller's procedure: an initialisation stage of
    ``init_epochs`` epochs trained on the FSP loss alone, unweighted (no CE: the classifier does not
    learn), then CE alone for the rest of the run; by default an eighth of the run (their 30 of 240
    epochs, at least 1, and at least one epoch left for CE); it needs ``set_epoch(epoch, epochs)`` and a run longer than
    ``init_epochs``. (RepDistiller trains the
    initialisation stage with an optimiser of its own; here one optimiser and one lr schedule span
    the run.) ``stage="joint"`` adds ``w_fsp`` (50) times the FSP loss to CE at every epoch."""

    source = "Yim et al., CVPR 2017; RepDistiller's FSP (init stage of 30 epochs, then CE)"
    family = "representations"
    functions = (fsp_matrix, fsp_loss)

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, w_fsp: float = 50.0,
                 student_stages: Optional[Sequence[str]] = None,
                 teacher_stages: Optional[Sequence[str]] = None, stage: str = "init",
                 init_epochs: Optional[int] = None, min_size: int = 1) -> None:
        super().__init__(student, teacher, w_ce, student_stages, teacher_stages, min_size)
        if len(self.s_stages) < 2:
            raise ValueError("method 'fsp' needs at least two stages (it pairs consecutive ones)")
        if stage not in ("init", "joint"):
            raise ValueError(f"method 'fsp': stage must be 'init' or 'joint', got {stage!r}")
        if init_epochs is not None and (isinstance(init_epochs, bool) or not isinstance(init_epochs, int)
                                        or init_epochs < 1):
            raise ValueError(f"method 'fsp': init_epochs must be a positive int, got {init_epochs!r}")
        self.w_fsp, self.stage, self.init_epochs = float(w_fsp), stage, init_epochs
        self.adapters = nn.ModuleList(
            nn.Identity() if student.stages[a][0] == teacher.stages[b][0]
            else nn.Conv2d(student.stages[a][0], teacher.stages[b][0], 1, bias=False)
            for a, b in zip(self.s_stages, self.t_stages))

    @property
    def schedule(self) -> Optional[str]:
        if self.stage == "joint":
            return None
        first = "an eighth of the run" if self.init_epochs is None else f"{self.init_epochs} epochs"
        return f"the FSP loss alone for the first {first}, then CE alone"

    @property
    def schedule_needs_total(self) -> bool:
        return self.stage == "init"

    @property
    def uses_all_parameters(self) -> bool:
        return self.stage == "joint"  # the initialisation stage trains neither CE nor the classifier

    def init_length(self) -> int:
        """The initialisation stage's epochs in this run."""
        if self.init_epochs is not None:
            return self.init_epochs
        return min(max(1, (self.epochs or 0) // 8), max(0, (self.epochs or 0) - 1))  # an epoch left for CE

    def set_epoch(self, epoch: int, epochs: Optional[int] = None) -> None:
        if self.stage == "init" and epochs is not None and self.init_epochs is not None and epochs <= self.init_epochs:
            raise ValueError(f"method 'fsp': its initialisation stage takes {self.init_epochs} epochs of a "
                             f"{epochs}-epoch run, leaving none for CE: pass init_epochs < {epochs} (RepDistiller: "
                             f"30 of 240), or stage='joint'")
        super().set_epoch(epoch, epochs)

    def _fsp(self, student: Outputs, teacher: Outputs) -> Tensor:
        s, t = self.maps(student, teacher)
        s = [adapt(m) for adapt, m in zip(self.adapters, s)]
        return fsp_loss(list(zip(s[:-1], s[1:])), list(zip(t[:-1], t[1:])))

    def forward(self, student: Outputs, teacher: Outputs, target: Tensor, **context) -> Tensor:
        if self.stage == "init" and self.epoch is not None and self.epochs and self.epoch < self.init_length():
            self.check(student, teacher, context)
            return self._total({"fsp": self._fsp(student, teacher)})
        return super().forward(student, teacher, target, **context)

    def loss_terms(self, student, teacher, target, **context):
        if self.stage == "init":
            return {}  # after the initialisation stage: CE alone
        return {"fsp": self.w_fsp * self._fsp(student, teacher)}

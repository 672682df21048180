"""The distiller contract every method of the zoo follows.

A distiller is an ``nn.Module`` that takes what the student and the teacher produced for a batch
(:class:`Outputs`: logits, pooled features, stage maps) and the labels, and returns the scalar loss
``w_ce * CE + the method's terms``, keeping the detached terms in ``.last``. Whatever it trains
(regressors, embedding heads, memory banks) is its own parameters and buffers, so that
``distiller.parameters()`` goes to the optimiser and ``distiller.state_dict()`` into the checkpoint.
It declares in :attr:`Distiller.needs` which outputs it reads, so that the loop taps only those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from torch import Tensor, nn

from ..terms import cross_entropy


@dataclass(frozen=True)
class ModelSpec:
    """What a distiller needs to know about a network to size its trainable parts."""

    num_classes: int
    feature_dim: int
    stages: dict[str, tuple[int, ...]] = field(default_factory=dict)  # module path -> (C, H, W), shallow first

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages)


@dataclass
class Outputs:
    """One network's outputs for a batch: logits ``(B, K)``, pooled features ``(B, D)`` and the stage
    maps recorded by :class:`~mlkd_fast.methods.taps.FeatureTaps` (module path -> ``(B, C, H, W)``)."""

    logits: Tensor
    feats: Optional[Tensor] = None
    stages: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Needs:
    """The outputs a distiller reads: ``feats``, the stage maps (by module path) of each network, and
    extra per-batch inputs of the loop (``"index"``: the samples' dataset indices; ``"inputs"``: the
    images, with ``"teacher_fn"`` the teacher as a callable)."""

    feats: bool = False
    student_stages: tuple[str, ...] = ()
    teacher_stages: tuple[str, ...] = ()
    context: tuple[str, ...] = ()


class Distiller(nn.Module):
    """Base class: CE on the labels plus the method's terms (``loss_terms``)."""

    name: ClassVar[str] = ""
    #: where the method's default weights and temperatures come from (paper and reference code)
    source: ClassVar[str] = ""

    def __init__(self, student: ModelSpec, teacher: Optional[ModelSpec], w_ce: float = 1.0) -> None:
        super().__init__()
        if w_ce < 0:
            raise ValueError(f"w_ce must be >= 0, got {w_ce}")
        self.student_spec, self.teacher_spec = student, teacher
        self.w_ce = float(w_ce)
        self.last: dict[str, Tensor] = {}
        # the loop sets both at each epoch's start (warm-ups and schedules read them); 0 = unknown length
        self.epoch, self.epochs = 0, 0

    @property
    def needs(self) -> Needs:
        return Needs()

    def loss_terms(self, student: Outputs, teacher: Outputs, target: Tensor, **context) -> dict[str, Tensor]:
        """The method's weighted terms (each a scalar); CE is added by :meth:`forward`."""
        raise NotImplementedError

    def forward(self, student: Outputs, teacher: Optional[Outputs], target: Tensor, **context) -> Tensor:
        self.check(student, teacher, context)
        terms: dict[str, Tensor] = {}
        if self.w_ce > 0:
            terms["ce"] = self.w_ce * cross_entropy(student.logits, target)
        terms.update(self.loss_terms(student, teacher, target, **context))
        total = sum(terms.values())
        self.last = {k: v.detach() for k, v in terms.items()}
        self.last["total"] = total.detach()
        return total

    def check(self, student: Outputs, teacher: Optional[Outputs], context: dict) -> None:
        """A clear error naming the method and the output it needs when the loop did not provide it."""
        needs = self.needs
        if teacher is None and self.teacher_spec is not None:
            raise ValueError(f"method {self.name!r} needs the teacher's outputs")
        for role, out, stages in (("student", student, needs.student_stages),
                                  ("teacher", teacher, needs.teacher_stages)):
            if out is None:
                continue
            if needs.feats and out.feats is None:
                raise ValueError(f"method {self.name!r} needs the {role}'s pooled features (Outputs.feats)")
            missing = [s for s in stages if s not in out.stages]
            if missing:
                raise ValueError(f"method {self.name!r} needs the {role}'s stage outputs {missing} "
                                 f"(tap them with FeatureTaps); got {sorted(out.stages)}")
        missing = [c for c in needs.context if c not in context]
        if missing:
            raise ValueError(f"method {self.name!r} needs {missing} from the training loop")

    def extra_repr(self) -> str:
        return f"w_ce={self.w_ce:g}"


"""The distiller contract every method of the zoo follows, and the traits the loop reads.

A distiller is an ``nn.Module`` that takes what the student and the teacher produced for a batch
(:class:`Outputs`: logits, pooled features, stage maps) and the labels, and returns the scalar loss
``w_ce * CE + the method's terms``, keeping the detached terms in ``.last``. Whatever it trains
(regressors, embedding heads, memory banks, peers) is its own parameters and buffers, so that
``distiller.parameters()`` goes to the optimiser and ``distiller.state_dict()`` into the checkpoint.

What a training loop must know about a method is declared on its class, never guessed from its
name: whether it needs a teacher (:attr:`Distiller.needs_teacher`), which outputs and per-batch
inputs it reads (:attr:`Distiller.needs`), whether it compares the two networks' logits class by class
(:attr:`Distiller.compares_logits`), how its weights move with the epoch
(:attr:`Distiller.schedule`, fed by :meth:`Distiller.set_epoch`), which all-gathers it takes under
data parallelism (:attr:`Distiller.gather_hooks`), which facts of the training data its constructor
takes (:attr:`Distiller.data_options`), whether it takes rotated views (:attr:`Distiller.takes_views`)
and its options (:meth:`Distiller.options`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

from torch import Tensor, nn

from ..terms import cross_entropy


@dataclass(frozen=True)
class ModelSpec:
    """What a distiller needs to know about a network to size its trainable parts.

    ``stages``: module path -> (C, H, W) of the stage outputs, shallow first (empty when none were
    found; ``stage_note`` then says why and how to name them). ``input_shape``: the (C, H, W) of one
    input. ``feature_module``: for a network that returns logits only, the module whose input is
    the pooled features (its classifier); ``None`` when the network returns ``(logits, features)``.
    """

    num_classes: int
    feature_dim: int
    stages: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    feature_module: Optional[str] = None
    stage_note: str = ""

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
    """The outputs a distiller reads: ``feats``, the stage maps (by module path) of each network,
    extra per-batch inputs of the loop (``"index"``: the samples' dataset indices; ``"inputs"``: the
    images, with ``"teacher_fn"`` / ``"student_fn"`` the networks as callables returning logits), and
    ``peers``: how many more student networks it trains beside the student (a cohort)."""

    feats: bool = False
    student_stages: tuple[str, ...] = ()
    teacher_stages: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    peers: int = 0


REFERENCE_BATCH = 64  # RepDistiller's CIFAR batch, for which the zoo's reference weights were tuned


class Distiller(nn.Module):
    """Base class: CE on the labels plus the method's terms (``loss_terms``)."""

    name: ClassVar[str] = ""
    #: where the method's default weights and temperatures come from (paper and reference code)
    source: ClassVar[str] = ""
    #: what is distilled: "outputs", "representations", "relations", "cohort", "ours", or "none" (the baseline)
    family: ClassVar[str] = ""
    #: distils from a teacher; False: the loop builds none (and a study trains it once for every gap)
    needs_teacher: ClassVar[bool] = True
    #: plain training with no distillation term: the baseline every method is compared with
    is_baseline: ClassVar[bool] = False
    #: takes view-major batches of rotated copies (``views`` > 1 in its options)
    takes_views: ClassVar[bool] = False
    #: under data parallelism: hook name -> True when the loop must set it in every multi-process
    #: run, False when it is set on request (``--global-<name>``); :meth:`set_gather` sets one
    gather_hooks: ClassVar[Mapping[str, bool]] = {}
    #: constructor option -> fact of the training data the loop passes unless the user gives it
    #: (``"num_samples"``: the training set's size)
    data_options: ClassVar[Mapping[str, str]] = {}
    #: the method's pure functions, exported as ``mlkd_fast.functional.<function name>``
    functions: ClassVar[tuple[Callable[..., Any], ...]] = ()
    #: the option that scales the method's distillation term (what a weight search varies); None: none
    main_weight: ClassVar[Optional[str]] = None
    #: how the term's size depends on the setting: "batch" (a mean over the B x B entries of
    #: row-normalised relations: ~ 1/B), "positions" (a mean over the H x W positions of L2-normalised
    #: maps: ~ 1/(H W) per stage), or None
    scales_with: ClassVar[Optional[str]] = None

    def __init__(self, student: ModelSpec, teacher: Optional[ModelSpec], w_ce: float = 1.0) -> None:
        super().__init__()
        if w_ce < 0:
            raise ValueError(f"w_ce must be >= 0, got {w_ce}")
        self.student_spec, self.teacher_spec = student, teacher
        self.w_ce = float(w_ce)
        self.last: dict[str, Tensor] = {}
        # set by set_epoch (the loop calls it at every epoch's start); None until then
        self.epoch: Optional[int] = None
        self.epochs: Optional[int] = None

    # ---- traits of an instance (they may depend on its options) ---------------------------
    @property
    def needs(self) -> Needs:
        return Needs()

    @property
    def compares_logits(self) -> bool:
        """Whether the loss compares the student's and the teacher's logits class by class (a KL between
        their softmaxes, ...), so that both networks must have the same classes (:class:`Distillation`
        checks it when built). By default the methods that distil outputs (``family == "outputs"``)."""
        return self.family == "outputs"

    @property
    def uses_all_parameters(self) -> bool:
        """Whether every step's loss reaches every trainable parameter (of the student and the method);
        False when some steps leave some out (fsp's initialisation stage trains no classifier): DDP
        must then look for the unused ones."""
        return True

    @property
    def schedule(self) -> Optional[str]:
        """How the method's weights move with the epoch, in words; ``None`` when they do not. A method
        with a schedule refuses to run before :meth:`set_epoch` has told it the epoch."""
        return None

    @property
    def schedule_needs_total(self) -> bool:
        """Whether the schedule also needs the run's length (``set_epoch(epoch, epochs)``)."""
        return False

    def weight_rescaling(self, batch_size: int) -> float:
        """The factor by which this instance's reference weight would be rescaled to act here as it
        did in the setting it was tuned for (the batch size, the maps' sizes): 1 when the method's
        term does not scale with them. A weight search includes ``reference * factor``. Against
        RepDistiller's CIFAR setting, where the reference weights were tuned: batch 64."""
        return batch_size / REFERENCE_BATCH if self.scales_with == "batch" else 1.0

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The method's options (constructor keywords) with their defaults."""
        params = inspect.signature(cls.__init__).parameters
        return {n: (None if p.default is inspect.Parameter.empty else p.default) for n, p in params.items()
                if n not in ("self", "student", "teacher") and p.kind is not inspect.Parameter.VAR_KEYWORD}

    # ---- what the loop feeds --------------------------------------------------------------
    def set_epoch(self, epoch: int, epochs: Optional[int] = None) -> None:
        """The current epoch (0-based) and, when known, the run's length; warm-ups and weight
        schedules read them."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be an int >= 1 or None, got {epochs!r}")
        self.epoch, self.epochs = epoch, epochs

    def set_gather(self, hook: str, gather: Optional[Callable[[Tensor], Tensor]]) -> None:
        """Sets the all-gather (with gradient) that the method's ``hook`` uses under data parallelism."""
        if hook not in self.gather_hooks:
            raise ValueError(f"method {self.name!r} has no gather hook {hook!r}; its hooks: "
                             f"{', '.join(self.gather_hooks) or 'none'}")
        self._set_gather(hook, gather)

    def _set_gather(self, hook: str, gather: Optional[Callable[[Tensor], Tensor]]) -> None:
        raise NotImplementedError

    def attach_peers(self, peers: list[nn.Module]) -> None:
        """The other members of a cohort (``needs.peers`` networks), trained with the student."""
        raise ValueError(f"method {self.name!r} trains no peers")

    # ---- the loss -------------------------------------------------------------------------
    def loss_terms(self, student: Outputs, teacher: Outputs, target: Tensor, **context) -> dict[str, Tensor]:
        """The method's weighted terms (each a scalar); CE is added by :meth:`forward`."""
        raise NotImplementedError

    def forward(self, student: Outputs, teacher: Optional[Outputs], target: Tensor, **context) -> Tensor:
        self.check(student, teacher, context)
        terms: dict[str, Tensor] = {}
        if self.w_ce > 0:
            ce = cross_entropy(student.logits, target)
            terms["ce"] = ce if self.w_ce == 1.0 else self.w_ce * ce  # no product (and no node) for the default
        terms.update(self.loss_terms(student, teacher, target, **context))
        return self._total(terms)

    def _total(self, terms: dict[str, Tensor]) -> Tensor:
        values = iter(terms.values())
        total = next(values, None)
        if total is None:
            raise ValueError(f"method {self.name!r} has no term to train on: w_ce is 0 and its loss_terms are empty")
        for v in values:  # from the first term on: sum() would start with an addition of 0 (one more node)
            total = total + v
        self.last = {k: v.detach() for k, v in terms.items()}
        self.last["total"] = total.detach()
        return total

    def check(self, student: Outputs, teacher: Optional[Outputs], context: dict) -> None:
        """A clear error naming the method and what it needs when the caller did not provide it."""
        needs = self.needs
        if teacher is None and self.needs_teacher:
            raise ValueError(f"method {self.name!r} needs the teacher's outputs")
        if self.schedule is not None and (self.epoch is None or (self.schedule_needs_total and self.epochs is None)):
            what = "set_epoch(epoch, epochs)" if self.schedule_needs_total else "set_epoch(epoch)"
            raise ValueError(f"method {self.name!r} has a schedule ({self.schedule}): call {what} at each "
                             f"epoch's start, or turn the schedule off in its options")
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
        missing = [c for c in needs.context if context.get(c) is None]
        if missing:
            raise ValueError(f"method {self.name!r} needs {missing} with every batch")

    def extra_repr(self) -> str:
        return f"w_ce={self.w_ce:g}"

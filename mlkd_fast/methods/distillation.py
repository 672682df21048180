"""The zoo for users: a student, a teacher and a method in one module.

    distill = methods.Distillation(student, teacher, "dkd", input_shape=(3, 224, 224), beta=2.0)
    optimizer = torch.optim.SGD(distill.parameters(), lr=0.05, momentum=0.9)   # student + method
    for epoch in range(epochs):
        distill.set_epoch(epoch, epochs)
        for images, target in loader:
            loss = distill(images, target)        # teacher (frozen, no grad), student, the method's loss
            ...
        print(distill.last)                       # the detached terms

Built once, it taps both networks (stage maps where the method reads them, pooled features from
the network's ``(logits, features)`` return value or its classifier's input), and checks every need
of the method then, with an error naming the method and what is missing.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import Distiller, ModelSpec, Outputs
from .registry import build, method_class, resolve
from .taps import TappedNetwork, model_spec, split_outputs, unwrap


class Distillation(nn.Module):
    """``student`` trained from ``teacher`` with ``method`` (a name of :func:`available`, or a preset).

    Args:
        student: the network being trained; returns logits, or ``(logits, pooled features)``.
        teacher: the frozen teacher (put in eval mode, no gradient; not a parameter of this module);
            ``None`` for methods that train without one (``needs_teacher`` False: ce, dml).
        method: the method's name; ``options`` override its defaults (``methods.method_class(name)
            .options()`` lists them).
        input_shape: ``(C, H, W)`` of one input: the specs of both networks come from one forward
            of zeros of that shape.
        student_stages, teacher_stages: module paths of the stage maps, for methods that read them;
            by default they are found automatically (:func:`~mlkd_fast.methods.taps.stage_modules`),
            and where that fails the error says how to name them.
        peers: the other members of a cohort, for methods that train one (dml: ``cohort - 1``
            networks like the student, initialised independently); or ``peer_factory``, called
            once per member needed.
        steps_per_epoch: with it, every training-mode call counts a step and the epoch follows from
            the count (warm-ups need nothing else); without it, call :meth:`set_epoch` at each epoch's
            start when the method has a schedule (it refuses to run otherwise).
        epochs: the run's length, for methods whose schedule spans the run (bss).
        teacher_spec: instead of ``teacher``, the teacher's :class:`ModelSpec` (classes, feature width,
            stage shapes) when its outputs come from elsewhere (a teacher cache): no teacher network is
            held and every call must pass ``teacher_outputs=``. The method is built exactly as with
            the network of that spec (the same heads, the same initialisation).

    ``forward(inputs, target, index=None, teacher_outputs=None)`` returns the scalar loss; ``.last``
    holds its detached terms. ``index``: the samples' dataset indices, for methods that keep one
    entry per sample (crd with its memory bank). ``teacher_outputs``: the teacher's
    :class:`Outputs` for this batch when they come from elsewhere (a cache): the teacher does not run.
    ``parameters()`` and ``state_dict()`` hold the student's and the method's (heads, banks, peers).
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], method: str, *,
                 input_shape: Sequence[int], student_stages: Optional[Sequence[str]] = None,
                 teacher_stages: Optional[Sequence[str]] = None, peers: Optional[Sequence[nn.Module]] = None,
                 peer_factory: Optional[Callable[[], nn.Module]] = None, steps_per_epoch: Optional[int] = None,
                 epochs: Optional[int] = None, teacher_spec: Optional[ModelSpec] = None, **options: Any) -> None:
        super().__init__()
        cls = method_class(method)
        name = resolve(method)[0]
        if teacher is not None and teacher_spec is not None:
            raise ValueError("pass teacher=<network> or teacher_spec=<its ModelSpec> (outputs from a cache), not both")
        if cls.needs_teacher and teacher is None and teacher_spec is None:
            raise ValueError(f"method {method!r} distils from a teacher: pass teacher=<network> (or teacher_spec= "
                             f"and teacher_outputs= with every call, for outputs from a cache)")
        if not cls.needs_teacher:
            teacher, teacher_spec = None, None
        if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int)
                                            or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
        if teacher is not None:
            _refuse_shared_student(student, teacher)
        s_spec = model_spec(student, input_shape, student_stages)
        t_spec = model_spec(teacher, input_shape, teacher_stages) if teacher is not None else teacher_spec
        self.distiller: Distiller = build(method, s_spec, t_spec, **options)
        if t_spec is not None:
            _refuse_class_mismatch(self.distiller, name, s_spec, t_spec, from_network=teacher is not None)
        self.student = student
        self.method = method
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []  # not a submodule
        needs = self.distiller.needs
        if needs.peers:
            if peers is None and peer_factory is not None:
                peers = [peer_factory() for _ in range(needs.peers)]
            if peers is None or len(peers) != needs.peers:
                got = "none" if peers is None else str(len(peers))
                raise ValueError(f"method {name!r} trains {needs.peers} peer network(s) beside the student: pass "
                                 f"peers=[...] with {needs.peers} network(s) like the student, initialised "
                                 f"independently (got {got})")
            self.distiller.attach_peers(list(peers))
        elif peers:
            raise ValueError(f"method {name!r} trains no peers; peers= is for cohort methods (dml)")
        needs = self.distiller.needs
        self._student_run = TappedNetwork(student, needs.student_stages, s_spec.feature_module)
        self._teacher_run = (TappedNetwork(teacher, needs.teacher_stages, t_spec.feature_module)
                             if teacher is not None else None)
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.step = 0  # training-mode calls so far (in the state dict: see get_extra_state)
        if epochs is not None:
            self.distiller.set_epoch(0, epochs)

    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher[0] if self._teacher else None

    @property
    def last(self) -> dict[str, Tensor]:
        return self.distiller.last

    def set_epoch(self, epoch: int, epochs: Optional[int] = None) -> None:
        """The current epoch (0-based) and the run's length, for warm-ups and weight schedules."""
        self.distiller.set_epoch(epoch, self.epochs if epochs is None else epochs)

    def train(self, mode: bool = True) -> "Distillation":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, inputs: Tensor, target: Tensor, index: Optional[Tensor] = None,
                teacher_outputs: Optional[Outputs] = None) -> Tensor:
        d = self.distiller
        if self.steps_per_epoch is not None and self.training:
            d.set_epoch(self.step // self.steps_per_epoch, self.epochs)
            self.step += 1
        teacher_out = teacher_outputs
        if teacher_out is None and self._teacher_run is not None:
            with torch.no_grad():
                teacher_out = self._teacher_run(inputs)
        elif teacher_out is None and self.distiller.teacher_spec is not None and self.distiller.needs_teacher:
            raise ValueError(f"method {self.method!r}: this Distillation holds no teacher network (built from "
                             f"teacher_spec): pass teacher_outputs= with every call")
        student_out = self._student_run(inputs)
        wanted = d.needs.context
        context: dict[str, Any] = {}
        if "index" in wanted:
            if index is None:
                raise ValueError(f"method {self.method!r} keeps one entry per training sample: pass each batch's "
                                 f"dataset indices, distill(inputs, target, index=...)")
            context["index"] = index
        if "inputs" in wanted:
            context["inputs"] = inputs
        if "teacher_fn" in wanted:
            context["teacher_fn"] = self._teacher_logits
        if "student_fn" in wanted:
            context["student_fn"] = self._extra_logits
        return d(student_out, teacher_out, target, **context)

    def _teacher_logits(self, z: Tensor) -> Tensor:
        if self.teacher is None:
            raise ValueError(f"method {self.method!r} runs the teacher on samples it makes: this Distillation "
                             f"has no teacher network (teacher outputs from a cache cannot serve it)")
        return split_outputs(self.teacher(z))[0]

    def _extra_logits(self, z: Tensor) -> Tensor:
        """The student's logits on samples a method makes (BSS's adversarial ones). They normalise with
        their own batch statistics, but BatchNorm's running estimates, which evaluation uses, stay those
        of the training data: samples pushed far off the data would otherwise drag them there."""
        return logits_keeping_norm_statistics(self.student, z)

    def close(self) -> None:
        """Removes the forward hooks from both networks (``with Distillation(...) as d:`` does it on exit)."""
        self._student_run.close()
        if self._teacher_run is not None:
            self._teacher_run.close()

    def __enter__(self) -> "Distillation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _refuse_shared_student(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher is frozen (``requires_grad_(False)``): one module as both networks, or a teacher
    holding the student's parameters, would freeze the student too and train nothing."""
    s, t = unwrap(student), unwrap(teacher)
    if s is t:
        raise ValueError(f"student and teacher are the same module ({type(s).__name__}): the frozen teacher would "
                         f"freeze the student too; for self-distillation pass a copy, e.g. "
                         f"teacher=copy.deepcopy(student)")
    teacher_params = {id(p) for p in t.parameters()}
    shared = [n for n, p in s.named_parameters() if id(p) in teacher_params]
    if shared:
        raise ValueError(f"the teacher ({type(t).__name__}) holds {len(shared)} of the student's parameters "
                         f"(e.g. {shared[0]!r}): the frozen teacher would freeze them in the student too; "
                         f"pass a separate teacher, e.g. a copy.deepcopy of the network")


def _refuse_class_mismatch(distiller: Distiller, name: str, student: ModelSpec, teacher: ModelSpec,
                           from_network: bool) -> None:
    """A method that compares the two networks' logits class by class needs the same classes on both."""
    if not distiller.compares_logits or student.num_classes == teacher.num_classes:
        return

    def where(spec: ModelSpec, network: bool = True) -> str:
        if not network:
            return "teacher_spec.num_classes"
        return f"its classifier {spec.feature_module!r}" if spec.feature_module else "its logits"

    raise ValueError(f"method {name!r} compares the student's and the teacher's logits class by class, but the "
                     f"student has {student.num_classes} classes ({where(student)}) and the teacher "
                     f"{teacher.num_classes} ({where(teacher, from_network)}): give both networks the same classes, "
                     f"or pick a method that distils features or relations")


def logits_keeping_norm_statistics(model: nn.Module, z: Tensor,
                                   call: Optional[Callable[[Tensor], Any]] = None) -> Tensor:
    """``model``'s logits on ``z`` with its BatchNorm running estimates left as they were."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    kept = [tuple(getattr(m, n) for n in names) for m in norms]
    try:
        # the forward updates throw-away copies (BatchNorm's backward may hold them: no in-place restore)
        for m, buffers in zip(norms, kept):
            for n, b in zip(names, buffers):
                setattr(m, n, b.clone())
        return split_outputs((call or model)(z))[0]
    finally:
        for m, buffers in zip(norms, kept):
            for n, b in zip(names, buffers):
                setattr(m, n, b)

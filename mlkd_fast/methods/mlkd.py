"""MLKD (Ding et al., Multi-level / Dual-level Knowledge Distillation, arXiv 2012.00573): this
library's objective, :class:`mlkd_fast.MLKDLoss`, behind the distiller interface; ``paper`` is the
preset of its authors' recipe."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from torch import Tensor

from ..losses import MLKDLoss, mlkd_loss
from ._common import require_teacher
from .base import Distiller, ModelSpec, Needs, Outputs
from .registry import register, register_preset

__all__ = ["MLKD", "mlkd_loss"]

# inputs at most this many pixels take the authors' CIFAR-100 preset under preset="auto", larger ones
# their ImageNet one (32 x 32 CIFAR and 28 x 28 MNIST below, 224 x 224 ImageNet above)
AUTO_PRESET_MAX_PIXELS = 64 * 64


@register("mlkd")
class MLKD(Distiller):
    """CE + KD + batch correlation, optional alignment and SupCon heads (:class:`mlkd_fast.MLKDLoss`).
    Options are ``MLKDLoss``'s constructor arguments; ``preset="cifar100"|"imagenet"`` starts from
    ``MLKDLoss.paper`` (its weights and heads; ``views=4`` for its 4 rotation views: the batches must
    then be view-major), ``preset="auto"`` picks one of them from the input size (at most 64 x 64
    pixels: cifar100). Under DDP, the ``correlation`` and ``supcon`` gather hooks make those terms
    span the global batch (the loop sets them on request: ``--global-correlation``,
    ``--global-supcon``)."""

    source = "Ding et al., arXiv 2012.00573; the authors' released code for the presets"
    family = "ours"
    takes_views = True
    gather_hooks = {"correlation": False, "supcon": False}
    functions = (mlkd_loss,)
    main_weight = "w_corr"

    def __init__(self, student: ModelSpec, teacher: ModelSpec, w_ce: float = 1.0, preset: Optional[str] = None,
                 **options: Any) -> None:
        teacher = require_teacher(teacher, "mlkd")
        super().__init__(student, teacher, 0.0)
        if preset == "auto":
            if not student.input_shape:
                raise ValueError("method 'mlkd': preset='auto' picks the authors' preset from the input size, which "
                                 "the student's ModelSpec does not give; pass preset='cifar100' or 'imagenet'")
            pixels = student.input_shape[-1] * student.input_shape[-2]
            preset = "cifar100" if pixels <= AUTO_PRESET_MAX_PIXELS else "imagenet"
        self.preset = preset
        if preset is None:
            self.loss = MLKDLoss(student.feature_dim, teacher.feature_dim, w_ce=w_ce, **options)
        else:
            self.loss = MLKDLoss.paper(preset, student.feature_dim, teacher.feature_dim, w_ce=w_ce, **options)

    @classmethod
    def options(cls) -> dict[str, Any]:
        own = super().options()
        params = inspect.signature(MLKDLoss.__init__).parameters
        own.update({n: p.default for n, p in params.items()
                    if n not in ("self", "student_dim", "teacher_dim", "w_ce", "correlation_gather", "supcon_gather")})
        return own

    @property
    def needs(self) -> Needs:
        return Needs(feats=True)

    @property
    def compares_logits(self) -> bool:
        return self.loss.weights["kd"] > 0  # its KD term; the presets' weight 0 leaves it out

    def _set_gather(self, hook: str, gather: Optional[Callable[[Tensor], Tensor]]) -> None:
        setattr(self.loss, f"{hook}_gather", gather)

    def forward(self, student: Outputs, teacher: Outputs, target: Tensor, **context) -> Tensor:
        self.check(student, teacher, context)
        total = self.loss(student.logits, teacher.logits, student.feats, teacher.feats, target)
        self.last = dict(self.loss.last)
        return total


register_preset("paper", "mlkd", "MLKD with its authors' recipe: their weights and heads "
                "(preset cifar100 for inputs up to 64 x 64 pixels, imagenet above)", preset="auto")

"""What one ``mlkd-train`` invocation was asked to do, as one frozen, typed object.

:func:`.cli.parse_args` checks the command line and builds a :class:`TrainConfig` once; the run
(:mod:`.run`) reads it and never changes it. Its fields are the flags (one per ``--flag``, the same
name with ``_``) followed by what parsing derives from them (:data:`DERIVED`), in the order
``config.json`` records them (:meth:`TrainConfig.recorded`), so that ``--config run/config.json``
replays a run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

from .. import methods as M
from .training_data import DataKind, data_kind

__all__ = ["TrainConfig", "DERIVED"]

# the fields parsing derives from the flags (config.json records them after the flags)
DERIVED = ("data_kind", "data_path", "digits", "synthetic", "method_options", "loss")


@dataclass(frozen=True)
class TrainConfig:
    """The checked settings of one run. Lists and dicts are the parsed values as ``config.json``
    writes them; treat them as read-only like the rest."""

    # data
    data: str
    image_size: int
    num_classes: Optional[int]
    steps_per_epoch: Optional[int]
    workers: int
    decode: str
    on_corrupt: str
    rotations: int
    label_noise: float
    noise_type: str
    imbalance: float
    val_fraction: float
    train_per_class: Optional[int]
    subset_seed: Optional[int]                # None: the first --train-per-class images of each class
    # models
    arch: str
    teacher_arch: Optional[str]               # None only with --teacher-cache (the cache's, once opened)
    teacher_weights: Optional[str]
    teacher_new_head: bool
    # objective and optimisation
    recipe: Optional[str]
    method: str
    method_opt: list[str]
    temperature: Optional[float]
    global_correlation: bool                  # one per --global-<hook> (method_lists.gather_hook_dests)
    global_supcon: bool
    sync_bn: bool
    backend: str
    teacher_epochs: int
    epochs: int
    batch_size: int
    lr: float
    nesterov: bool
    scale_lr: bool
    lr_steps: Optional[list[int]]             # None: cosine
    weight_decay: float
    # speed
    device: str
    precision: str
    channels_last: str
    compile: bool
    teacher_cache: Optional[str]
    cache_wrap: bool
    # run
    out: str
    resume: bool
    overwrite: bool
    on_nonfinite: str
    max_steps: Optional[int]
    seed: int
    compare_baseline: bool
    config: Optional[str]
    unset: list[str]
    eval_every: int
    log_every: int
    tensorboard: bool
    curves: bool
    quiet: bool
    debug: bool
    # derived (DERIVED)
    data_kind: str
    data_path: Optional[str]
    digits: bool                              # recorded for older scripts; the kind says it
    synthetic: bool
    method_options: dict[str, Any]
    loss: str                                 # the method's name under its older key

    @cached_property
    def kind(self) -> DataKind:
        """The row of the data-kind table that ``--data`` names."""
        return data_kind(self.data)

    @cached_property
    def method_class(self) -> type:
        """The distiller class of ``--method``, resolved once."""
        return M.method_class(self.method)

    def recorded(self) -> dict[str, Any]:
        """Every field, in order: what ``config.json`` records of the flags (``--config`` reads it back)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def with_teacher_arch(self, arch: str) -> "TrainConfig":
        """This config with the teacher's architecture a teacher cache names (the run's record of it)."""
        return dataclasses.replace(self, teacher_arch=arch)

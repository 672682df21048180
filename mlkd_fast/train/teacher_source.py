"""Where a phase's teacher outputs come from, decided once per phase, and the batches the loop
trains on for each answer.

The loop (:func:`.loop.train_epoch`) trains on batches ``(x, y, extras)`` (:class:`StepBatches`) and
calls the step as ``step(x, y, **extras)``: ``extras`` holds the sample indices when the method reads
them and, when a teacher cache replaces the teacher network, the teacher's stored outputs. Which
source feeds a phase is settled when the phase is built (:func:`teacher_source`); the loop never asks.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol

from torch import Tensor

__all__ = ["NO_TEACHER", "NETWORK", "CACHE", "teacher_source", "StepBatches", "LiveBatches"]

NO_TEACHER = None        # the method distils from nothing (CE, the teacher's own phase, the baseline)
NETWORK = "network"      # a teacher network runs inside the step
CACHE = "cache"          # the teacher's outputs are read from a teacher cache and passed to the step


def teacher_source(phase: str, needs_teacher: bool, cached: bool) -> Optional[str]:
    """The source of a phase's teacher outputs: none when its method needs no teacher; the cache for
    the student of a ``--teacher-cache`` run (the only phase a cache serves); else a network."""
    if not needs_teacher:
        return NO_TEACHER
    return CACHE if phase == "student" and cached else NETWORK


class StepBatches(Protocol):
    """What the loop trains a phase on: an epoch's batches ``(x, y, extras)`` from a step on (with the
    samples' indices in ``extras`` when the method reads them), their count, the undecodable images
    skipped so far. A training source is served through :class:`LiveBatches`; a teacher cache's replay
    (:class:`.cache.reader.CachedSource`) yields this shape itself, ``teacher_outputs`` in its extras."""

    @property
    def corrupt(self) -> int: ...

    def steps_per_epoch(self) -> int: ...

    def batches(self, epoch: int, start_step: int = 0,
                with_index: bool = False) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]: ...


class LiveBatches:
    """The batches of a training source (:mod:`.sources`, :mod:`.folder`), which yields ``(x, y)`` or,
    with ``with_index``, ``(x, y, index)``, as ``(x, y, extras)``: no teacher outputs (a teacher
    network, if any, runs inside the step)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    @property
    def corrupt(self) -> int:
        return getattr(self.source, "corrupt", 0)

    def steps_per_epoch(self) -> int:
        return self.source.steps_per_epoch()

    def batches(self, epoch: int, start_step: int = 0,
                with_index: bool = False) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]:
        if not with_index:
            for x, y in self.source.epoch(epoch, start_step):
                yield x, y, {}
            return
        for x, y, index in self.source.epoch(epoch, start_step, with_index=True):
            yield x, y, {"index": index}

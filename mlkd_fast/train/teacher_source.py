"""Where a phase's teacher outputs come from, decided once per phase, and the batches the loop
trains on for each answer.

The loop (:func:`.loop.train_epoch`) trains on batches ``(x, y, extras)`` and calls the step as
``step(x, y, **extras)``: ``extras`` holds the sample indices when the method reads them and, when
a teacher cache replaces the teacher network, the teacher's stored outputs. Which of these a batch
carries is settled here, when the phase is built; the loop never asks.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol

from torch import Tensor

__all__ = ["NO_TEACHER", "NETWORK", "CACHE", "teacher_source", "StepBatches", "LiveBatches", "ReplayedBatches",
           "phase_batches"]

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
    """What the loop trains a phase on: an epoch's batches from a step on, and their count."""

    @property
    def corrupt(self) -> int: ...

    def steps_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]: ...


class LiveBatches:
    """The batches of a training source (:mod:`.data`) as ``(x, y, extras)``: ``extras`` holds
    ``index`` (the samples' positions in the training set) where the method reads it."""

    def __init__(self, source: Any, with_index: bool) -> None:
        self.source, self.with_index = source, with_index

    @property
    def corrupt(self) -> int:
        return getattr(self.source, "corrupt", 0)

    def steps_per_epoch(self) -> int:
        return self.source.steps_per_epoch()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]:
        if not self.with_index:
            for x, y in self.source.epoch(epoch, start_step):
                yield x, y, {}
            return
        for x, y, index in self.source.epoch(epoch, start_step, with_index=True):
            yield x, y, {"index": index}


class ReplayedBatches(LiveBatches):
    """The batches of a teacher cache's replay (:class:`.replay.CachedSource`), which yields
    ``(x, y, index, teacher outputs)`` today, as ``(x, y, extras)`` with ``teacher_outputs`` in the
    extras. An adapter: once the replay yields ``(x, y, {"index": ..., "teacher_outputs": ...})``
    itself, :class:`LiveBatches` serves it and this class goes."""

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]:
        for x, y, index, outputs in self.source.epoch(epoch, start_step):
            extras: dict[str, Any] = {"index": index} if self.with_index else {}
            extras["teacher_outputs"] = outputs
            yield x, y, extras


def phase_batches(source: Any, replayed: bool, with_index: bool) -> StepBatches:
    """The batches of a phase: a replay of the teacher cache (``replayed``) or the training source."""
    return ReplayedBatches(source, with_index) if replayed else LiveBatches(source, with_index)

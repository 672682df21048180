"""Training sources: what the loop iterates per epoch, already on the device (a process's
shard of each global batch), for in-memory images, synthetic batches and older tensor sets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .views import augment_params, crop_flip, epoch_order, normalize_images, normalize_with, shift_augment

__all__ = ["Shard", "TensorSource", "SyntheticSource", "MemorySource"]


@dataclass
class Shard:
    """This process's place in the run: global batch = batch_size * world."""

    batch_size: int
    rank: int = 0
    world: int = 1

    def steps(self, n: int) -> int:
        """Full global batches per epoch (the partial last one is dropped so that ranks agree)."""
        return n // (self.batch_size * self.world)

    def start(self, step: int) -> int:
        """The position in the epoch's order of this process's first sample at ``step``: its batch is the
        ``batch_size`` consecutive positions from there."""
        return (step * self.world + self.rank) * self.batch_size

    def indices(self, order: Tensor, step: int) -> Tensor:
        start = self.start(step)
        return order[start:start + self.batch_size]


@dataclass
class TensorSource:
    """In-memory float images shuffled per epoch, shifted by ``augment`` with a per-(epoch, rank)
    generator whose draws are replayed when an epoch is resumed in the middle (the digits source of
    older versions, kept for benchmarks/cc_weight.py; the loop holds digits in a :class:`MemorySource`,
    whose views are keyed per sample)."""

    x: Tensor
    y: Tensor
    shard: Shard
    seed: int
    device: torch.device
    augment: Optional[Callable[[Tensor, torch.Generator], Tensor]] = shift_augment
    corrupt: int = 0

    def steps_per_epoch(self) -> int:
        return self.shard.steps(len(self.x))

    def epoch(self, epoch: int, start_step: int = 0, with_index: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """``(images, labels)`` batches of this rank, from ``start_step``; with ``with_index`` also the
        samples' indices in the training set (methods with a per-sample memory, e.g. CRD)."""
        order = epoch_order(len(self.x), self.seed, epoch)
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch * 131 + self.shard.rank)
        for step in range(self.steps_per_epoch()):
            idx = self.shard.indices(order, step)
            xb = self.x[idx]
            if self.augment is not None:
                xb = self.augment(xb, gen)  # drawn even for skipped steps: the stream stays aligned
            if step < start_step:
                continue
            batch = (xb.to(self.device, non_blocking=True), self.y[idx].to(self.device, non_blocking=True))
            yield (*batch, idx.to(self.device, non_blocking=True)) if with_index else batch


@dataclass
class SyntheticSource:
    """ImageNet-shaped random batches generated once on the device (throughput runs)."""

    shard: Shard
    device: torch.device
    image_size: int = 224
    num_classes: int = 1000
    steps: int = 100
    pool: int = 4
    channels_last: bool = False
    corrupt: int = 0
    _batches: list = field(default_factory=list, repr=False)

    def steps_per_epoch(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        if not self._batches:
            gen = torch.Generator(device=self.device).manual_seed(1234 + self.shard.rank)
            for _ in range(self.pool):
                x = torch.randint(0, 256, (self.shard.batch_size, 3, self.image_size, self.image_size),
                                  generator=gen, device=self.device, dtype=torch.uint8)
                y = torch.randint(0, self.num_classes, (self.shard.batch_size,), generator=gen, device=self.device)
                self._batches.append((x, y))
        for step in range(start_step, self.steps):
            x, y = self._batches[step % self.pool]
            yield normalize_images(x, self.channels_last), y


@dataclass
class MemorySource:
    """An image set held once on the training device (CIFAR's 50,000 uint8 images are 150 MB), shuffled
    per epoch (:func:`epoch_order`), each batch cropped / flipped and normalised on the device.

    uint8 images are normalised with ``mean`` / ``std``; float images (digits, already scaled to
    [0, 1]) are used as they are (``mean`` / ``std`` ignored). The augmentation is drawn per sample,
    keyed by ``(seed, epoch, sample index)`` (:func:`augment_params`): a resumed epoch, any DDP world
    size and a teacher cache see the same view of each sample. The sample index is the one the
    batches carry with ``with_index`` (the position in this training set)."""

    x: Tensor
    y: Tensor
    shard: Shard
    seed: int
    device: torch.device
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    pad: int = 0
    flip: bool = False
    channels_last: bool = False
    corrupt: int = 0

    def __post_init__(self) -> None:
        self.x = self.x.to(self.device)
        self.y = self.y.to(self.device)
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device)
        self._params: Optional[tuple[int, Tensor]] = None  # the last epoch's augment_params (CPU)
        self._order: Optional[tuple[int, Tensor]] = None  # the last epoch's order (CPU)

    def augmentation(self) -> dict:
        """What draws the training views (a teacher cache's manifest records it)."""
        return {"kind": "crop_flip", "pad": self.pad, "flip": bool(self.flip), "params": ["top", "left", "flipped"]}

    def steps_per_epoch(self) -> int:
        return self.shard.steps(len(self.x))

    def _normalize(self, xb: Tensor) -> Tensor:
        if xb.is_floating_point():
            return xb.contiguous(memory_format=torch.channels_last) if self.channels_last else xb
        return normalize_with(xb, self._mean, self._std, self.channels_last)

    def order(self, epoch: int) -> Tensor:
        """The epoch's order of the samples (:func:`epoch_order`, on the CPU; kept for the last epoch asked,
        which a teacher cache's replay compares before the epoch reads it): a process's batch at a step
        holds the ones at :meth:`Shard.start` and after."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.x), self.seed, epoch))
        return self._order[1]

    def epoch_params(self, epoch: int) -> Tensor:
        """:func:`augment_params` of an epoch, on the CPU (kept for the last epoch asked)."""
        if self._params is None or self._params[0] != epoch:
            self._params = (epoch, augment_params(len(self.x), self.seed, epoch, self.pad, self.flip))
        return self._params[1]

    def epoch(self, epoch: int, start_step: int = 0, with_index: bool = False,
              with_params: bool = False, with_start: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """``(images, labels)`` batches of this rank from ``start_step``; with ``with_index`` also the
        samples' indices in the training set (methods with a per-sample memory, e.g. CRD); with
        ``with_params`` also ``(indices, params)`` on the CPU; with ``with_start`` also the batch's first
        position in :meth:`order` (an int: a teacher cache reads the rows stored there)."""
        # the epoch's order and views go to the device once: a step copies nothing from the host
        order_cpu = self.order(epoch)
        order = order_cpu.to(self.device)
        params_cpu = self.epoch_params(epoch)
        params = params_cpu.to(self.device) if self.pad or self.flip else None
        for step in range(start_step, self.steps_per_epoch()):
            idx = self.shard.indices(order, step)
            xb = self.x[idx]
            if params is not None:
                xb = crop_flip(xb, params[idx], self.pad)
            out: tuple = (self._normalize(xb), self.y[idx])
            if with_index:
                out += (idx,)
            if with_params:
                idx_cpu = self.shard.indices(order_cpu, step)
                out += ((idx_cpu, params_cpu[idx_cpu]),)
            if with_start:
                out += (self.shard.start(step),)
            yield out

    def views(self, batches) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The training views of arbitrary ``(epoch, indices)`` batches (a teacher cache's teacher
        batches): ``(x on the device, indices, params)``, the same tensors :meth:`epoch` makes."""
        for epoch, idx_cpu in batches:
            params_cpu = self.epoch_params(epoch)
            xb = self.x[idx_cpu.to(self.device)]
            if self.pad or self.flip:
                xb = crop_flip(xb, params_cpu.to(self.device)[idx_cpu.to(self.device)], self.pad)
            yield self._normalize(xb), idx_cpu, params_cpu[idx_cpu]

    def eval_batches(self, x: Tensor, y: Tensor, batch: int = 512) -> Callable[[], list]:
        """The evaluation batches of a test set (this rank's share, normalised, no augmentation)."""
        x = x[self.shard.rank::self.shard.world].to(self.device)
        y = y[self.shard.rank::self.shard.world].to(self.device)
        return lambda: ((self._normalize(x[i:i + batch]), y[i:i + batch]) for i in range(0, len(x), batch))

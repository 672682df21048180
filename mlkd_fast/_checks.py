"""The input checks every loss of the library shares (docs/design.md §4), and the two precision
helpers that go with them. Each check raises a TypeError or ValueError naming the argument, and
returns the checked value; none of them reads a tensor's values (no host synchronisation)."""
from __future__ import annotations

import math
from functools import reduce
from numbers import Real
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def float_tensor(x: object, name: str) -> Tensor:
    """A tensor of a floating dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32/float16/bfloat16/float64), got {x.dtype}")
    return x


def real(value: object, name: str, positive: bool = False) -> float:
    """A finite real number (``positive``: also > 0), as a float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")
    return value


def positive(value: object, name: str) -> float:
    return real(value, name, positive=True)


def reduction(value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {value!r}")
    return value  # type: ignore[return-value]


def same_device(tensors: Mapping[str, Optional[Tensor]]) -> torch.device:
    """The one device of the given tensors (``None`` entries skipped)."""
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; move them to one device")
    return first


def ndim(x: Tensor, name: str, dims: int, layout: str, at_least: bool = False) -> None:
    if (x.ndim < dims) if at_least else (x.ndim != dims):
        need = f"at least {dims}" if at_least else f"{dims}"
        raise ValueError(f"{name} must have shape {layout} ({need} dims), got shape {tuple(x.shape)}")


def batch(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Same non-empty batch (first dimension) and same device."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} disagree on the batch size: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError(f"empty batch: {name_a} has shape {tuple(a.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; move them to one device")


def labels(target: object, n: int, name: str = "target") -> Tensor:
    """``(n,)`` integer class (or sample) indices, as int64. Not range-checked: that would read them."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got {target.dtype}")
    if target.ndim != 1 or target.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) (one class index per row), got {tuple(target.shape)}")
    return target.long()


def logit_pair(student_logits: object, teacher_logits: object) -> tuple[Tensor, Tensor]:
    """``(N, C)`` student and teacher logits of one batch and one set of classes."""
    s = float_tensor(student_logits, "student_logits")
    t = float_tensor(teacher_logits, "teacher_logits")
    ndim(s, "student_logits", 2, "(N, C)")
    ndim(t, "teacher_logits", 2, "(N, C)")
    batch(s, t, "student_logits", "teacher_logits")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"student_logits and teacher_logits disagree on the classes C: {s.shape[1]} vs {t.shape[1]}")
    return s, t


def embeddings(f_s: object, f_t: object, s_name: str, t_name: str, flatten: bool = False) -> tuple[Tensor, Tensor]:
    """``(B, D)`` student / teacher rows (``(B, ...)`` when ``flatten``); the widths may differ."""
    s = float_tensor(f_s, s_name)
    t = float_tensor(f_t, t_name)
    layout = "(B, ...)" if flatten else "(B, D)"
    ndim(s, s_name, 2, layout, at_least=flatten)
    ndim(t, t_name, 2, layout, at_least=flatten)
    batch(s, t, s_name, t_name)
    return s, t


def chunk(value: object, name: str = "chunk") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def out_dtype(*tensors: Tensor) -> torch.dtype:
    """The floating dtype the inputs promote to: the precision a zoo loss is returned in."""
    return reduce(torch.promote_types, (t.dtype for t in tensors))


def zero_loss(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Exactly 0 with exactly zero gradients for every input, for degenerate batches. ``x * 0`` keeps
    a NaN input NaN (never hidden); summing after the product cannot overflow."""
    out = torch.zeros((), dtype=dtype, device=tensors[0].device)
    for x in tensors:
        out = out + x.to(dtype).mul(0).sum()
    return out

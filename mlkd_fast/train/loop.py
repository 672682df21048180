"""One epoch of training or evaluation, shared by the teacher, the student and the baseline."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import MLKDLoss

LOSSES = ("mlkd", "kd", "ce", "paper")


def build_loss(name: str, student_dim: int, teacher_dim: int, temperature: float, backend: str) -> Optional[MLKDLoss]:
    """The student's objective; ``None`` for plain cross-entropy without a teacher."""
    if name == "ce":
        return None
    if name == "mlkd":
        return MLKDLoss(student_dim, teacher_dim, temperature=temperature, backend=backend)
    if name == "kd":
        return MLKDLoss(student_dim, teacher_dim, temperature=temperature, w_corr=0.0, backend=backend)
    if name == "paper":
        # The released recipe's terms and weights, on single-view batches (no rotations here).
        return MLKDLoss.paper("cifar100", student_dim, teacher_dim, views=1, corr_head=True, backend=backend)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {name!r}")


def iterate_batches(n: int, batch_size: int, gen: torch.Generator, shuffle: bool = True):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def train_epoch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    gen: torch.Generator,
    loss_fn: Optional[MLKDLoss] = None,
    teacher: Optional[nn.Module] = None,
    augment: Optional[Callable[[Tensor, torch.Generator], Tensor]] = None,
) -> dict[str, float]:
    """Trains ``model`` for one epoch; with ``loss_fn`` the teacher's outputs are distilled.

    Returns the mean loss and the images/s of the epoch.
    """
    model.train()
    if loss_fn is not None:
        loss_fn.train()
    total, count, start = 0.0, 0, time.perf_counter()
    for idx in iterate_batches(len(x), batch_size, gen):
        if len(idx) < 2:  # BatchNorm and the square correlation need two rows
            continue
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(xb, gen)
        logits, feats = model(xb)
        if loss_fn is None:
            loss = F.cross_entropy(logits, yb)
        else:
            with torch.inference_mode():
                t_logits, t_feats = teacher(xb)
            loss = loss_fn(logits, t_logits.clone(), feats, t_feats.clone(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    elapsed = time.perf_counter() - start
    return {"loss": total / max(count, 1), "images_per_s": count / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits, _ = model(x[start:start + batch_size])
        correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    return 100.0 * correct / len(x)

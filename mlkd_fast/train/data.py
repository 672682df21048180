"""Datasets for the training loop. The embedded default is scikit-learn's digits (no network)."""
from __future__ import annotations

import torch
from torch import Tensor


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as ``(x_train, y_train, x_test, y_test)``: images (n, 1, 8, 8) scaled to [0, 1],
    split per class (stratified) with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - an install without the [train]/[test] extra
        raise ImportError("the digits default needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    test_mask[torch.cat(test_idx)] = True
    return x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]


def shift_augment(x: Tensor, gen: torch.Generator, max_shift: int = 1) -> Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padded), one shift per image."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    h, w = x.shape[-2:]
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :].expand(n, h, w)
    batch = torch.arange(n)[:, None, None].expand(n, h, w)
    return padded[batch, 0, rows, cols].unsqueeze(1)

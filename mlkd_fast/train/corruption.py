"""Label corruption for the robustness study: label noise (symmetric, asymmetric c -> c + 1, MNIST's
class pairs), a long-tailed class imbalance and the held-out validation split, each fixed by the seed."""
from __future__ import annotations


import torch
from torch import Tensor

__all__ = ["NOISE_TYPES", "MNIST_PAIRS", "add_label_noise", "validation_positions", "imbalance_indices"]


NOISE_TYPES = ("symmetric", "asymmetric", "mnist-pairs")
# the standard MNIST class-pair confusions (Patrini et al. 2017): 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1
MNIST_PAIRS = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}


def add_label_noise(labels: Tensor, fraction: float, num_classes: int, seed: int,
                    kind: str = "symmetric") -> tuple[Tensor, Tensor]:
    """Label noise fixed by ``seed``. Returns ``(noisy_labels, flipped_mask)``.

    - ``symmetric``: exactly ``round(fraction * n)`` labels, drawn from the whole set, are replaced by a
      uniformly drawn *different* class;
    - ``asymmetric``: in each class, exactly ``round(fraction * n_c)`` labels are replaced by one fixed
      other class, ``(c + 1) mod K`` (a systematic confusion, the harder kind: the wrong class is
      learnable);
    - ``mnist-pairs``: the standard MNIST class-pair noise (``MNIST_PAIRS``: 2 -> 7, 3 -> 8, 5 <-> 6,
      7 -> 1): in each of those source classes exactly ``round(fraction * n_c)`` labels become its pair,
      the other classes stay clean (10 classes only)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label noise must be in [0, 1), got {fraction}")
    if kind not in NOISE_TYPES:
        raise ValueError(f"noise type must be one of {NOISE_TYPES}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    n = labels.numel()
    flipped = torch.zeros(n, dtype=torch.bool)
    if kind == "symmetric":
        flipped[torch.randperm(n, generator=gen)[: int(round(fraction * n))]] = True
        shift = torch.randint(1, num_classes, (n,), generator=gen)  # never 0: the class always changes
    elif kind == "mnist-pairs":
        if num_classes != 10:
            raise ValueError(f"noise type 'mnist-pairs' needs 10 classes (MNIST's digits), got {num_classes}")
        target = labels.clone()
        for c, to in MNIST_PAIRS.items():
            idx = (labels == c).nonzero().squeeze(1)
            flipped[idx[torch.randperm(len(idx), generator=gen)[: int(round(fraction * len(idx)))]]] = True
            target[labels == c] = to
        return torch.where(flipped, target, labels), flipped
    else:
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().squeeze(1)
            flipped[idx[torch.randperm(len(idx), generator=gen)[: int(round(fraction * len(idx)))]]] = True
        shift = torch.ones(n, dtype=torch.long)
    noisy = torch.where(flipped, (labels + shift) % num_classes, labels)
    return noisy, flipped


def validation_positions(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """The positions of a validation split: ``round(fraction * n_c)`` of each class c of ``labels``
    (the observed, possibly noisy ones), drawn with a generator fixed by ``seed``, sorted; none for
    ``fraction = 0``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return torch.zeros(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(0x7A11D + seed)
    held = []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        held.append(idx[torch.randperm(len(idx), generator=gen)[: int(round(fraction * len(idx)))]])
    return torch.cat(held).sort().values


def imbalance_indices(labels: Tensor, ratio: float, seed: int) -> Tensor:
    """Long-tailed subsampling: class ``k`` (of K, in label order) keeps
    ``n_max * ratio ** (-k / (K - 1))`` of its samples (at least 1), so the largest class holds
    ``ratio`` times the smallest. Returns the kept indices, sorted."""
    if not ratio >= 1.0:
        raise ValueError(f"imbalance ratio must be >= 1, got {ratio}")
    classes = labels.unique(sorted=True)
    gen = torch.Generator().manual_seed(seed)
    n_max = max(int((labels == c).sum()) for c in classes)
    keep = []
    for k, c in enumerate(classes.tolist()):
        idx = (labels == c).nonzero().squeeze(1)
        quota = n_max * ratio ** (-k / max(len(classes) - 1, 1))
        count = min(len(idx), max(1, int(round(quota))))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:count]])
    return torch.cat(keep).sort().values

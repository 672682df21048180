"""Keyed views: the order of an epoch and each sample's augmentation as functions of ``(seed, epoch,
sample index)`` alone, so that ``--resume`` continues an epoch exactly, every DDP rank agrees on it,
and a teacher cache can rebuild (and check) the view any training step draws."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "shift_augment", "with_rotations", "epoch_order", "sample_generator",
           "random_resized_crop_params", "keyed_crop_params", "apply_crop_params", "normalize_images",
           "augment_params", "crop_flip", "normalize_with"]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)


def with_rotations(x: Tensor, views: int) -> Tensor:
    """View-major batch ``[x; rot90(x); rot180(x); rot270(x)]`` (first ``views`` of them)."""
    if views == 1:
        return x
    return torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(views)])


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The sample order of one epoch: a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator keyed by ``(seed, epoch, sample index)`` only (splitmix64 of the three): the random
    crop and flip of one folder image in one epoch, whichever worker, batch, rank or resumed step
    draws it, and what a teacher cache replays."""
    key = _splitmix64(_splitmix64(_splitmix64(0xF01DE7 ^ (seed & _MASK64)) ^ epoch) ^ index)
    return torch.Generator().manual_seed(key & ((1 << 63) - 1))


def random_resized_crop_params(height: int, width: int, gen: torch.Generator, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a RandomResizedCrop of an image of ``height x width``, drawn from ``gen``:
    torchvision's algorithm (``RandomResizedCrop.get_params``: ten tries of an area in ``scale`` and a
    log-uniform aspect ratio in ``ratio``, else the centre crop of the clamped ratio) with its
    generator made explicit."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the centre crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def keyed_crop_params(height: int, width: int, seed: int, epoch: int, index: int) -> list[int]:
    """The training view of folder sample ``index`` in ``epoch``: ``[top, left, h, w, flipped]`` of its
    RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and horizontal flip (p = 0.5), a function of
    ``(seed, epoch, index)`` and the image's size only."""
    gen = sample_generator(seed, epoch, index)
    top, left, h, w = random_resized_crop_params(height, width, gen)
    flipped = int(torch.randint(0, 2, (1,), generator=gen).item())
    return [top, left, h, w, flipped]


def apply_crop_params(img: Tensor, params: Sequence[int], size: int) -> Tensor:
    """A (3, H, W) uint8 image cropped to ``params``' box, resized to ``size x size`` (bilinear,
    antialiased: v2.RandomResizedCrop's) and flipped where ``params[4]``."""
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w, flipped = (int(v) for v in params)
    img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return img.flip(-1) if flipped else img


def normalize_images(x: Tensor, channels_last: bool) -> Tensor:
    """uint8 (n, 3, h, w) -> float normalised with the ImageNet statistics, on x's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    out = (x.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def augment_params(n: int, seed: int, epoch: int, pad: int, flip: bool) -> Tensor:
    """The random crop and flip of every training sample in one epoch, ``(n, 3)`` int64 rows
    ``(top, left, flipped)``: row i is sample i's, a function of ``(seed, epoch, i)`` only (for a training
    set of n samples), never of the batch it lands in, the rank, the world size or a resumed step.
    ``top, left`` in ``[0, 2 * pad]`` place the crop in the zero-padded image (a shift by ``pad - top``
    rows), ``flipped`` is 0/1 (always 0 without ``flip``). A teacher cache replays an epoch's views
    with this function."""
    gen = torch.Generator().manual_seed(0x5EED_0000 + seed * 100_003 + epoch)
    top = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flipped = torch.randint(0, 2, (n,), generator=gen) if flip else torch.zeros(n, dtype=torch.long)
    return torch.stack([top, left, flipped], 1)


def crop_flip(x: Tensor, params: Tensor, pad: int) -> Tensor:
    """``x`` (n, c, h, w), zero padded by ``pad`` on every side and cropped back to (h, w) at each row's
    ``(top, left)``, then flipped horizontally where ``flipped``; on x's device, any dtype."""
    n, c, h, w = x.shape
    params = params.to(x.device, non_blocking=True)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    top, left, flipped = params[:, 0], params[:, 1], params[:, 2].bool()
    rows = (top[:, None] + torch.arange(h, device=x.device)[None, :])[:, :, None].expand(n, h, w)
    cols = torch.arange(w, device=x.device)[None, :]
    cols = torch.where(flipped[:, None], w - 1 - cols, cols) + left[:, None]     # flip = read columns backwards
    cols = cols[:, None, :].expand(n, h, w)
    batch = torch.arange(n, device=x.device)[:, None, None].expand(n, h, w)
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)


def normalize_with(x: Tensor, mean, std, channels_last: bool = False) -> Tensor:
    """uint8 (n, c, h, w) -> float ``(x / 255 - mean) / std`` on x's device (``mean``, ``std``: per-channel
    sequences, or tensors already on that device, as the sources keep them: no copy per batch)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255
    out = (x.float() - m) / s
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out

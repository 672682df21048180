"""The image-folder pipeline: an ImageNet-style folder (``root/train/<class>/*.jpg``,
``root/val/<class>/*.jpg``) scanned, decoded (by loader workers, or read as bytes and decoded on the
device) and augmented with keyed crops, as a training source."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from .errors import CorruptImageError, InputError, MissingInputError
from .sources import Shard
from .views import apply_crop_params, epoch_order, keyed_crop_params, normalize_images

__all__ = ["IMAGE_EXTENSIONS", "scan_image_folder", "ImageFiles", "ImageBytes", "collate_bytes", "decode_on_device",
           "keyed_crops_on_device", "augment_on_device", "collate_skipping", "collate_keyed", "ShardSampler",
           "folder_transforms", "KeyBatches", "FolderSource"]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


def scan_image_folder(split_dir: str, classes: Optional[Sequence[str]] = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and ``(path, label)`` samples of one split, with clear errors for a missing
    folder, no class folders, or an empty class folder."""
    if not os.path.isdir(split_dir):
        raise MissingInputError(f"data folder {split_dir!r} does not exist (expected <data>/train and <data>/val "
                                "with one sub-folder per class)")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not found:
        raise InputError(f"{split_dir!r} holds no class folders")
    classes = list(classes) if classes is not None else found
    missing = sorted(set(found) - set(classes))
    if missing:
        raise InputError(f"{split_dir!r} has class folders not in the training split: {missing[:5]}")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(folder) for f in fs
                       if f.endswith(IMAGE_EXTENSIONS)) if os.path.isdir(folder) else []
        if not files and name in found:
            raise InputError(f"class folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS[:5])}...)")
        samples += [(f, label) for f in files]
    return classes, samples


class ImageFiles(torch.utils.data.Dataset):
    """Decoded, augmented uint8 images of a folder split (PIL on the CPU workers).

    Items are ``(image, label, index)``. A file that fails to decode gives ``None`` (counted and
    dropped by :func:`collate_skipping`) or, with ``on_corrupt="fail"``, an error that names it.

    With ``keyed=(seed, size)`` (the training split) the item key is ``(index, epoch)`` and the view
    is :func:`keyed_crop_params`' (a function of seed, epoch and index, the image's size given); the
    item is then ``(image, label, index, params)`` (:func:`collate_keyed`).
    """

    def __init__(self, samples: list[tuple[str, int]], transform, on_corrupt: str = "skip",
                 keyed: Optional[tuple[int, int]] = None) -> None:
        self.samples, self.transform, self.on_corrupt, self.keyed = samples, transform, on_corrupt, keyed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        from PIL import Image

        i, epoch = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as exc:  # PIL raises several types for damaged files
            if self.on_corrupt == "fail":
                raise CorruptImageError(f"cannot decode image {path!r}: {exc}") from exc
            return None
        if epoch is None or self.keyed is None:
            return self.transform(img), label, i
        from torchvision.transforms.v2 import functional as TF

        seed, size = self.keyed
        img = TF.pil_to_tensor(img)
        params = keyed_crop_params(img.shape[-2], img.shape[-1], seed, epoch, i)
        return apply_crop_params(img, params, size), label, i, params


class ImageBytes(torch.utils.data.Dataset):
    """Raw file bytes of a folder split, for decoding on the training device (``--decode device``):
    the workers only read files, so few CPU cores can feed a GPU (nvJPEG decodes the JPEGs). Items
    are ``(bytes, label, path, index)``, and ``(bytes, label, path, index, epoch)`` for an
    ``(index, epoch)`` key (the training split: the view is drawn on the device, keyed the same)."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        from torchvision.io import read_file

        i, epoch = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        item = (read_file(path), label, path, i)
        return item if epoch is None else (*item, epoch)


def collate_bytes(batch):
    """``(file bytes, labels, paths, indices)`` of a batch (and the epochs of keyed items)."""
    out = ([b[0] for b in batch], torch.tensor([b[1] for b in batch]), [b[2] for b in batch],
           torch.tensor([b[3] for b in batch]))
    return (*out, [b[4] for b in batch]) if batch and len(batch[0]) > 4 else out


def _is_jpeg(data: Tensor) -> bool:
    return data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8  # the JPEG SOI marker


def _decode_one(data: Tensor, device: torch.device) -> Tensor:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if device.type == "cuda" and _is_jpeg(data):
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return decode_image(data, mode=ImageReadMode.RGB).to(device, non_blocking=True)


def decode_on_device(datas: list[Tensor], paths: list[str], device: torch.device,
                     on_corrupt: str = "skip") -> list[Optional[Tensor]]:
    """Decodes file bytes to (3, h, w) uint8 images on ``device`` (JPEGs batched through nvJPEG on
    CUDA); an undecodable file gives ``None``, or with ``on_corrupt="fail"`` an error naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda" and all(_is_jpeg(d) for d in datas):
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass  # one bad file fails the batch: find it below, one by one
    images: list[Optional[Tensor]] = []
    for data, path in zip(datas, paths):
        try:
            images.append(_decode_one(data, device))
        except RuntimeError as exc:
            if on_corrupt == "fail":
                raise CorruptImageError(f"cannot decode image {path!r}: {exc}") from exc
            images.append(None)
    return images


def keyed_crops_on_device(images: list[Tensor], keys: Sequence[tuple[int, int, int]], size: int) -> tuple[Tensor, Tensor]:
    """The training views of decoded images on their device, each drawn by :func:`keyed_crop_params`
    from its ``(seed, epoch, index)`` key: ``((n, 3, size, size) uint8, (n, 5) int64 params)``, the
    views the workers' path (:class:`ImageFiles` keyed) draws for the same keys and image sizes."""
    params = [keyed_crop_params(img.shape[-2], img.shape[-1], *key) for img, key in zip(images, keys)]
    return (torch.stack([apply_crop_params(img, p, size) for img, p in zip(images, params)]),
            torch.tensor(params, dtype=torch.long).reshape(-1, 5))


def augment_on_device(images: list[Tensor], train: bool, size: int) -> Tensor:
    """RandomResizedCrop + horizontal flip (train) or resize + centre crop (eval), image by image on
    the images' device; returns a (n, 3, size, size) uint8 batch."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as TF

    out = []
    for img in images:
        if train:
            top, left, h, w = RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
            if bool(torch.rand(()) < 0.5):
                img = img.flip(-1)
        else:
            img = TF.center_crop(TF.resize(img, [int(math.ceil(size * 256 / 224))], antialias=True), [size, size])
        out.append(img)
    return torch.stack(out)


def collate_skipping(batch):
    """Stacks the decodable samples of a batch; returns ``(images, labels, n_corrupt, indices)``."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, None, len(batch), None
    return (torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]), len(batch) - len(good),
            torch.tensor([b[2] for b in good]))


def collate_keyed(batch):
    """:func:`collate_skipping` of keyed items: ``(images, labels, n_corrupt, indices, params)``, params
    the ``(n, 5)`` crop boxes and flips of the decodable samples."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, None, len(batch), None, None
    return (*collate_skipping(good)[:2], len(batch) - len(good), torch.tensor([b[2] for b in good]),
            torch.tensor([b[3] for b in good], dtype=torch.long))


class ShardSampler(torch.utils.data.Sampler):
    """This rank's ``(index, epoch)`` keys of one epoch in global-batch order, from ``start_step`` on
    (the epoch goes with each index: the dataset draws the sample's view from both)."""

    def __init__(self, n: int, shard: Shard, seed: int) -> None:
        self.n, self.shard, self.seed = n, shard, seed
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        for step in range(self.start_step, self.shard.steps(self.n)):
            yield from ((i, self.epoch) for i in self.shard.indices(order, step).tolist())

    def __len__(self) -> int:
        return (self.shard.steps(self.n) - self.start_step) * self.shard.batch_size


def folder_transforms(train: bool, image_size: int):
    """The torchvision transforms of a folder split: the evaluation resize + centre crop; ``train``:
    RandomResizedCrop + flip from the global RNG (the loop's training split draws the same views keyed
    by sample instead: :func:`keyed_crop_params`)."""
    from torchvision.transforms import v2

    if train:
        return v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(image_size, antialias=True),
                           v2.RandomHorizontalFlip()])
    return v2.Compose([v2.PILToTensor(), v2.Resize(int(math.ceil(image_size * 256 / 224)), antialias=True),
                       v2.CenterCrop(image_size)])


class KeyBatches(torch.utils.data.Sampler):
    """A batch sampler of ``(index, epoch)`` keys: each ``(epoch, indices)`` of ``batches`` is one
    batch (a teacher cache's teacher batches), generated lazily."""

    def __init__(self, batches) -> None:
        self.batches = batches

    def __iter__(self):
        for epoch, index in self.batches:
            yield [(int(i), int(epoch)) for i in index.tolist()]

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class FolderSource:
    """An ImageNet-style split read by DataLoader workers (decode + crop on the CPU), normalised on
    the device. ``corrupt`` counts the undecodable files skipped so far.

    The training split's crop box and flip are drawn per sample from a generator keyed by ``(seed,
    epoch, sample index)`` (:func:`keyed_crop_params`; the sampler hands the epoch to the dataset with
    each index), on either decode path: a resumed epoch, any DDP world size and a teacher cache see
    the same view of each image (for the same decoded pixels: ``--decode workers`` decodes with PIL,
    ``device`` with torchvision, which a cache records)."""

    samples: list[tuple[str, int]]
    shard: Shard
    seed: int
    device: torch.device
    train: bool
    image_size: int = 224
    workers: int = 4
    channels_last: bool = False
    on_corrupt: str = "skip"
    decode: str = "workers"   # "workers": PIL in the loader processes; "device": bytes decoded on the device
    corrupt: int = 0

    def __post_init__(self) -> None:
        if self.decode == "device":
            self.dataset = ImageBytes(self.samples)
        else:
            self.dataset = ImageFiles(self.samples, folder_transforms(False, self.image_size), self.on_corrupt,
                                      keyed=(self.seed, self.image_size) if self.train else None)
        self.sampler = ShardSampler(len(self.samples), self.shard, self.seed) if self.train else None
        self._loader = None

    def augmentation(self) -> dict:
        """What draws the training views (a teacher cache's manifest records it)."""
        return {"kind": "random_resized_crop", "image_size": self.image_size, "scale": [0.08, 1.0],
                "ratio": [3 / 4, 4 / 3], "flip": True, "decode": self.decode,
                "params": ["top", "left", "height", "width", "flipped"]}

    def steps_per_epoch(self) -> int:
        if self.train:
            return self.shard.steps(len(self.samples))
        return math.ceil(len(self.samples) / self.shard.batch_size)

    def _collate(self):
        if self.decode == "device":
            return collate_bytes
        return collate_keyed if self.train else collate_skipping

    def _loader_kwargs(self) -> dict:
        kwargs = dict(num_workers=self.workers, collate_fn=self._collate(),
                      pin_memory=self.device.type == "cuda" and self.decode != "device")
        if self.workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=4)
        return kwargs

    def _make_loader(self):
        kwargs = dict(batch_size=self.shard.batch_size, **self._loader_kwargs())
        if self.train:
            return torch.utils.data.DataLoader(self.dataset, sampler=self.sampler, drop_last=True, **kwargs)
        # evaluation: this rank's contiguous share of the split, no padding (metrics are summed)
        per_rank = math.ceil(len(self.dataset) / self.shard.world)
        subset = torch.utils.data.Subset(self.dataset, range(self.shard.rank * per_rank,
                                                             min(len(self.dataset), (self.shard.rank + 1) * per_rank)))
        return torch.utils.data.DataLoader(subset, shuffle=False, **kwargs)

    def _batches(self, loader, keep_empty: bool = False) -> Iterator[tuple[Optional[Tensor], ...]]:
        """``(x on the device, labels, indices, params)`` of a loader's batches (params None for
        evaluation), the undecodable files left out (counted in ``corrupt``); a batch of undecodable files
        only is left out too, or with ``keep_empty`` given as ``(None, None, empty indices, None)``."""
        empty = (None, None, torch.zeros(0, dtype=torch.long), None)
        for batch in loader:
            params = None
            if self.decode == "device":
                datas, labels, paths, index, *epochs = batch
                decoded = decode_on_device(datas, paths, self.device, self.on_corrupt)
                good = [i for i, img in enumerate(decoded) if img is not None]
                self.corrupt += len(decoded) - len(good)
                if not good:
                    if keep_empty:
                        yield empty
                    continue
                images = [decoded[i] for i in good]
                labels, index = labels[good], index[good]
                if epochs:
                    keys = [(self.seed, epochs[0][i], int(index[j])) for j, i in enumerate(good)]
                    images, params = keyed_crops_on_device(images, keys, self.image_size)
                else:
                    images = augment_on_device(images, False, self.image_size)
                x = normalize_images(images, self.channels_last)
            else:
                images, labels, corrupt, index, *rest = batch
                self.corrupt += corrupt
                if images is None:
                    if keep_empty:
                        yield empty
                    continue
                params = rest[0] if rest else None
                x = normalize_images(images.to(self.device, non_blocking=True), self.channels_last)
            yield x, labels, index, params

    def epoch(self, epoch: int, start_step: int = 0, with_index: bool = False,
              with_params: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """``(images, labels)`` batches on the device; with ``with_index`` also the samples' indices in
        the split (methods with a per-sample memory, e.g. CRD); with ``with_params`` also ``(indices,
        params)`` on the CPU, the (n, 5) crop boxes and flips of the batch (a teacher cache checks them).
        Undecodable files are left out."""
        if self.train:
            self.sampler.set_epoch(epoch, start_step)
            if start_step:  # persistent workers hold the old sampler position: start afresh
                self._loader = None
        if self._loader is None:
            self._loader = self._make_loader()
        for x, labels, index, params in self._batches(self._loader):
            out = (x, labels.to(self.device, non_blocking=True))
            if with_index:
                out += (index.to(self.device, non_blocking=True),)
            if with_params:
                out += ((index, params),)
            yield out

    def views(self, batches) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The training views of arbitrary ``(epoch, indices)`` batches (a teacher cache's teacher batches),
        through the same dataset and workers: ``(x on the device, indices, params)``, indices and params on
        the CPU, for the decodable samples; one item per batch (x None when none of it decodes)."""
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=KeyBatches(batches), **self._loader_kwargs())
        for x, _, index, params in self._batches(loader, keep_empty=True):
            yield x, index, params

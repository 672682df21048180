"""Exporting a trained network of an ``mlkd-train`` run to its library's own layout.

``<run>/student.pt`` holds ``{"model": state_dict, "arch": name}`` in the loop's layout: a
torchvision or timm network is wrapped (:class:`~.models.WithFeatures`: ``body.<the network's keys>``
with the classifier moved to ``head.``), so its state dict does not load into the model it came from.
:func:`export_student` writes the plain state dict of the network's own library (torchvision's, timm's
key names: ``model.load_state_dict(torch.load(path))``) and, beside it, a small JSON file with how to
build the model and the evaluation transform the run's test set went through (size, resize / crop,
scale, mean / std). The digits CNNs (``cnn-*``) and the CIFAR KD architectures (RepDistiller's layout)
are this library's own: their state dict is written as it is.

    python -m mlkd_fast.train.export runs/r18 r18.pt        # r18.pt and r18.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Optional, Sequence

import torch

from . import data as D
from .checkpoint import read_torch_file, save_checkpoint, write_json_atomic
from .errors import InputError, MissingInputError, UserError, one_line
from .models import DIGITS_ARCHS, TIMM_PREFIX, WithFeatures, build_model, classifier_name

__all__ = ["export_student", "eval_transform", "main"]


def _library(arch: str) -> str:
    if arch.startswith(TIMM_PREFIX):
        return "timm"
    if arch in DIGITS_ARCHS:
        return "mlkd_fast"
    from .cifar_models import CIFAR_ARCHS

    return "mlkd_fast (RepDistiller / mdistiller layout)" if arch in CIFAR_ARCHS else "torchvision"


def eval_transform(config: dict[str, Any]) -> dict[str, Any]:
    """The evaluation transform of a run's data (its ``config.json``), as the loop applied it to the
    test set: ``x = (pixel * scale - mean) / std`` per channel after the resize / centre crop (folder
    data: ``resize`` the shorter side, bilinear with antialiasing, then ``center_crop``)."""
    kind = config.get("data_kind")
    if kind == "digits":
        return {"input_size": [1, 8, 8], "resize": None, "center_crop": None, "scale": 1 / 16, "mean": [0.0],
                "std": [1.0], "pixels": "scikit-learn load_digits values 0..16"}
    if kind == "mnist5k":
        return {"input_size": [1, 28, 28], "resize": None, "center_crop": None, "scale": 1 / 255, "mean": [0.0],
                "std": [1.0], "pixels": "uint8 grayscale"}
    if kind in D.CIFAR_KINDS:
        mean, std = D.CIFAR_MEAN_STD[kind]
        return {"input_size": [3, 32, 32], "resize": None, "center_crop": None, "scale": 1 / 255, "mean": list(mean),
                "std": list(std), "pixels": "uint8 RGB"}
    size = int(config.get("image_size") or 224)
    transform = {"input_size": [3, size, size], "resize": None, "center_crop": None, "scale": 1 / 255,
                 "mean": list(D.IMAGENET_MEAN), "std": list(D.IMAGENET_STD), "pixels": "uint8 RGB"}
    if kind == "folder":  # data.folder_transforms(False, size)
        transform.update(resize=int(math.ceil(size * 256 / 224)), center_crop=size)
    else:
        transform["pixels"] = "synthetic data: random batches (no images), normalised as ImageNet's"
    return transform


def _library_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loop's state dict of ``model`` in its library's layout: a :class:`WithFeatures` network's
    ``body.`` keys unprefixed and its ``head.`` keys back under the classifier's own path."""
    if not isinstance(model, WithFeatures):
        return dict(state)
    head = model.head_path + "."
    out = {}
    for key, value in state.items():
        if key.startswith("body."):
            out[key[len("body."):]] = value
        elif key.startswith("head."):
            out[head + key[len("head."):]] = value
        else:
            raise InputError(f"unexpected key {key!r} in a {type(model).__name__} state dict")
    return out


def _library_model(arch: str, num_classes: int, in_channels: int) -> Optional[torch.nn.Module]:
    """The network as its library builds it (None for this library's own)."""
    if arch.startswith(TIMM_PREFIX):
        import timm

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return timm.create_model(arch[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels)
    if _library(arch) == "torchvision":
        import torchvision

        options = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)
    return None


def export_student(run_dir: str, out: str, phase: str = "student") -> dict[str, Any]:
    """Writes the final weights of ``phase`` (``student``, ``baseline`` or ``teacher``) of the run in
    ``run_dir`` to ``out`` as a plain state dict in its library's own layout, checked by loading it
    (strictly) into the network its library builds; and ``<out without .pt>.json`` beside it: the
    architecture, library, class count, how to load it and :func:`eval_transform`. Returns that JSON's
    contents."""
    weights = os.path.join(run_dir, f"{phase}.pt")
    if not os.path.isfile(weights):
        raise MissingInputError(f"no {phase}.pt in {run_dir!r}: a finished mlkd-train run's folder holds it")
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise MissingInputError(f"no config.json in {run_dir!r}: the run's data (for the transform) is unknown")
    with open(config_path) as f:
        config = json.load(f)
    saved = read_torch_file(weights, weights_only=True)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict) or "arch" not in saved:
        raise InputError(f"{weights!r} is not an mlkd-train weights file ({{'model': ..., 'arch': ...}})")
    arch, state = saved["arch"], saved["model"]
    in_channels = 1 if config.get("data_kind") in ("digits", "mnist5k") else 3
    probe = build_model(arch, 2, in_channels=in_channels)  # the classifier's name; its width comes from the weights
    num_classes = int(state[f"{classifier_name(probe)}.weight"].shape[0])
    model = build_model(arch, num_classes, in_channels=in_channels)
    model.load_state_dict(state)
    exported = _library_state(model, state)
    plain = _library_model(arch, num_classes, in_channels)
    (plain if plain is not None else model).load_state_dict(exported)  # strict: the layout is the library's
    library = _library(arch)
    name = arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else arch
    load = {"timm": f"timm.create_model({name!r}, num_classes={num_classes}, in_chans={in_channels})",
            "torchvision": f"torchvision.models.get_model({name!r}, weights=None, num_classes={num_classes})"}.get(
        library, f"mlkd_fast.train.models.build_model({arch!r}, {num_classes}, in_channels={in_channels})")
    meta = {"arch": arch, "library": library, "num_classes": num_classes, "phase": phase,
            "weights": os.path.basename(out), "load": f"{load}.load_state_dict(torch.load(path))",
            "returns": "(logits, pooled features)" if plain is None else "logits",
            "transform": eval_transform(config)}
    save_checkpoint(out, exported)
    write_json_atomic(os.path.splitext(out)[0] + ".json", meta)
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mlkd_fast.train.export RUN OUT [--phase student]``: exit status 0, or 2 with one line."""
    p = argparse.ArgumentParser(prog="python -m mlkd_fast.train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="an mlkd-train run folder (holding student.pt and config.json)")
    p.add_argument("out", help="the state dict to write (a .pt file; its .json is written beside it)")
    p.add_argument("--phase", choices=("student", "baseline", "teacher"), default="student",
                   help="which trained network (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        meta = export_student(args.run, args.out, args.phase)
    except UserError as exc:
        print(f"{p.prog}: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    print(f"{args.out}: {meta['arch']} ({meta['library']}, {meta['num_classes']} classes); load with {meta['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

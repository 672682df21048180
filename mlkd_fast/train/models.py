"""Networks for the training loop; each returns ``(logits, pooled penultimate features)``."""
from __future__ import annotations

import os

from torch import Tensor, nn

from .checkpoint import read_torch_file
from .errors import InputError, MissingDependencyError, MissingInputError

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large")
DIGITS_ARCHS = ("cnn-tiny", "cnn-small", "cnn-large")
ARCHS = DIGITS_ARCHS + TORCHVISION_ARCHS


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stages with max pooling, global average pooling and a linear classifier.

    ``widths`` sets the channels of each stage; the feature dimension is ``widths[-1]``.
    """

    def __init__(self, widths: tuple[int, ...], num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.pool(self.body(x)).flatten(1)
        return self.fc(feats), feats


class WithFeatures(nn.Module):
    """A torchvision classifier split at its last pooling: ``(head(f), f)`` with ``f`` the pooled
    features (the input of ``fc`` / ``classifier``)."""

    def __init__(self, net: nn.Module, head_name: str) -> None:
        super().__init__()
        self.head = getattr(net, head_name)
        setattr(net, head_name, nn.Identity())
        self.body = net
        first = self.head if isinstance(self.head, nn.Linear) else next(m for m in self.head if isinstance(m, nn.Linear))
        self.feature_dim = first.in_features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.body(x)
        return self.head(feats), feats


def build_model(arch: str, num_classes: int, weights_path: str | None = None) -> nn.Module:
    """A network by name; ``weights_path`` loads a state dict (of the plain torchvision model, of
    this wrapper, or a ``{"model": state_dict}`` checkpoint) with a clear error when it does not fit."""
    if arch == "cnn-tiny":
        model: nn.Module = SmallCNN((4, 8, 16), num_classes)
    elif arch == "cnn-small":
        model = SmallCNN((8, 16, 32), num_classes)
    elif arch == "cnn-large":
        model = SmallCNN((32, 64, 128), num_classes)
    elif arch in TORCHVISION_ARCHS:
        try:
            import torchvision
        except ImportError as exc:
            raise MissingDependencyError(f"--arch {arch} needs torchvision: pip install torchvision") from exc
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        model = WithFeatures(net, "fc" if arch.startswith("resnet") else "classifier")
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    if weights_path is not None:
        load_weights(model, weights_path, arch)
    return model


def classifier_name(model: nn.Module) -> str:
    """The name of the final linear layer, the one whose outputs are the classes (``fc``, ``head``,
    ``head.3``): its keys are those ``--teacher-new-head`` replaces."""
    root, prefix = (model.head, "head") if isinstance(model, WithFeatures) else (model, "")
    names = [n for n, m in root.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear classifier")
    return ".".join(p for p in (prefix, names[-1]) if p)


def load_weights(model: nn.Module, path: str, arch: str, new_head: bool = False) -> None:
    """Loads a state dict into ``model`` (see :func:`build_model`), with a clear error when it is
    missing, unreadable, of another architecture or of another class count. ``new_head`` keeps the
    model's own (freshly initialised) classifier and loads everything else: weights trained on other
    classes, to be fine-tuned on these."""
    if not os.path.isfile(path):
        raise MissingInputError(f"weights file {path!r} does not exist")
    state = read_torch_file(path, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InputError(f"{path!r} does not hold a state dict")
    if isinstance(model, WithFeatures) and not any(k.startswith(("body.", "head.")) for k in state):
        # a plain torchvision state dict: its fc / classifier keys are the head's
        head = "fc." if "fc.weight" in state else "classifier."
        state = {("head." + k[len(head):]) if k.startswith(head) else "body." + k: v for k, v in state.items()}
    own = model.state_dict()
    cls = classifier_name(model)
    cls_keys = {f"{cls}.weight", f"{cls}.bias"}
    rest_fits = set(state) - cls_keys == set(own) - cls_keys and all(
        getattr(state[k], "shape", None) == own[k].shape for k in own if k not in cls_keys)
    theirs, ours = getattr(state.get(f"{cls}.weight"), "shape", (None,))[0], own[f"{cls}.weight"].shape[0]
    if new_head:
        state = {k: v for k, v in state.items() if k not in cls_keys}
    elif rest_fits and theirs is not None and theirs != ours:
        raise InputError(f"weights {path!r} classify {theirs} classes but the data has {ours}: give weights "
                         f"trained on these {ours} classes, or --teacher-new-head (with --teacher-epochs N) to "
                         f"replace their {theirs}-class classifier with a new one for {ours} classes and fine-tune "
                         f"the teacher on the data")
    try:
        missing, unexpected = model.load_state_dict(state, strict=not new_head)
    except RuntimeError as exc:
        raise InputError(f"weights {path!r} do not fit --arch {arch} (a checkpoint of another architecture or "
                         f"class count?): {str(exc).splitlines()[0]} ...") from exc
    if new_head and (set(missing) - cls_keys or unexpected):
        raise InputError(f"weights {path!r} do not fit --arch {arch} (a checkpoint of another architecture?): "
                         f"missing {sorted(set(missing) - cls_keys)[:5]}, unexpected {sorted(unexpected)[:5]}")

"""Networks for the training loop; each returns ``(logits, pooled penultimate features)``.

``--arch`` names: the digits CNNs (``cnn-tiny``, ``cnn-small``, ``cnn-large``), any torchvision
classification model (``torchvision.models.list_models(module=torchvision.models)``: ``resnet18``,
``mobilenet_v3_large``, ``convnext_tiny``, ``vit_b_16``, ...) and, with timm installed (an optional
extra), ``timm:<name>`` for any model of ``timm.list_models()``. torchvision and timm models are
built without weights (nothing is downloaded, ever) and split at their classifier (:class:`WithFeatures`):
their weights come from local files (``--teacher-weights``: a state dict, an mlkd-train ``.pt``, a
``{"model": ...}`` or ``{"state_dict": ...}`` checkpoint such as timm's).
"""
from __future__ import annotations

import difflib
import os
import pickletools
import zipfile
from typing import Optional

from torch import Tensor, nn

from .checkpoint import read_torch_file
from .cifar_models import CIFAR_ARCHS as _CIFAR_ARCHS
from .errors import InputError, MissingDependencyError, MissingInputError

DIGITS_ARCHS = ("cnn-tiny", "cnn-small", "cnn-large")
TIMM_PREFIX = "timm:"
# the torchvision models the loop has always named (kept in ARCHS, the list --help shows)
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large")
# the CIFAR KD architectures of RepDistiller / mdistiller (resnet8x4, wrn_40_2, ...: cifar_models.py)
ARCHS = DIGITS_ARCHS + tuple(_CIFAR_ARCHS) + TORCHVISION_ARCHS


def torchvision_classifiers() -> list[str]:
    """Every torchvision classification model's name (empty when torchvision is missing)."""
    try:
        import torchvision
    except ImportError:
        return []
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(name: str) -> str:
    """``name`` if it names a network :func:`build_model` can build, else a ValueError that says what
    exists (used as the argparse type of ``--arch`` / ``--teacher-arch``)."""
    if name in DIGITS_ARCHS or name in _CIFAR_ARCHS:
        return name
    if name.startswith(TIMM_PREFIX):
        timm = _timm(name)
        if name[len(TIMM_PREFIX):] not in timm.list_models():
            close = difflib.get_close_matches(name[len(TIMM_PREFIX):], timm.list_models(), n=3)
            raise ValueError(f"no timm model {name[len(TIMM_PREFIX):]!r}" + (f"; did you mean {close}?" if close else
                                                                            " (timm.list_models() lists them)"))
        return name
    known = torchvision_classifiers()
    if name in known:
        return name
    close = difflib.get_close_matches(name, list(DIGITS_ARCHS) + list(_CIFAR_ARCHS) + known, n=3)
    raise ValueError(f"unknown architecture {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                     + f": give one of {', '.join(DIGITS_ARCHS)}, a CIFAR KD architecture "
                       f"({', '.join(list(_CIFAR_ARCHS)[:4])}, ...), a torchvision classification model "
                       f"(resnet18, convnext_tiny, ...) or timm:<name>")


def _timm(arch: str):
    try:
        import timm
    except ImportError as exc:
        raise MissingDependencyError(f"--arch {arch} needs timm (an optional extra): pip install timm") from exc
    return timm


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
    """A classifier split at its classifier: ``(head(f), f)`` with ``f`` the pooled pre-logit features,
    the input of the module ``head_path`` (``fc``, ``classifier``, timm's ``head.fc``, ...: the
    outermost module that maps ``(B, D)`` features to the logits, found by one forward when not
    given). The classifier moves to ``head`` and an identity takes its place in ``body``, so the
    state dict is ``body.<the network's keys>`` and ``head.<the classifier's>``; :func:`load_weights`
    also takes the network's own layout."""

    def __init__(self, net: nn.Module, head_path: Optional[str] = None, input_shape: tuple = (3, 64, 64)) -> None:
        super().__init__()
        if head_path is None:
            from ..methods.taps import find_classifier

            head_path = find_classifier(net, input_shape)
        parent_path, _, leaf = head_path.rpartition(".")
        parent = net.get_submodule(parent_path) if parent_path else net
        self.head = getattr(parent, leaf)
        setattr(parent, leaf, nn.Identity())
        self.body = net
        self.head_path = head_path
        linear = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
        self.feature_dim = linear[0].in_features if linear else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.body(x)
        return self.head(feats), feats


def build_model(arch: str, num_classes: int, weights_path: str | None = None,
                in_channels: Optional[int] = None) -> nn.Module:
    """A network by name (see the module docstring) for ``num_classes`` classes and inputs of
    ``in_channels`` channels (default: 1 for the digits CNNs, 3 for the others); ``weights_path``
    loads a state dict (:func:`load_weights`) with a clear error when it does not fit."""
    if in_channels is None:
        in_channels = 1 if arch in DIGITS_ARCHS else 3
    widths = {"cnn-tiny": (4, 8, 16), "cnn-small": (8, 16, 32), "cnn-large": (32, 64, 128)}
    if arch in widths:
        model: nn.Module = SmallCNN(widths[arch], num_classes, in_channels=in_channels)
    elif arch in _CIFAR_ARCHS:
        if in_channels != 3:
            raise InputError(f"--arch {arch} takes 3-channel (CIFAR) images, the data has {in_channels} channel(s)")
        model = _CIFAR_ARCHS[arch](num_classes)
    elif arch.startswith(TIMM_PREFIX):
        timm = _timm(arch)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a download: weights come from local files
        check_arch(arch)
        net = timm.create_model(arch[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes,
                                in_chans=in_channels)
        classifier = net.get_classifier()  # timm names its classifier: no forward needed to find it
        model = WithFeatures(net, next(n for n, m in net.named_modules() if m is classifier))
    else:
        try:
            import torchvision
        except ImportError as exc:
            raise MissingDependencyError(f"--arch {arch} needs torchvision: pip install torchvision") from exc
        try:
            check_arch(arch)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if in_channels != 3:
            raise InputError(f"--arch {arch} (torchvision) takes 3-channel images, the data has {in_channels} "
                             f"channel(s): use a cnn-* network, or timm:<name> (timm builds any channel count)")
        options = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)
        head = {"resnet": "fc", "mobilenet_v2": "classifier", "mobilenet_v3_large": "classifier"}
        known = head["resnet"] if arch.startswith("resnet") else head.get(arch)
        model = WithFeatures(net, known, input_shape=(3, 224, 224) if "vit" in arch or "swin" in arch
                             else (3, 64, 64))
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
    try:
        state = read_torch_file(path, weights_only=True)
    except InputError:
        if not is_training_state(path):
            raise
        run = os.path.dirname(path) or "."
        raise InputError(f"{path!r} is a training checkpoint of mlkd-train (optimizer, schedule and RNG state, "
                         f"for --resume), not a weights file: pass {os.path.join(run, 'student.pt')} (or the "
                         f"teacher's weights file, e.g. {os.path.join(run, 'teacher.pt')})") from None
    for key in ("model", "state_dict"):  # mlkd-train's and RepDistiller's {"model": ...}, timm's {"state_dict": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise InputError(f"{path!r} does not hold a state dict")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped network
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    if isinstance(model, WithFeatures) and set(state) != set(own):
        state = _into_wrapper(state, model.head_path)
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


# the keys of a training state (checkpoint.save_checkpoint's checkpoint.pt and <phase>_state.pt) besides "model"
_TRAINING_STATE_KEYS = frozenset(("phase", "epoch", "step", "optimizer", "scheduler", "rng"))


def is_training_state(path: str) -> bool:
    """Whether ``path`` is a training state written by mlkd-train (``checkpoint.pt``,
    ``student_state.pt``) rather than a weights file: its pickle holds every key of one among its
    strings. Read with :mod:`pickletools`, nothing is unpickled (a weights-only load refuses such
    files: their RNG state is not plain tensors)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
            if name is None:
                return False
            data = archive.read(name)
        strings = {arg for op, arg, _ in pickletools.genops(data) if "UNICODE" in op.name and isinstance(arg, str)}
    except Exception:  # not a zip, a torn pickle: not recognisable, the caller's error stands
        return False
    return _TRAINING_STATE_KEYS <= strings


def _into_wrapper(state: dict, head_path: str) -> dict:
    """A state dict in the network's own layout (torchvision's, timm's) -> :class:`WithFeatures`'s:
    the classifier's keys under ``head.``, the rest under ``body.`` (keys already in the wrapper's
    layout stay)."""
    if any(k.startswith("body.") for k in state):
        return state
    prefix = head_path + "."
    return {("head." + k[len(prefix):]) if k.startswith(prefix) else "body." + k: v for k, v in state.items()}

"""Reading what a network computes without changing it: its logits, pooled features and stage maps,
recorded with forward hooks.

A network may return ``(logits, pooled features)`` (the training loop's networks, and any user
wrapper), or logits alone (torchvision and timm classifiers): then the pooled features are the
input of its classifier, the module that produced the logits. Methods that distil representations
(FitNet, AT, FSP, NST, SP) also need stage outputs, the feature map at the end of each resolution
stage; :func:`stage_modules` finds them (or takes their module paths), :class:`FeatureTaps` records
them on every forward, and :class:`TappedNetwork` gives all three as one
:class:`~mlkd_fast.methods.base.Outputs`.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import ModelSpec, Outputs


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP / torch.compile wrappers, whose module names the taps use."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def split_outputs(out: Any) -> tuple[Tensor, Optional[Tensor]]:
    """A network's return value as ``(logits, features or None)``: a tensor is logits alone; a tuple or
    list is ``(logits, pooled features, ...)``."""
    if isinstance(out, Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        feats = out[1] if len(out) > 1 and isinstance(out[1], Tensor) else None
        return out[0], feats
    raise TypeError(f"a network must return its logits, or (logits, pooled features); got {type(out).__name__}")


# ---------------------------------------------------------------------------------------------
# finding the stages
# ---------------------------------------------------------------------------------------------
_NAMING_HINT = ("name the stage modules explicitly: Distillation(..., student_stages=[...], teacher_stages=[...]), "
                "model_spec(model, shape, stages=[...]) or FeatureTaps(model, [...]), with module paths as "
                "model.named_modules() lists them")


def _numbered_layers(net: nn.Module) -> list[str]:
    """ResNet-style stages: the first module (in module order) with children ``layer1``, ``layer2``, ...
    (torchvision and timm ResNets, the CIFAR ResNets), at any depth of the network."""
    for path, module in net.named_modules():
        children = dict(module.named_children())
        k = 1
        while f"layer{k}" in children:
            k += 1
        if k > 2:
            prefix = f"{path}." if path else ""
            return [f"{prefix}layer{i}" for i in range(1, k)]
    return []


def _declared_stages(net: nn.Module, input_shape: Optional[Sequence[int]]) -> tuple[list[str], str]:
    """Stages a network declares itself: timm's ``feature_info`` (a list of ``{"module": ...}``), on
    the first module that has one, kept where they are ``(B, C, H, W)`` maps (a vision transformer's
    blocks give ``(B, N, C)`` tokens: no maps). Returns the names and, when it declared some but none
    are maps, a note saying so."""
    for path, module in net.named_modules():
        info = getattr(module, "feature_info", None)
        if not isinstance(info, (list, tuple)) or not info or not all(isinstance(i, dict) and "module" in i
                                                                        for i in info):
            continue
        prefix = f"{path}." if path else ""
        names = [prefix + i["module"] for i in info]
        if input_shape is None:
            return names, ""
        shapes: dict[str, int] = {}
        modules = dict(net.named_modules())
        handles = [modules[n].register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, o.ndim if isinstance(o, Tensor) else 0))
            for n in names if n in modules]
        try:
            _probe(net, input_shape)
        finally:
            for h in handles:
                h.remove()
        maps = [n for n in names if shapes.get(n) == 4]
        note = "" if maps else (f"the stages {type(module).__name__} declares (feature_info: {names[:3]}...) give no "
                                f"(B, C, H, W) maps")
        return maps, note
    return [], ""


def _size(x: Any) -> Optional[tuple[int, int]]:
    return (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, Tensor) and x.ndim == 4 else None


def _traced_stages(net: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Any other convolutional network, from one traced forward of zeros.

    1. The chain of resolutions: from the input's size, every module that takes a tensor of the
       current size and returns a smaller one, in the order the modules finish (so the innermost
       strided conv or pooling counts), moves the chain on. 1 x 1 is not a resolution (global
       pooling, squeeze-excitation).
    2. A stage output per resolution: the input of the outermost module that takes the chain from
       that size to the next (the downsampling block, not the strided conv inside it); for the last
       resolution, the input of the module that pools it to 1 x 1, or the last tensor of that size.
    3. Its name: of the modules that returned that tensor object (a block, its last layer, an in-place
       activation), the outermost one run once per forward that holds no module returning another
       stage's output (the ReLU ending a plain CNN's conv block, not the whole body).
    """
    events: list[tuple[str, Any, Any]] = []  # (module, input, output), in the order the modules finish
    started: dict[str, int] = {}
    calls: dict[str, int] = {}

    def before(name: str):
        def hook(module, inputs):
            started.setdefault(name, len(started))
        return hook

    def after(name: str):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            events.append((name, inputs[0] if inputs else None, output))
        return hook

    handles = []
    for n, m in net.named_modules():
        if n:
            handles += [m.register_forward_pre_hook(before(n)), m.register_forward_hook(after(n))]
    try:
        _probe(net, input_shape)
    finally:
        for h in handles:
            h.remove()

    def smaller(a: Optional[tuple[int, int]], b: Optional[tuple[int, int]]) -> bool:
        return a is not None and b is not None and b != (1, 1) and b != a and b[0] <= a[0] and b[1] <= a[1]

    chain = [(int(input_shape[-2]), int(input_shape[-1]))]
    for _, x, out in events:
        if _size(x) == chain[-1] and smaller(chain[-1], _size(out)):
            chain.append(_size(out))
    stage_tensors = []
    for here, there in zip(chain[:-1], chain[1:]):
        movers = [(started[n], x) for n, x, out in events if _size(x) == here and _size(out) == there]
        stage_tensors.append(min(movers, key=lambda m: m[0])[1])
    if chain[-1] != chain[0]:
        # the last resolution ends where a module takes it to 1 x 1 (global pooling, a last strided
        # block) that no module keeping that resolution holds (a squeeze-excitation's pooling is held
        # by its block); failing that, the last tensor of that size
        outputs = {name: out for name, _, out in events}
        keeps = {n for n, out in outputs.items() if _size(out) == chain[-1]}
        ends = [(started[n], x) for n, x, out in events if _size(x) == chain[-1] and _size(out) == (1, 1)
                and not any(n.startswith(k + ".") for k in keeps)]
        last = [out for _, _, out in events if _size(out) == chain[-1]]
        if ends:
            stage_tensors.append(min(ends, key=lambda m: m[0])[1])
        elif last:
            stage_tensors.append(last[-1])

    finished = {name: i for i, (name, _, _) in enumerate(events)}
    outputs = {name: out for name, _, out in events}
    stages = []
    for x in stage_tensors:
        others = [y for y in stage_tensors if y is not x]
        holders = {n for n, out in outputs.items() if any(out is y for y in others)}
        same = [n for n, out in outputs.items() if out is x and calls[n] == 1
                and not any(h.startswith(n + ".") for h in holders)]
        if same:  # the shallowest; of equally deep ones, the last to finish
            stages.append(min(sorted(same, key=lambda n: -finished[n]), key=lambda n: n.count(".")))
    return stages


@torch.no_grad()
def _probe(net: nn.Module, input_shape: Sequence[int], call=None) -> Any:
    """``call`` (default: the network) on a batch of 2 zero inputs, with the network in eval mode
    (its mode is restored)."""
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return (call or net)(torch.zeros(2, *input_shape, device=device, dtype=dtype))
    finally:
        net.train(was_training)


def stage_modules(model: nn.Module, input_shape: Optional[Sequence[int]] = None) -> list[str]:
    """Module paths of the stage outputs of ``model``, shallow to deep, found without any naming
    convention on the network:

    - ResNet-style networks (a module with children ``layer1``, ``layer2``, ... at any depth): those;
    - networks that declare their stages (timm's ``feature_info``): those that are ``(B, C, H, W)``
      maps;
    - any other convolutional network, given ``input_shape`` (C, H, W): for every spatial size its
      ``(B, C, H, W)`` outputs take, the module that produced the last output of that size, from one
      traced forward (e.g. the ReLU ending each conv block of a plain CNN, the last block of each
      resolution of a MobileNet);
    - otherwise (no input shape, no ``(B, C, H, W)`` outputs, e.g. a transformer): a ValueError that
      says how to name the modules explicitly.
    """
    net = unwrap(model)
    names = _numbered_layers(net)
    note = ""
    if not names:
        names, note = _declared_stages(net, input_shape)
    if not names and not note and input_shape is not None:
        names = _traced_stages(net, input_shape)
    if not names:
        why = note or ("its forward produces no (B, C, H, W) maps larger than 1 x 1" if input_shape is not None
                       else "it has no ResNet-style layer1, layer2, ... and no input shape was given to trace it")
        raise ValueError(f"no stages found in {type(net).__name__}: {why}; {_NAMING_HINT}")
    return names


# ---------------------------------------------------------------------------------------------
# recording
# ---------------------------------------------------------------------------------------------
def _modules_by_name(net: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    modules = dict(net.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        known = ", ".join(n for n in modules if n) or "(none)"
        raise ValueError(f"no module named {', '.join(map(repr, missing))} in {type(net).__name__}; "
                         f"its modules are: {known}")
    return modules


class FeatureTaps:
    """Records the outputs of named submodules of ``model`` on each forward (``taps.outputs``).

    Used as a context manager or kept for the whole run (``close()`` removes the hooks). Outputs are
    kept as produced (with their autograd history), overwritten by the next forward. In-place
    activations after a tapped module would change a recorded tensor, so the hook records the
    module's output before any later in-place op only if the module itself is the last writer: the
    stage modules returned by :func:`stage_modules` are.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.names = list(names)
        self.outputs: dict[str, Tensor] = {}
        modules = _modules_by_name(unwrap(model), self.names)
        self._handles = [modules[n].register_forward_hook(self._recorder(n)) for n in self.names]

    def _recorder(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    def take(self) -> dict[str, Tensor]:
        """The recorded outputs of the last forward, in tap order; clears them."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"the last forward did not run the tapped modules {missing}")
        out = {n: self.outputs[n] for n in self.names}
        self.outputs = {}
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _InputTap:
    """Records the (flattened) input of one module: the pooled features entering a classifier."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Optional[Tensor] = None
        self._handle = module.register_forward_pre_hook(self._record)

    def _record(self, module, inputs) -> None:
        x = inputs[0]
        self.value = x.flatten(1) if x.ndim > 2 else x

    def take(self) -> Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the last forward did not run the classifier whose input holds the features")
        return value

    def close(self) -> None:
        self._handle.remove()


def find_classifier(net: nn.Module, input_shape: Sequence[int]) -> str:
    """The module path of ``net``'s classifier (the layer that maps its pooled features to the logits),
    found by one forward of zero inputs of ``input_shape`` (C, H, W) with every module recorded: the
    outermost module returning the logits from ``(B, D)`` features through a single linear layer, else
    the innermost that returned them. A ValueError when no submodule produced the logits."""
    recorded: list[tuple[str, Any, Any]] = []  # (module, input, output) in the order they finished

    def recorder(name: str):
        def hook(module, inputs, output):
            recorded.append((name, inputs[0] if inputs else None, output))
        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in net.named_modules() if n]
    try:
        logits, _ = split_outputs(_probe(net, input_shape))
    finally:
        for h in handles:
            h.remove()
    # the modules that returned the logits tensor itself, innermost first: the outermost one that takes
    # (B, D) features through a single linear layer (torchvision's classifier, before its dropout), or
    # else the innermost (the final linear layer of a head that also pools, as timm's ConvNeXt head)
    hits = [(n, x) for n, x, out in recorded if out is logits and x is not logits]  # not an identity after it
    modules = dict(net.named_modules())
    flat = [n for n, x in hits if isinstance(x, Tensor) and x.ndim == 2
            and sum(isinstance(m, nn.Linear) for m in modules[n].modules()) == 1]  # VGG's MLP: its last layer
    name = flat[-1] if flat else (hits[0][0] if hits else None)
    if name is None:
        raise ValueError(f"{type(net).__name__} returns logits only, and no submodule produced them (they are "
                         f"computed in its own forward), so its pooled features cannot be read: wrap it to "
                         f"return (logits, pooled features)")
    return name


_find_classifier = find_classifier  # the older, private name


@torch.no_grad()
def model_spec(model: nn.Module, input_shape: Sequence[int], stages: Optional[Sequence[str]] = None) -> ModelSpec:
    """The :class:`ModelSpec` of ``model`` for inputs of ``input_shape`` (C, H, W): classes,
    pooled-feature width, the (C, H, W) of every stage output and, for a network returning logits
    only, its classifier (whose input is the features), from forwards of a batch of 2 zero inputs in
    eval mode (the model's mode is restored).

    ``stages``: module paths to use as stages; by default :func:`stage_modules` finds them, and where
    it cannot, the spec lists none and ``stage_note`` says why (an error only for a method that
    needs stages)."""
    net = unwrap(model)
    input_shape = tuple(int(v) for v in input_shape)
    note = ""
    if stages is None:
        try:
            names = stage_modules(net, input_shape)
        except ValueError as exc:
            names, note = [], str(exc)
    else:
        names = list(stages)
    logits, feats = split_outputs(_probe(net, input_shape))
    feature_module = None if feats is not None else find_classifier(net, input_shape)
    tapped = TappedNetwork(net, names, feature_module)
    try:
        out = _probe(net, input_shape, tapped)
    finally:
        tapped.close()
    return ModelSpec(num_classes=out.logits.shape[-1], feature_dim=out.feats.shape[-1],
                     stages={n: tuple(m.shape[1:]) for n, m in out.stages.items()}, input_shape=input_shape,
                     feature_module=feature_module, stage_note=note)


class TappedNetwork:
    """Runs a network and returns its :class:`Outputs`: logits, pooled features (returned by the
    network, or the input of ``feature_module``, its classifier) and the maps of ``stages``. The
    network itself is untouched (forward hooks; ``close()`` removes them)."""

    def __init__(self, model: nn.Module, stages: Sequence[str] = (), feature_module: Optional[str] = None) -> None:
        self.model = model
        net = unwrap(model)
        self.stage_taps = FeatureTaps(net, stages) if stages else None
        self.feature_tap = None
        if feature_module is not None:
            self.feature_tap = _InputTap(_modules_by_name(net, [feature_module])[feature_module])

    def __call__(self, x: Tensor) -> Outputs:
        logits, feats = split_outputs(self.model(x))
        if self.feature_tap is not None:
            recorded = self.feature_tap.take()
            feats = recorded if feats is None else feats
        stages = self.stage_taps.take() if self.stage_taps is not None else {}
        return Outputs(logits, feats, stages)

    def close(self) -> None:
        if self.stage_taps is not None:
            self.stage_taps.close()
        if self.feature_tap is not None:
            self.feature_tap.close()

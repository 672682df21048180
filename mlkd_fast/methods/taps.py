"""Feature taps: the intermediate maps a distiller needs, read with forward hooks, models untouched.

A network of the training loop returns ``(logits, pooled features)``. Methods that distil
representations (FitNet, AT, FSP, NST, SP, ...) also need stage outputs: the feature map at the end
of each resolution stage. :func:`stage_modules` names those modules for the architectures the loop
builds (and any module path for other networks); :class:`FeatureTaps` records their outputs on
every forward.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .base import ModelSpec


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP / torch.compile wrappers, whose module names the taps use."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def stage_modules(model: nn.Module) -> list[str]:
    """Module paths of the stage outputs of ``model``, shallow to deep.

    - the digits CNNs (``SmallCNN``): the ReLU that ends each conv block;
    - torchvision ResNets: ``layer1`` .. ``layer4``;
    - torchvision MobileNets: the last block of ``features`` before each stride-2 block, and the last one;
    - any other network: the children of its body that change the spatial size are not guessed;
      pass module paths explicitly (``FeatureTaps(model, ["block1", ...])``).
    """
    net = _unwrap(model)
    body = getattr(net, "body", net)
    prefix = "body." if body is not net else ""
    names = [n for n, _ in body.named_children()]
    if {"layer1", "layer2", "layer3", "layer4"} <= set(names):
        return [f"{prefix}layer{i}" for i in range(1, 5)]
    features = getattr(body, "features", None)
    if isinstance(features, nn.Sequential):
        ends = []
        for i in range(1, len(features)):
            if _has_stride_two(features[i]):
                ends.append(i - 1)
        ends.append(len(features) - 1)
        return [f"{prefix}features.{i}" for i in sorted(set(ends)) if i > 0]
    if isinstance(body, nn.Sequential) and any(isinstance(m, nn.Conv2d) for m in body):
        relus = [i for i, m in enumerate(body) if isinstance(m, nn.ReLU)]
        return [f"{prefix}{i}" for i in relus]
    raise ValueError(f"no known stages for {type(net).__name__}: name the modules to tap explicitly")


def _has_stride_two(block: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in block.modules())


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
        net = _unwrap(model)
        modules = dict(net.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            known = ", ".join(n for n in modules if n) or "(none)"
            raise ValueError(f"no module named {', '.join(map(repr, missing))} in {type(net).__name__}; "
                             f"its modules are: {known}")
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


@torch.no_grad()
def model_spec(model: nn.Module, input_shape: tuple[int, ...], stages: Optional[list[str]] = None) -> ModelSpec:
    """The :class:`ModelSpec` of ``model`` for inputs of ``input_shape`` (C, H, W): classes,
    pooled-feature width and the (C, H, W) of every stage output, from one forward of a
    batch of 2 in eval mode (the model's mode is restored)."""
    net = _unwrap(model)
    names = stage_modules(net) if stages is None else list(stages)
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        with FeatureTaps(net, names) as taps:
            logits, feats = net(torch.zeros(2, *input_shape, device=device, dtype=dtype))
            maps = taps.take()
    finally:
        net.train(was_training)
    return ModelSpec(num_classes=logits.shape[-1], feature_dim=feats.shape[-1],
                     stages={n: tuple(m.shape[1:]) for n, m in maps.items()})

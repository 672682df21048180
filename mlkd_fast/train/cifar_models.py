"""The CIFAR knowledge-distillation architectures of RepDistiller and mdistiller, checkpoint-compatible.

RepDistiller (HobbitLong/RepDistiller, ``models/``) benchmarks its distillers on a fixed set of
small CIFAR networks, and mdistiller (megvii-research/mdistiller, ``mdistiller/models/cifar/``)
reuses them unchanged; both release CIFAR-100 teachers (``resnet32x4_vanilla/ckpt_epoch_240.pth``,
...) saved as ``{"model": state_dict, "epoch": ..., "accuracy": ..., "optimizer": ...}``. The
networks here are written anew from the parameter layout of that code (RepDistiller commit
b84f547c5db6a35318d4671d7d5c4de74c822403, mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259):
same module names, so the same state-dict keys (in the same order) and shapes, and the same
forward computation, so those checkpoints load with ``load_state_dict(strict=True)`` (directly, or
through :func:`mlkd_fast.train.models.load_weights`, which also unwraps ``{"model": ...}``) and
give the same logits. ``tests/data/repdistiller_state_dict_shapes.json`` holds the reference
layout, dumped from their classes, that ``tests/test_cifar_models.py`` checks every network against.

=============  ====================================  ==========  =========================================
name           their builder (file)                  parameters  stages (f1..fN) | pre-activation taps
=============  ====================================  ==========  =========================================
resnet8        resnet8 (models/resnet.py)                 83,892  layer1..3 | layer{i}.{last}.preact
resnet14       resnet14                                  181,108  layer1..3 | layer{i}.{last}.preact
resnet20       resnet20                                  278,324  layer1..3 | layer{i}.{last}.preact
resnet32       resnet32                                  472,756  layer1..3 | layer{i}.{last}.preact
resnet44       resnet44                                  667,188  layer1..3 | layer{i}.{last}.preact
resnet56       resnet56                                  861,620  layer1..3 | layer{i}.{last}.preact
resnet110      resnet110                               1,736,564  layer1..3 | layer{i}.{last}.preact
resnet8x4      resnet8x4                               1,233,540  layer1..3 | layer{i}.{last}.preact
resnet32x4     resnet32x4                              7,433,860  layer1..3 | layer{i}.{last}.preact
ResNet50       ResNet50 (models/resnetv2.py)          23,705,252  layer1..4 | layer{i}.{last}.preact
wrn_16_1       wrn_16_1 (models/wrn.py)                  180,916  block1..3 | block2.layer.0.bn1,
wrn_16_2       wrn_16_2                                  703,284  block1..3 |   block3.layer.0.bn1, bn1
wrn_40_1       wrn_40_1                                  569,780  block1..3 |   (the same for every wrn)
wrn_40_2       wrn_40_2                                2,255,156  block1..3 |
vgg8           vgg8_bn (models/vgg.py)                 3,965,028  relu1..4 | block1..4
vgg11          vgg11_bn                                9,277,284  relu1..4 | block1..4
vgg13          vgg13_bn                                9,462,180  relu1..4 | block1..4
vgg16          vgg16_bn                               14,774,436  relu1..4 | block1..4
vgg19          vgg19_bn                               20,086,692  relu1..4 | block1..4
MobileNetV2    mobile_half (models/mobilenetv2.py)       812,836  blocks.1, blocks.2, blocks.4, blocks.6 |
                                                                  the same (linear bottlenecks)
ShuffleV1      ShuffleV1 (models/ShuffleNetv1.py)        949,258  layer1..3 | layer{i}.{last}.preact
ShuffleV2      ShuffleV2 (models/ShuffleNetv2.py)      1,355,528  layer1..3 | layer{i}.{last}.preact
ResNet18       ResNet18 (mdistiller's resnetv2.py)    11,220,132  layer1..4 | layer{i}.{last}.preact
=============  ====================================  ==========  =========================================

Parameters are for 100 classes (CIFAR-100; the names are RepDistiller's ``model_dict`` keys, and
``ResNet18`` is in mdistiller's ``cifar_model_dict`` only). Every network returns
``(logits, pooled features)``, the features being the flattened input of the final linear layer
(RepDistiller's last ``is_feat`` feature). Batch-norm running statistics (``num_batches_tracked``
included) are buffers of the state dict, as in theirs.

Stages. Their ``forward(x, is_feat=True, preact=False)`` returns ``[f0, f1, ..., fN, pooled]``:
``f0`` the stem's output, ``f1..fN`` the stage outputs their distillers read (AT, NST, SP, FitNet's
``--hint_layer``, ...: RepDistiller takes ``feat[1:-1]``), ``pooled`` the classifier's input. Here
``f1..fN`` are outputs of named submodules, recorded by forward hooks
(:class:`mlkd_fast.methods.FeatureTaps`), and every network says which ones:

- ``model.stage_names``: the modules whose outputs are ``f1..fN``. They are also what
  :func:`mlkd_fast.methods.stage_modules` finds by itself: the ResNets and ShuffleNets have
  ``layer1, layer2, ...`` children, and every network declares its stages in a timm-style
  ``feature_info`` list (``{"module", "num_chs", "reduction"}``), which stage discovery reads before
  it would trace (tracing finds one map per resolution, and would miss VGG's ``f3``, whose 4 x 4
  shares its resolution with ``f4``, and take MobileNetV2's last 1 x 1 conv instead of ``blocks.6``);
- ``model.stem_name``: the module whose output is ``f0`` (RepDistiller's FSP and VID also read it):
  ``Distillation(..., student_stages=[model.stem_name, *model.stage_names])`` adds it;
- ``model.preact_names``: the modules whose outputs are their ``preact=True`` maps, the stage sums
  before the last ReLU (``f1_pre..fN_pre``; mdistiller's ``feats["preact_feats"][1:]``). In the
  ResNets and ShuffleNets that is an ``nn.Identity`` named ``preact`` on the last block of each stage,
  which the block runs on its sum before the ReLU; in VGG the block itself (its last layer is a
  batch norm, the ReLU comes after); in the WRNs the batch norms that start the next stage and the
  final one (their code recomputes those on ``f1..f3``; here the ordinary forward runs them once on
  the same input). MobileNetV2's stage outputs are linear bottlenecks, already without activation:
  RepDistiller's ``preact`` returns the same maps, mdistiller has no ``preact_feats`` for it.

  Which methods want them: RepDistiller passes ``preact=True`` only for AB (activation boundaries),
  mdistiller's ``preact_feats`` serve OFD and ReviewKD (its teacher, and the student when
  ``STU_PREACT``). None of those is in mlkd_fast's zoo; its stage methods (AT, FitNet, FSP, NST, SP)
  read post-activation maps, as RepDistiller does, so the default stages are ``stage_names`` and the
  pre-activation ones are taps a user names: ``Distillation(..., student_stages=model.preact_names)``.
  Every module after a tap point is out of place (no in-place ReLU overwrites a tapped map).
- :func:`reference_features` returns their whole ``is_feat`` list from one forward.

Checked against their code (outside this repository: their classes with random weights and
batch-norm statistics, the state dict loaded here strictly, the same random batch): logits, the
``is_feat`` maps (``preact`` False and True) and every parameter's gradient are equal bit for bit,
in eval and in train mode, for every name, against RepDistiller's and mdistiller's classes alike.

Where the forward differs from theirs, only beyond their 32 x 32 setting: the final pooling
averages the whole map (``avg_pool2d`` with the map's size as kernel: on 32 x 32 inputs their
fixed ``AvgPool2d`` of 8, 4 or 2, the same sums; ResNet18/50 and VGG use an adaptive pooling, as
theirs), so other input sizes also give one feature vector per sample (theirs fail at the
classifier, or, the WRN's ``view(-1, C)``, silently give 4 rows per sample on 64 x 64). VGG keeps
their rule of a fourth max pooling for 64-pixel-high inputs only.

mdistiller's copies have the same layout (keys, order, shapes: checked on every shared name) and
forward; they return ``(logits, {"feats": [f0..fN], "preact_feats": [f0, f1_pre..fN_pre],
"pooled_feat": pooled})`` on every call, and their WRN computes its pre-activation maps on every
training forward, running those three batch norms twice (their running statistics move twice per
step, ``num_batches_tracked`` counts double); these networks run them once.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CIFAR_ARCHS", "CifarNet", "reference_features"]


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """A k x k convolution with 'same' padding (k // 2)."""
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


def _shuffle_channels(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: channel ``g * (C / groups) + j`` moves to ``j * groups + g``."""
    if groups == 1:
        return x
    return x.unflatten(1, (groups, x.shape[1] // groups)).transpose(1, 2).flatten(1, 2)


def _global_pool(x: Tensor) -> Tensor:
    """The mean of each map, flattened: their fixed-size average pooling (8, 4 or 2, the map's size
    on 32 x 32 inputs) with the kernel the map's size, so the same sums (bit for bit), at any size."""
    return F.avg_pool2d(x, tuple(x.shape[-2:])).flatten(1)


class CifarNet(nn.Module):
    """The base of every network here: ``forward(x) -> (logits, pooled features)``, and the names of
    the modules whose outputs are the stem map (``stem_name``), the stage maps (``stage_names``) and
    the pre-activation stage maps (``preact_names``); see the module docstring."""

    stem_name: str
    stage_names: tuple[str, ...]
    preact_names: tuple[str, ...]
    feature_dim: int

    def _declare(self, stem: str, stages: Sequence[str], preact: Sequence[str], channels: Sequence[int],
                 reductions: Sequence[int], feature_dim: int) -> None:
        self.stem_name, self.stage_names, self.preact_names = stem, tuple(stages), tuple(preact)
        self.feature_dim = feature_dim
        # timm's convention, read by mlkd_fast.methods.stage_modules
        self.feature_info = [{"module": m, "num_chs": c, "reduction": r}
                             for m, c, r in zip(stages, channels, reductions)]


# ---------------------------------------------------------------------------------------------
# ResNet for CIFAR (RepDistiller's models/resnet.py): a 3x3 stem and three stages of basic blocks
# ---------------------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a strided 1x1 conv and
    batch norm (``downsample``) where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, c_out, 3, stride)
        self.bn1 = _bn(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(c_out, c_out, 3)
        self.bn2 = _bn(c_out)
        self.downsample = (nn.Sequential(_conv(c_in, c_out, 1, stride), _bn(c_out))
                           if stride != 1 or c_in != c_out else None)
        self.preact = nn.Identity()  # tap point: the sum before the last ReLU

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(self.preact(y + skip))


class CifarResNet(CifarNet):
    """``depth = 6 n + 2``: stem conv (``widths[0]`` channels), three stages of ``n`` basic blocks of
    ``widths[1..3]`` channels at 32, 16 and 8 pixels, global average pooling, ``fc``."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of basic blocks has depth 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv(3, widths[0], 3)
        self.bn1 = _bn(widths[0])
        self.relu = nn.ReLU()
        c = widths[0]
        for i, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [_BasicBlock(c if j == 0 else width, width, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            c = width
        self.fc = nn.Linear(c, num_classes)
        stages = ("layer1", "layer2", "layer3")
        self._declare("relu", stages, [f"{s}.{n - 1}.preact" for s in stages], widths[1:], (1, 2, 4), c)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        feats = _global_pool(x)
        return self.fc(feats), feats


# ---------------------------------------------------------------------------------------------
# ResNet18 / ResNet50 at CIFAR resolution (RepDistiller's models/resnetv2.py)
# ---------------------------------------------------------------------------------------------
class _V2Basic(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, planes, 3, stride)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = _bn(planes)
        self.shortcut = (nn.Sequential(_conv(c_in, planes, 1, stride), _bn(planes))
                         if stride != 1 or c_in != planes else None)
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.preact(y + skip))


class _V2Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to ``4 * planes``, plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * planes
        self.conv1 = _conv(c_in, planes, 1)
        self.bn1 = _bn(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = _bn(planes)
        self.conv3 = _conv(planes, c_out, 1)
        self.bn3 = _bn(c_out)
        self.shortcut = (nn.Sequential(_conv(c_in, c_out, 1, stride), _bn(c_out))
                         if stride != 1 or c_in != c_out else None)
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.preact(y + skip))


class CifarResNetV2(CifarNet):
    """The ImageNet ResNet's four stages (64..512 planes) behind a 3x3 stride-1 stem, no max pooling:
    32, 32, 16, 8, 4 pixels; global average pooling, ``linear``."""

    def __init__(self, block: type, counts: Sequence[int], num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = _conv(3, 64, 3)
        self.bn1 = _bn(64)
        self.relu = nn.ReLU()
        c = 64
        for i, (count, planes, stride) in enumerate(zip(counts, (64, 128, 256, 512), (1, 2, 2, 2)), start=1):
            blocks = []
            for j in range(count):
                blocks.append(block(c, planes, stride if j == 0 else 1))
                c = planes * block.expansion
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(c, num_classes)
        stages = ("layer1", "layer2", "layer3", "layer4")
        self._declare("relu", stages, [f"{s}.{k - 1}.preact" for s, k in zip(stages, counts)],
                      [p * block.expansion for p in (64, 128, 256, 512)], (1, 2, 4, 8), c)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feats = F.adaptive_avg_pool2d(x, 1).flatten(1)  # theirs: AdaptiveAvgPool2d
        return self.linear(feats), feats


# ---------------------------------------------------------------------------------------------
# Wide ResNet (RepDistiller's models/wrn.py): pre-activation blocks
# ---------------------------------------------------------------------------------------------
class _WideBlock(nn.Module):
    """Pre-activation: ``a = relu1(bn1(x))``, ``y = conv2(relu2(bn2(conv1(a))))``, plus ``x`` (same
    shape) or ``convShortcut(a)`` (a strided 1x1 conv of the activated input) where it changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = _bn(c_in)
        self.relu1 = nn.ReLU()  # not in place: bn1's output is a tap point (the previous stage's preact)
        self.conv1 = _conv(c_in, c_out, 3, stride)
        self.bn2 = _bn(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv(c_out, c_out, 3)
        self.convShortcut = _conv(c_in, c_out, 1, stride) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return (x if self.convShortcut is None else self.convShortcut(a)) + y


class _WideStage(nn.Module):
    def __init__(self, count: int, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1)
                                     for j in range(count)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(CifarNet):
    """WRN-``depth``-``widen``, ``depth = 6 n + 4``: stem conv (16), three stages of ``n`` blocks of
    ``16 k, 32 k, 64 k`` channels, a final batch norm and ReLU, global average pooling, ``fc``."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WRN has depth 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = _conv(3, widths[0], 3)
        self.block1 = _WideStage(n, widths[0], widths[1], 1)
        self.block2 = _WideStage(n, widths[1], widths[2], 2)
        self.block3 = _WideStage(n, widths[2], widths[3], 2)
        self.bn1 = _bn(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        self._declare("conv1", ("block1", "block2", "block3"), ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"),
                      widths[1:], (1, 2, 4), widths[3])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        feats = _global_pool(self.relu(self.bn1(x)))
        return self.fc(feats), feats


# ---------------------------------------------------------------------------------------------
# VGG with batch norm, CIFAR variant (RepDistiller's models/vgg.py): five conv blocks, one linear layer
# ---------------------------------------------------------------------------------------------
_VGG_CFG = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _vgg_block(c_in: int, widths: Sequence[int]) -> nn.Sequential:
    """conv3x3 (with bias) - BN - ReLU per width, the last ReLU left out (the network applies it, so
    the block's output is the pre-activation map)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [_conv(c_in, w, 3, bias=True), _bn(w), nn.ReLU(inplace=True)]
        c_in = w
    return nn.Sequential(*layers[:-1])


class CifarVGG(CifarNet):
    """``block0..block4`` with 2x2 max pooling after blocks 0-2 (and after block 3 for 64-pixel-high
    inputs only, their rule), ReLUs ``relu0..relu4`` after each block, global average pooling and
    ``classifier``: 32, 16, 8, 4, 4 pixels."""

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100) -> None:
        super().__init__()
        c = 3
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _vgg_block(c, widths))
            c = widths[-1]
        for i in range(4):
            self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        for i in range(5):
            self.add_module(f"relu{i}", nn.ReLU())  # tap points, out of place: the blocks' outputs stay preact
        self.classifier = nn.Linear(c, num_classes)
        self._declare("relu0", [f"relu{i}" for i in range(1, 5)], [f"block{i}" for i in range(1, 5)],
                      [w[-1] for w in cfg[1:]], (2, 4, 8, 8), c)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pool_last = x.shape[-2] == 64
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if pool_last:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        feats = self.pool4(x).flatten(1)
        return self.classifier(feats), feats


# ---------------------------------------------------------------------------------------------
# MobileNetV2, RepDistiller's mobile_half (models/mobilenetv2.py): expansion 6, width 0.5
# ---------------------------------------------------------------------------------------------
class _InvertedResidual(nn.Module):
    """1x1 expand - BN - ReLU, 3x3 depthwise (strided) - BN - ReLU, 1x1 project - BN (``conv``), plus
    the input where the shape is kept. The expansion conv is there even for a ratio of 1."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res_connect = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            _conv(c_in, hidden, 1), _bn(hidden), nn.ReLU(inplace=True),
            _conv(hidden, hidden, 3, stride, groups=hidden), _bn(hidden), nn.ReLU(inplace=True),
            _conv(hidden, c_out, 1), _bn(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CifarMobileNetV2(CifarNet):
    """Stem 3x3 stride 2 (``conv1``), seven groups of inverted residuals (``blocks``), 1x1 conv to
    1280 channels (``conv2``), global average pooling, ``classifier.0``: 16, 16, 16, 8, 4, 4, 2, 2
    pixels on 32 x 32 inputs."""

    # (expansion, channels before the width multiplier, blocks, first stride); expansion None: ``expand``
    SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
               (None, 160, 3, 2), (None, 320, 1, 1))

    def __init__(self, num_classes: int = 100, expand: int = 6, width: float = 0.5) -> None:
        super().__init__()
        c = int(32 * width)
        self.conv1 = nn.Sequential(_conv(3, c, 3, 2), _bn(c), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList()
        for t, channels, count, stride in self.SETTING:
            c_out = int(channels * width)
            group = []
            for j in range(count):
                group.append(_InvertedResidual(c, c_out, stride if j == 0 else 1, expand if t is None else t))
                c = c_out
            self.blocks.append(nn.Sequential(*group))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(_conv(c, last, 1), _bn(last), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        stages = ("blocks.1", "blocks.2", "blocks.4", "blocks.6")
        self._declare("conv1", stages, stages, [int(self.SETTING[i][1] * width) for i in (1, 2, 4, 6)],
                      (2, 4, 8, 16), last)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        feats = _global_pool(self.conv2(x))
        return self.classifier(feats), feats


# ---------------------------------------------------------------------------------------------
# ShuffleNet V1, groups 3 (RepDistiller's models/ShuffleNetv1.py)
# ---------------------------------------------------------------------------------------------
class _ShuffleV1Unit(nn.Module):
    """Grouped 1x1 (one group when the input is the 24-channel stem) - BN - ReLU, channel shuffle,
    3x3 depthwise (strided) - BN - ReLU, grouped 1x1 - BN; plus the input, or, at stride 2, the
    input's 3x3 average pooling concatenated after it; then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = c_out // 4
        self.stride = stride
        self.first_groups = 1 if c_in == 24 else groups
        self.conv1 = _conv(c_in, mid, 1, groups=self.first_groups)
        self.bn1 = _bn(mid)
        self.conv2 = _conv(mid, mid, 3, stride, groups=mid)
        self.bn2 = _bn(mid)
        self.conv3 = _conv(mid, c_out, 1, groups=groups)
        self.bn3 = _bn(c_out)
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = _shuffle_channels(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        if self.stride == 2:
            y = torch.cat([y, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            y = y + x
        return F.relu(self.preact(y))


class ShuffleNetV1(CifarNet):
    """1x1 stem to 24 channels (no downsampling), three stages of units (the first of each strided,
    its output widened by the pooled input), global average pooling, ``linear``: 32, 16, 8, 4 pixels."""

    def __init__(self, widths: Sequence[int] = (240, 480, 960), counts: Sequence[int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = _conv(3, 24, 1)
        self.bn1 = _bn(24)
        self.relu = nn.ReLU()
        c = 24
        for i, (width, count) in enumerate(zip(widths, counts), start=1):
            units = []
            for j in range(count):
                units.append(_ShuffleV1Unit(c, width - c if j == 0 else width, 2 if j == 0 else 1, groups))
                c = width
            self.add_module(f"layer{i}", nn.Sequential(*units))
        self.linear = nn.Linear(c, num_classes)
        stages = ("layer1", "layer2", "layer3")
        self._declare("relu", stages, [f"{s}.{k - 1}.preact" for s, k in zip(stages, counts)], widths,
                      (2, 4, 8), c)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        feats = _global_pool(x)
        return self.linear(feats), feats


# ---------------------------------------------------------------------------------------------
# ShuffleNet V2, size 1x (RepDistiller's models/ShuffleNetv2.py)
# ---------------------------------------------------------------------------------------------
class _ShuffleV2Down(nn.Module):
    """Two strided branches, concatenated and shuffled: 3x3 depthwise - BN, 1x1 - BN - ReLU on the
    left; 1x1 - BN - ReLU, 3x3 depthwise - BN, 1x1 - BN - ReLU on the right; half the channels each."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.conv1 = _conv(c_in, c_in, 3, 2, groups=c_in)
        self.bn1 = _bn(c_in)
        self.conv2 = _conv(c_in, mid, 1)
        self.bn2 = _bn(mid)
        self.conv3 = _conv(c_in, mid, 1)
        self.bn3 = _bn(mid)
        self.conv4 = _conv(mid, mid, 3, 2, groups=mid)
        self.bn4 = _bn(mid)
        self.conv5 = _conv(mid, mid, 1)
        self.bn5 = _bn(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return _shuffle_channels(torch.cat([left, right], 1), 2)


class _ShuffleV2Unit(nn.Module):
    """The first half of the channels passes; the second goes through 1x1 - BN - ReLU, 3x3 depthwise -
    BN, 1x1 - BN - ReLU; both are concatenated and shuffled. The pre-activation map (``preact``) is
    the concatenation before the last ReLU and unshuffled, as theirs."""

    def __init__(self, channels: int, is_last: bool = False) -> None:
        super().__init__()
        half = int(channels * 0.5)
        self.conv1 = _conv(half, half, 1)
        self.bn1 = _bn(half)
        self.conv2 = _conv(half, half, 3, groups=half)
        self.bn2 = _bn(half)
        self.conv3 = _conv(half, half, 1)
        self.bn3 = _bn(half)
        # tap point on the last unit of a stage only (their ``is_last``): it costs a concatenation
        self.preact = nn.Identity() if is_last else None

    def forward(self, x: Tensor) -> Tensor:
        c = int(x.shape[1] * 0.5)
        keep, x2 = x[:, :c], x[:, c:]
        y = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))))
        if self.preact is not None:
            self.preact(torch.cat([keep, y], 1))
        return _shuffle_channels(torch.cat([keep, F.relu(y)], 1), 2)


class ShuffleNetV2(CifarNet):
    """1x1 stem to 24 channels (no downsampling), three stages (a down unit, then ``counts`` units),
    1x1 conv to ``widths[3]`` channels - BN - ReLU, global average pooling, ``linear``."""

    def __init__(self, widths: Sequence[int] = (116, 232, 464, 1024), counts: Sequence[int] = (3, 7, 3),
                 num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = _conv(3, 24, 1)
        self.bn1 = _bn(24)
        self.relu = nn.ReLU()
        c = 24
        for i, (width, count) in enumerate(zip(widths[:3], counts), start=1):
            self.add_module(f"layer{i}", nn.Sequential(_ShuffleV2Down(c, width),
                                                       *[_ShuffleV2Unit(width, j == count - 1) for j in range(count)]))
            c = width
        self.conv2 = _conv(c, widths[3], 1)
        self.bn2 = _bn(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)
        stages = ("layer1", "layer2", "layer3")
        self._declare("relu", stages, [f"{s}.{k}.preact" for s, k in zip(stages, counts)], widths[:3],
                      (2, 4, 8), widths[3])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        feats = _global_pool(F.relu(self.bn2(self.conv2(x))))
        return self.linear(feats), feats


# ---------------------------------------------------------------------------------------------
# the names
# ---------------------------------------------------------------------------------------------
def _resnet(depth: int, widths: Sequence[int]) -> Callable[[int], nn.Module]:
    return lambda num_classes=100: CifarResNet(depth, widths, num_classes)


def _wrn(depth: int, widen: int) -> Callable[[int], nn.Module]:
    return lambda num_classes=100: WideResNet(depth, widen, num_classes)


def _vgg(name: str) -> Callable[[int], nn.Module]:
    return lambda num_classes=100: CifarVGG(_VGG_CFG[name], num_classes)


_NARROW, _WIDE = (16, 16, 32, 64), (32, 64, 128, 256)

#: name (RepDistiller's ``model_dict`` keys; ``ResNet18`` is mdistiller's) -> builder(num_classes)
CIFAR_ARCHS: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{d}": _resnet(d, _NARROW) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet(8, _WIDE),
    "resnet32x4": _resnet(32, _WIDE),
    "ResNet50": lambda num_classes=100: CifarResNetV2(_V2Bottleneck, (3, 4, 6, 3), num_classes),
    "wrn_16_1": _wrn(16, 1),
    "wrn_16_2": _wrn(16, 2),
    "wrn_40_1": _wrn(40, 1),
    "wrn_40_2": _wrn(40, 2),
    **{name: _vgg(name) for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": lambda num_classes=100: CifarMobileNetV2(num_classes),
    "ShuffleV1": lambda num_classes=100: ShuffleNetV1(num_classes=num_classes),
    "ShuffleV2": lambda num_classes=100: ShuffleNetV2(num_classes=num_classes),
    "ResNet18": lambda num_classes=100: CifarResNetV2(_V2Basic, (2, 2, 2, 2), num_classes),
}


def reference_features(model: CifarNet, x: Tensor, preact: bool = False) -> tuple[list[Tensor], Tensor]:
    """RepDistiller's ``model(x, is_feat=True, preact=preact)`` for one of these networks:
    ``([f0, f1, ..., fN, pooled], logits)``, from one forward with the stem, stage (or pre-activation)
    and classifier-input maps tapped."""
    from ..methods.taps import FeatureTaps

    names = [model.stem_name, *(model.preact_names if preact else model.stage_names)]
    with FeatureTaps(model, dict.fromkeys(names)) as taps:
        logits, feats = model(x)
        maps = taps.take()
    return [maps[n] for n in names] + [feats], logits

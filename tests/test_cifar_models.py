"""The CIFAR KD architectures of RepDistiller / mdistiller (mlkd_fast/train/cifar_models.py): every one
builds, trains a step, returns (logits, pooled features), has their state-dict layout (key for key,
shape for shape: tests/data/repdistiller_state_dict_shapes.json, dumped from their classes), shows
their stage maps to the zoo's stage discovery and taps, loads their checkpoint layouts strictly
through load_weights, and distils (kd, at, crd) resnet32x4 -> resnet8x4 and wrn_40_2 -> wrn_16_2."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from mlkd_fast import methods as M
from mlkd_fast.train.cifar_models import CIFAR_ARCHS, CifarNet, reference_features
from mlkd_fast.train.errors import InputError
from mlkd_fast.train.models import ARCHS, build_model, check_arch, classifier_name, load_weights

SHAPE = (3, 32, 32)
with open(os.path.join(os.path.dirname(__file__), "data", "repdistiller_state_dict_shapes.json")) as _f:
    REFERENCE = json.load(_f)

# RepDistiller's forward(x, is_feat=True) on 32 x 32 inputs: f0 (stem), f1..fN (stages), the pooled width
_R, _RX4 = ((16, 32, 32), [(16, 32, 32), (32, 16, 16), (64, 8, 8)], 64), \
    ((32, 32, 32), [(64, 32, 32), (128, 16, 16), (256, 8, 8)], 256)
_VGG = ((64, 32, 32), [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512)
THEIR_FEATURES = {
    **{f"resnet{d}": _R for d in (8, 14, 20, 32, 44, 56, 110)}, "resnet8x4": _RX4, "resnet32x4": _RX4,
    "ResNet50": ((64, 32, 32), [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)], 2048),
    "wrn_16_1": _R, "wrn_40_1": _R,
    "wrn_16_2": ((16, 32, 32), [(32, 32, 32), (64, 16, 16), (128, 8, 8)], 128),
    "wrn_40_2": ((16, 32, 32), [(32, 32, 32), (64, 16, 16), (128, 8, 8)], 128),
    **{f"vgg{d}": _VGG for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": ((16, 16, 16), [(12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], 1280),
    "ShuffleV1": ((24, 32, 32), [(240, 16, 16), (480, 8, 8), (960, 4, 4)], 960),
    "ShuffleV2": ((24, 32, 32), [(116, 16, 16), (232, 8, 8), (464, 4, 4)], 1024),
    "ResNet18": ((64, 32, 32), [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)], 512),
}
_LAYERS3, _LAYERS4, _BLOCKS = ["layer1", "layer2", "layer3"], ["layer1", "layer2", "layer3", "layer4"], \
    ["block1", "block2", "block3"]
STAGE_NAMES = {
    **{n: _LAYERS3 for n in CIFAR_ARCHS if n.startswith(("resnet", "Shuffle"))},
    "ResNet50": _LAYERS4, "ResNet18": _LAYERS4,
    **{n: _BLOCKS for n in CIFAR_ARCHS if n.startswith("wrn")},
    **{n: ["relu1", "relu2", "relu3", "relu4"] for n in CIFAR_ARCHS if n.startswith("vgg")},
    "MobileNetV2": ["blocks.1", "blocks.2", "blocks.4", "blocks.6"],
}
# RepDistiller's model_dict, in its order
REPDISTILLER_NAMES = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
                      "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11",
                      "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2"]
# where the stage map is the ReLU of the pre-activation map (WRN's preact is the next stage's batch norm,
# MobileNetV2's stages are linear, ShuffleV2's preact is unshuffled)
RELU_OF_PREACT = [n for n in CIFAR_ARCHS if n.startswith(("resnet", "ResNet", "vgg")) or n == "ShuffleV1"]


def test_the_names_are_repdistillers_and_in_archs():
    assert list(CIFAR_ARCHS) == REPDISTILLER_NAMES + ["ResNet18"]
    assert set(REFERENCE["models"]) == set(CIFAR_ARCHS)
    assert all(name in ARCHS and check_arch(name) == name for name in CIFAR_ARCHS)


@pytest.mark.parametrize("name", list(CIFAR_ARCHS))
def test_trains_a_step_matches_their_layout_and_shows_their_stages(name):
    torch.manual_seed(0)
    model = build_model(name, 100)
    assert isinstance(model, CifarNet)
    # their layout, key for key (in order) and shape for shape
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == list(REFERENCE["models"][name].items())

    x, y = torch.randn(2, *SHAPE), torch.tensor([3, 97])
    logits, feats = model(x)
    stem, stages, width = THEIR_FEATURES[name]
    assert logits.shape == (2, 100) and feats.shape == (2, width) == (2, model.feature_dim)
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # the features are the classifier's input
    classifier = model.get_submodule(classifier_name(model))
    torch.testing.assert_close(classifier(feats), logits)

    # the zoo finds the stages by itself, with their shapes
    assert M.stage_modules(model, SHAPE) == STAGE_NAMES[name] == list(model.stage_names)
    spec = M.model_spec(model, SHAPE)
    assert spec.stages == dict(zip(STAGE_NAMES[name], stages))
    assert (spec.num_classes, spec.feature_dim, spec.feature_module) == (100, width, None)

    # their is_feat list, and the pre-activation taps
    model.eval()
    with torch.no_grad():
        post, logits = reference_features(model, x)
        pre, _ = reference_features(model, x, preact=True)
    assert [tuple(f.shape[1:]) for f in post] == [stem, *stages, (width,)]
    assert [tuple(f.shape[1:]) for f in pre] == [stem, *stages, (width,)]
    torch.testing.assert_close(model(x)[0], logits)
    if name in RELU_OF_PREACT:
        for a, b in zip(pre[1:-1], post[1:-1]):
            assert torch.equal(F.relu(a), b) and (a < 0).any()
    spec = M.model_spec(model, SHAPE, stages=[model.stem_name, *model.preact_names])
    assert list(spec.stages.values()) == [stem, *stages]


@pytest.mark.parametrize("name", list(CIFAR_ARCHS))
def test_their_checkpoint_layouts_load_strictly(name, tmp_path):
    torch.manual_seed(1)
    trained = CIFAR_ARCHS[name](100)
    with torch.no_grad():  # weights and statistics unlike a fresh network's
        for v in trained.state_dict().values():
            v.copy_(torch.randint_like(v, 1, 50) if not v.is_floating_point() else torch.rand_like(v))
    sd = trained.state_dict()
    # RepDistiller's / mdistiller's ckpt_epoch_240.pth, and a bare state dict
    torch.save({"epoch": 240, "model": sd, "accuracy": torch.tensor(73.5), "optimizer": {"state": {}}},
               tmp_path / "ckpt_epoch_240.pth")
    torch.save(sd, tmp_path / "bare.pth")
    for path in (tmp_path / "ckpt_epoch_240.pth", tmp_path / "bare.pth"):
        model = CIFAR_ARCHS[name](100)
        load_weights(model, str(path), name)
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_weights_of_another_network_or_class_count_are_refused(tmp_path):
    torch.save({"model": CIFAR_ARCHS["resnet8"](100).state_dict()}, tmp_path / "r8.pth")
    with pytest.raises(InputError, match=r"do not fit --arch resnet14"):
        build_model("resnet14", 100, weights_path=str(tmp_path / "r8.pth"))
    with pytest.raises(InputError, match=r"classify 100 classes but the data has 10"):
        build_model("resnet8", 10, weights_path=str(tmp_path / "r8.pth"))
    model = build_model("resnet8", 10)
    load_weights(model, str(tmp_path / "r8.pth"), "resnet8", new_head=True)  # all but the classifier
    assert torch.equal(model.conv1.weight, torch.load(tmp_path / "r8.pth")["model"]["conv1.weight"])
    with pytest.raises(InputError, match=r"3-channel"):
        build_model("wrn_16_2", 10, in_channels=1)
    torch.save(CIFAR_ARCHS["wrn_16_1"](10).state_dict(), tmp_path / "wrn.pth")  # build_model(weights_path=...)
    model = build_model("wrn_16_1", 10, weights_path=str(tmp_path / "wrn.pth"))
    assert torch.equal(model.fc.weight, torch.load(tmp_path / "wrn.pth")["fc.weight"])


@torch.no_grad()
def test_other_input_sizes_give_one_feature_vector():
    # (their fixed-size poolings fail here, or mix the samples: the WRN)
    for name in ("resnet8", "wrn_16_1", "MobileNetV2", "ShuffleV1"):
        logits, feats = CIFAR_ARCHS[name](10).eval()(torch.randn(2, 3, 48, 64))
        assert logits.shape == (2, 10) and feats.shape == (2, CIFAR_ARCHS[name](10).feature_dim), name


@pytest.mark.parametrize("teacher_name,student_name", [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2")])
def test_one_distillation_step(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = CIFAR_ARCHS[teacher_name](100), CIFAR_ARCHS[student_name](100)
    x, y = torch.randn(2, *SHAPE), torch.tensor([0, 99])
    for method, options in (("kd", {}), ("at", {}), ("crd", {"num_data": 16})):
        distill = M.Distillation(student, teacher, method, input_shape=SHAPE, **options)
        if method == "at":  # RepDistiller's feat[1:-1]: the three stages
            assert distill.distiller.needs.student_stages == tuple(STAGE_NAMES[student_name])
            assert distill.distiller.needs.teacher_stages == tuple(STAGE_NAMES[teacher_name])
        optimizer = torch.optim.SGD(distill.parameters(), lr=0.01)
        before = student.conv1.weight.detach().clone()
        loss = distill(x, y, index=torch.tensor([3, 11])) if method == "crd" else distill(x, y)
        assert torch.isfinite(loss), method
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert not torch.equal(before, student.conv1.weight), method
        assert all(p.grad is None for p in teacher.parameters()), method
        distill.close()

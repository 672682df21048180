"""Where users' networks already are: any torchvision classification model and timm:<name> through
mlkd-train and the zoo, split at their classifier, their weights from local files, never a download."""
import builtins
import socket
import subprocess
import sys

import pytest
import torch

import mlkd_fast.methods as M
from mlkd_fast.train.errors import InputError, MissingDependencyError
from mlkd_fast.train.models import build_model, check_arch

timm = pytest.importorskip("timm", reason="timm is in the test extra (pip install -e '.[test]')")


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails loudly (instead of hanging or downloading)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("arch, head, dim", [
    ("mobilenet_v3_small", "classifier.3", 1024), ("shufflenet_v2_x0_5", "fc", 1024), ("convnext_tiny", "classifier.2", 768),
    ("vgg11_bn", "classifier.6", 4096), ("timm:mobilenetv3_small_050", "classifier", 1024),
    ("timm:convnext_atto", "head.fc", 320), ("timm:resnet10t", "fc", 512)])
def test_any_torchvision_or_timm_model_returns_logits_and_pre_logit_features(arch, head, dim, offline):
    model = build_model(arch, 5)
    assert model.head_path == head and model.feature_dim == dim
    logits, feats = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5) and feats.shape == (2, dim)
    spec = M.model_spec(model, (3, 32, 32))
    assert spec.num_classes == 5 and spec.feature_dim == dim and spec.stage_names


def test_timm_declared_stages_are_used_and_transformers_have_no_maps(offline):
    spec = M.model_spec(build_model("timm:convnext_atto", 5), (3, 64, 64))
    assert spec.stage_names == ["body.stages.0", "body.stages.1", "body.stages.2", "body.stages.3"]
    vit = M.model_spec(build_model("timm:vit_tiny_patch16_224", 5), (3, 224, 224))
    assert vit.stage_names == [] and "give no (B, C, H, W) maps" in vit.stage_note
    with pytest.raises(ValueError, match=r"method 'at' needs stage outputs, but the student's spec lists none"):
        M.build("at", vit, spec)


def test_unknown_architectures_are_named_with_close_matches():
    with pytest.raises(ValueError, match=r"unknown architecture 'resnt18' \(did you mean resnet18"):
        check_arch("resnt18")
    with pytest.raises(ValueError, match=r"no timm model 'convnext_at'; did you mean"):
        check_arch("timm:convnext_at")
    assert check_arch("regnet_y_400mf") == "regnet_y_400mf" and check_arch("timm:resnet18") == "timm:resnet18"


def test_timm_is_optional_and_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(MissingDependencyError, match=r"--arch timm:resnet18 needs timm .*: pip install timm"):
        build_model("timm:resnet18", 5)


def test_channels_the_network_cannot_take_are_a_clear_error():
    with pytest.raises(InputError, match=r"takes 3-channel images, the data has 1 channel"):
        build_model("mobilenet_v3_small", 5, in_channels=1)
    one = build_model("timm:resnet10t", 5, in_channels=1)  # timm builds any channel count
    assert one(torch.randn(2, 1, 28, 28))[0].shape == (2, 5)


def test_weights_from_local_files_in_the_libraries_own_layouts(tmp_path, offline):
    import torchvision

    plain = torchvision.models.shufflenet_v2_x0_5(num_classes=5)
    torch.save(plain.state_dict(), tmp_path / "tv.pth")
    model = build_model("shufflenet_v2_x0_5", 5, str(tmp_path / "tv.pth")).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x)[0], plain.eval()(x))
    net = timm.create_model("convnext_atto", pretrained=False, num_classes=5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, tmp_path / "t.pth")
    model = build_model("timm:convnext_atto", 5, str(tmp_path / "t.pth")).eval()
    torch.testing.assert_close(model(x)[0], net.eval()(x))
    with pytest.raises(InputError, match=r"do not fit --arch timm:resnet10t"):
        build_model("timm:resnet10t", 5, str(tmp_path / "t.pth"))


@pytest.mark.parametrize("method", ["kd", "at"])
def test_timm_and_torchvision_models_train_through_mlkd_train(tmp_path, method):
    out = tmp_path / method
    cmd = [sys.executable, "-m", "mlkd_fast.train", "--data", "synthetic", "--arch", "timm:mobilenetv3_small_050",
           "--teacher-arch", "shufflenet_v2_x0_5", "--image-size", "32", "--num-classes", "5", "--batch-size", "4",
           "--steps-per-epoch", "2", "--epochs", "1", "--method", method, "--quiet", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (out / "student.pt").is_file()


def test_a_repdistiller_checkpoint_with_its_run_options_loads(tmp_path):
    """Their checkpoints pickle the run's argparse.Namespace beside the weights ({"model", "opt", ...})."""
    import argparse

    net = build_model("resnet8x4", 100)
    torch.save({"model": net.state_dict(), "opt": argparse.Namespace(lr=0.05, model="resnet8x4"), "epoch": 240},
               tmp_path / "resnet8x4_last.pth")
    loaded = build_model("resnet8x4", 100, str(tmp_path / "resnet8x4_last.pth"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))

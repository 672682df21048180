"""The zoo as a user meets it: methods.Distillation (both networks tapped, every need checked when it
is built, the epoch carried for warm-ups) on torchvision ResNets and on a user's own wrapper, the
methods' traits that the loop reads, and automatic stage discovery without naming conventions."""
import ast
import pathlib

import pytest
import torch
import torchvision
from torch import nn

import mlkd_fast.methods as M

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (3, 32, 32)


def _resnet(classes: int = 10, width: int = 16) -> nn.Module:
    """A torchvision ResNet-18 layout at a small width (it returns logits only)."""
    net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=classes,
                                           width_per_group=64)
    return net


class OwnWrapper(nn.Module):
    """A user's network returning (logits, pooled features), its layers under names of its own."""

    def __init__(self, width: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.down1 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(2 * width), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(4 * width), nn.ReLU())
        self.classifier = nn.Linear(4 * width, classes)

    def forward(self, x):
        f = self.down2(self.down1(self.stem(x))).mean(dim=(2, 3))
        return self.classifier(f), f


def _options(name: str) -> dict:
    return {"crd": dict(num_data=64), "cb": dict(class_counts=(8, 4, 2, 1, 1, 1, 1, 1, 1, 1))}.get(name, {})


def _batch(n: int = 8):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, *SHAPE, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("kind", ["torchvision", "own"])
@pytest.mark.parametrize("name", M.available())
def test_every_method_trains_through_distillation(name, kind):
    torch.manual_seed(0)
    make = (lambda: _resnet()) if kind == "torchvision" else (lambda: OwnWrapper(8))
    student = make()
    teacher = _resnet() if kind == "torchvision" else OwnWrapper(16)
    distill = M.Distillation(student, teacher, name, input_shape=SHAPE, peer_factory=make, epochs=4, **_options(name))
    distill.set_epoch(1)
    x, y = _batch()
    index = torch.arange(8)
    loss = distill(x, y, index=index)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(distill.last["total"], loss.detach())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    own = {id(p) for p in distill.distiller.parameters()}
    assert own <= {id(p) for p in distill.parameters()} and not own & {id(p) for p in teacher.parameters()}
    assert not any(p is q for p in distill.parameters() for q in teacher.parameters())  # the teacher is not trained


def test_torchvision_resnet_features_are_the_classifier_input():
    net = _resnet()
    spec = M.model_spec(net, SHAPE)
    assert spec.feature_module == "fc" and spec.feature_dim == 512
    assert spec.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    run = M.TappedNetwork(net, spec.stage_names, spec.feature_module)
    net.eval()
    out = run(torch.randn(2, *SHAPE))
    torch.testing.assert_close(out.logits, net.fc(out.feats))
    assert out.stages["layer4"].shape == (2, 512, 1, 1)


def test_stages_are_found_without_a_naming_convention():
    spec = M.model_spec(OwnWrapper(8), SHAPE)
    assert spec.stage_names == ["stem", "down1", "down2"] and spec.feature_module is None
    nested = nn.Module()
    nested.net = _resnet()
    nested.forward = lambda x: nested.net(x)
    assert M.stage_modules(nested) == ["net.layer1", "net.layer2", "net.layer3", "net.layer4"]


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3 * 32 * 32, 16), nn.Linear(16, 10)

    def forward(self, x):
        f = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(f), f


def test_a_network_without_maps_fails_only_for_methods_that_need_them_and_says_how_to_name_them():
    M.Distillation(Flat(), Flat(), "kd", input_shape=SHAPE)
    with pytest.raises(ValueError, match=r"method 'at' needs stage outputs, but the student's spec lists none .*"
                                         r"name the stage modules explicitly: Distillation\(\.\.\., student_stages"):
        M.Distillation(Flat(), _resnet(), "at", input_shape=SHAPE)
    distill = M.Distillation(OwnWrapper(8), _resnet(), "at", input_shape=SHAPE, student_stages=["down1", "down2"],
                             teacher_stages=["layer2", "layer3"])
    assert distill.distiller.needs.student_stages == ("down1", "down2")
    x, y = _batch()
    assert torch.isfinite(distill(x, y))


def test_needs_are_checked_when_built():
    with pytest.raises(ValueError, match=r"method 'crd' keeps a memory bank .* it needs num_data"):
        M.Distillation(_resnet(), _resnet(), "crd", input_shape=SHAPE)
    distill = M.Distillation(_resnet(), _resnet(), "crd", input_shape=SHAPE, num_data=64)
    with pytest.raises(ValueError, match=r"method 'crd' keeps one entry per training sample: pass each batch's "
                                         r"dataset indices"):
        distill(*_batch())
    with pytest.raises(ValueError, match=r"method 'dml' trains 1 peer network\(s\) beside the student: pass peers="):
        M.Distillation(_resnet(), None, "dml", input_shape=SHAPE)
    with pytest.raises(ValueError, match=r"method 'kd' distils from a teacher: pass teacher="):
        M.Distillation(_resnet(), None, "kd", input_shape=SHAPE)
    with pytest.raises(ValueError, match=r"method 'kd' trains no peers"):
        M.Distillation(_resnet(), _resnet(), "kd", input_shape=SHAPE, peers=[_resnet()])
    with pytest.raises(ValueError, match=r"unknown method 'hinton'; available: at, .*, sp, paper"):
        M.Distillation(_resnet(), _resnet(), "hinton", input_shape=SHAPE)
    distill = M.Distillation(_resnet(), None, "dml", input_shape=SHAPE, peer_factory=_resnet)
    assert len(distill.distiller.peers) == 1


def test_bss_gets_its_inputs_and_networks_from_distillation():
    torch.manual_seed(0)
    distill = M.Distillation(_resnet(), _resnet(), "bss", input_shape=SHAPE, w_kd=1.0, w_bss=1.0, max_samples=8)
    x, y = _batch()
    with torch.no_grad():
        t_pred = distill.teacher(x).argmax(1)
        s_pred = distill.student.eval()(x).argmax(1)
    distill.train()
    y = t_pred.clone()
    y[s_pred != t_pred] = t_pred[s_pred != t_pred]
    loss = distill(x, y)
    assert torch.isfinite(loss) and "bss" in distill.last


def test_bss_with_one_sample_to_attack_gives_a_zero_term_not_a_batchnorm_crash(monkeypatch):
    """One attacked sample cannot pass a BatchNorm student in training mode: the term is 0, as with none."""
    import mlkd_fast.methods.bss as bss_module

    torch.manual_seed(0)
    distill = M.Distillation(_resnet(), _resnet(), "bss", input_shape=SHAPE, w_kd=1.0, w_bss=1.0, max_samples=8)
    monkeypatch.setattr(bss_module, "bss_select", lambda *args, **kwargs: torch.tensor([3]))
    distill.train()
    loss = distill(*_batch())
    assert torch.isfinite(loss) and distill.last["bss"].item() == 0.0


def test_a_warm_up_never_runs_silently():
    distill = M.Distillation(_resnet(), _resnet(), "dkd", input_shape=SHAPE)
    x, y = _batch()
    with pytest.raises(ValueError, match=r"method 'dkd' has a schedule \(the DKD term ramps up linearly over the "
                                         r"first 20 epochs\): call set_epoch\(epoch\)"):
        distill(x, y)
    distill.set_epoch(19)
    full = M.Distillation(_resnet(), _resnet(), "dkd", input_shape=SHAPE, warmup=0)
    full.load_state_dict(distill.state_dict())
    full.teacher.load_state_dict(distill.teacher.state_dict())
    distill(x, y), full(x, y)
    torch.testing.assert_close(distill.last["dkd"], full.last["dkd"])
    with pytest.raises(ValueError, match=r"method 'bss' has a schedule \(linear over the run: w_kd 4 -> 1, "
                                         r"w_bss 2 -> 0\): call set_epoch\(epoch, epochs\)"):
        M.Distillation(_resnet(), _resnet(), "bss", input_shape=SHAPE)(x, y)


def test_steps_per_epoch_carries_the_epoch_and_resumes():
    distill = M.Distillation(_resnet(), _resnet(), "dkd", input_shape=SHAPE, steps_per_epoch=2, warmup=4)
    x, y = _batch()
    ramps = []
    for _ in range(5):
        distill(x, y)
        ramps.append(distill.distiller.ramp())
    assert ramps == [0.25, 0.25, 0.5, 0.5, 0.75]
    again = M.Distillation(_resnet(), _resnet(), "dkd", input_shape=SHAPE, steps_per_epoch=2, warmup=4)
    again.load_state_dict(distill.state_dict())
    again(x, y)
    assert again.distiller.ramp() == 0.75 and again.step == 6


def test_traits_the_loop_reads():
    assert M.baseline() == "ce"
    assert [m for m in M.available() if not M.method_class(m).needs_teacher] == ["cb", "ce", "dml", "gce", "ls"]
    assert [m for m in M.available() if M.method_class(m).takes_views] == ["mlkd"]
    assert M.method_class("crd").gather_hooks == {"bank": True}
    assert M.method_class("mlkd").gather_hooks == {"correlation": False, "supcon": False}
    assert M.method_class("crd").data_options == {"num_data": "num_samples"}
    assert M.method_class("paper") is M.MLKD and "paper" in M.presets()
    assert {M.method_class(m).family for m in M.available()} == {"none", "outputs", "representations", "relations",
                                                                 "cohort", "ours"}
    assert "beta" in M.method_class("dkd").options() and "w_corr" in M.method_class("mlkd").options()


def test_paper_preset_follows_the_input_size():
    small = M.Distillation(_resnet(), _resnet(), "paper", input_shape=SHAPE)
    assert small.distiller.preset == "cifar100" and small.distiller.loss.weights["corr"] == 50.0
    big = M.build("paper", M.ModelSpec(10, 8, input_shape=(3, 224, 224)), M.ModelSpec(10, 8))
    assert big.preset == "imagenet" and big.loss.weights["corr"] == 20.0


def _string_constants(path: pathlib.Path) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_the_loop_and_the_study_never_name_a_method():
    names = set(M.available()) | set(M.presets())
    allowed = {("cli.py", "mlkd"),  # --method's default
               ("kd_beyond_compression.py", "kd"), ("kd_beyond_compression.py", "dml")}  # the --quick slice
    files = sorted((ROOT / "mlkd_fast" / "train").glob("*.py")) + [ROOT / "benchmarks" / "kd_beyond_compression.py"]
    named = [(p.name, line, value) for p in files for line, value in _string_constants(p)
             if value in names and (p.name, value) not in allowed]
    assert not named, f"method names in the loop / study: {named}"


def test_method_options_reach_the_students_method_only(tmp_path):
    from mlkd_fast.train.cli import parse_args
    from mlkd_fast.train.run import Run

    args = parse_args(["--method", "dkd", "--method-opt", "beta=2", "--method-opt", "warmup=3", "--epochs", "1",
                       "--out", str(tmp_path)])
    run = Run(args)
    teacher_phase = run.make_phase("teacher", args.teacher_arch, 1, M.baseline())
    assert type(teacher_phase.distiller) is M.CEOnly
    student_phase = run.make_phase("student", args.arch, 1, args.method, run.frozen(teacher_phase.model))
    assert student_phase.distiller.beta == 2.0 and student_phase.distiller.warmup == 3
    baseline_phase = run.make_phase("baseline", args.arch, 1, M.baseline())
    assert type(baseline_phase.distiller) is M.CEOnly


def test_unknown_method_option_is_refused_before_training(capsys):
    from mlkd_fast.train.cli import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(["--method", "dkd", "--method-opt", "w_at=10"])
    assert stop.value.code == 2
    assert "method 'dkd' has no option 'w_at'; its options are: w_ce, alpha, beta, temperature, warmup" in \
        capsys.readouterr().err
    parse_args(["--method", "at", "--method-opt", "w_at=10"])  # the README's example: an option of at


@pytest.mark.slow
def test_dkd_with_beta_trains_from_the_console_script(tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys

    script = shutil.which("mlkd-train", path=os.path.dirname(sys.executable)) or shutil.which("mlkd-train")
    assert script, "the mlkd-train console script is not installed"
    out = tmp_path / "run"
    run = subprocess.run([script, "--method", "dkd", "--method-opt", "beta=2", "--epochs", "2", "--teacher-epochs",
                          "2", "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "dkd" and config["method_options"] == {"beta": 2}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["teacher", "teacher", "student", "student"]
    assert "dkd" in records[-1] and "dkd" not in records[0]


def test_networks_of_two_families_pair_their_stages_by_resolution():
    student = M.ModelSpec(10, 8, {"bn1": (16, 16, 16), "b0": (24, 8, 8), "b1": (40, 4, 4), "b3": (48, 2, 2),
                                  "b5": (96, 1, 1)})
    teacher = M.ModelSpec(10, 8, {"conv1": (24, 16, 16), "pool": (24, 8, 8), "s2": (48, 8, 8), "s3": (96, 4, 4)})
    at = M.build("at", student, teacher)
    assert (at.s_stages, at.t_stages) == (("bn1", "b0", "b1"), ("conv1", "s2", "s3"))
    sp = M.build("sp", student, teacher)  # its default, the last stage, of the pairs
    assert (sp.s_stages, sp.t_stages) == (("b1",), ("s3",))
    big = M.build("at", student, teacher, min_size=8)  # no map under 8 x 8
    assert (big.s_stages, big.t_stages) == (("bn1", "b0"), ("conv1", "s2"))
    with pytest.raises(ValueError, match=r"share no spatial size to pair them by; name them"):
        M.build("at", student, M.ModelSpec(10, 8, {"a": (4, 3, 3), "b": (4, 5, 5)}))

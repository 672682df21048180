"""What the Python API refuses as soon as it can see it (issue #33, finding 7): MLKDLoss's declared feature
widths and one batch for all its inputs, and Distillation's two networks (one module as both, a teacher
holding the student's parameters, different classes for a method that compares logits). Each was
accepted before: a silently wrong loss, a frozen student, or an error only at the first forward."""
import copy

import pytest
import torch
from torch import nn

import mlkd_fast
import mlkd_fast.methods as M

SHAPE = (3, 8, 8)


def _net(classes: int = 10, width: int = 16) -> nn.Module:
    """A network returning logits only: its pooled features are its classifier's input (layer "3")."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, width), nn.ReLU(), nn.Linear(width, classes))


class Pair(nn.Module):
    """A network returning (logits, features)."""

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(3 * 8 * 8, width), nn.Linear(width, classes)

    def forward(self, x):
        f = torch.relu(self.body(x.flatten(1)))
        return self.head(f), f


class Wrapped(nn.Module):
    """A wrapper holding the network as ``.module`` (as DDP does)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def _inputs(rows=8, classes=10, ds=16, dt=32, labels=None):
    return (torch.randn(rows, classes), torch.randn(rows, classes), torch.randn(rows, ds), torch.randn(rows, dt),
            torch.randint(0, classes, (rows if labels is None else labels,)))


# ---------------------------------------------------------------------------------------------
# MLKDLoss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, value", [("student_dim", 0), ("student_dim", -3), ("teacher_dim", 0),
                                         ("teacher_dim", 2.5), ("student_dim", True), ("supcon_dim", 0)])
def test_mlkd_loss_refuses_a_feature_width_below_one_when_built(name, value):
    kwargs = dict(student_dim=16, teacher_dim=32, w_supcon=1.0)
    kwargs[name] = value
    with pytest.raises(ValueError, match=rf"^{name} must be a positive int \(a feature width\), got {value!r}$"):
        mlkd_fast.MLKDLoss(**kwargs)


def test_mlkd_loss_checks_the_feature_widths_against_the_declared_dims():
    loss_fn = mlkd_fast.MLKDLoss(student_dim=16, teacher_dim=32, backend="torch")
    s, t, fs, ft, y = _inputs(ds=16, dt=32)
    assert torch.isfinite(loss_fn(s, t, fs, ft, y))
    with pytest.raises(ValueError, match=r"^student_feats has 24 features per row but student_dim=16$"):
        loss_fn(s, t, torch.randn(8, 24), ft, y)
    with pytest.raises(ValueError, match=r"^teacher_feats has 24 features per row but teacher_dim=32$"):
        loss_fn(s, t, fs, torch.randn(8, 24), y)
    # with heads: the width reaches the error, not a matmul shape error inside the head
    heads = mlkd_fast.MLKDLoss(student_dim=16, teacher_dim=32, w_align=1.0, w_supcon=1.0, backend="torch")
    with pytest.raises(ValueError, match=r"^student_feats has 24 features per row but student_dim=16$"):
        heads(s, t, torch.randn(8, 24), ft, y)


@pytest.mark.parametrize("name, rows", [("teacher_logits", 7), ("student_feats", 6), ("teacher_feats", 6)])
def test_mlkd_loss_refuses_inputs_of_different_batches(name, rows):
    loss_fn = mlkd_fast.MLKDLoss(backend="torch")
    given = dict(zip(("student_logits", "teacher_logits", "student_feats", "teacher_feats", "target"), _inputs()))
    given[name] = given[name][:rows]
    with pytest.raises(ValueError, match=rf"^{name} has {rows} rows but student_logits has 8: the logits and "
                                         rf"features must come from one batch$"):
        loss_fn(**given)


def test_mlkd_loss_refuses_features_from_another_batch_than_the_logits_without_logit_terms():
    # logits 8, features 6: the correlation alone would run on the features without a word
    loss_fn = mlkd_fast.MLKDLoss(w_ce=0.0, w_kd=0.0, backend="torch")
    s, t, fs, ft, _ = _inputs()
    assert torch.isfinite(loss_fn(s, t, fs, ft))
    with pytest.raises(ValueError, match=r"^student_feats has 6 rows but student_logits has 8"):
        loss_fn(s, t, fs[:6], ft[:6])


def test_mlkd_loss_wants_one_label_per_image():
    s, t, fs, ft, y = _inputs()
    with pytest.raises(ValueError, match=r"^target has 6 labels but student_logits has 8 rows: one label per row$"):
        mlkd_fast.MLKDLoss(backend="torch")(s, t, fs, ft, y[:6])
    # views=2: 8 rows are 2 views of 4 images, 4 labels
    loss_fn = mlkd_fast.MLKDLoss(views=2, backend="torch")
    assert torch.isfinite(loss_fn(s, t, fs, ft, y[:4]))
    with pytest.raises(ValueError, match=r"^target has 8 labels but student_logits has 8 rows: one label per image, "
                                         r"and student_logits holds views=2 rows per image$"):
        loss_fn(s, t, fs, ft, y)


# ---------------------------------------------------------------------------------------------
# Distillation: the two networks
# ---------------------------------------------------------------------------------------------
def _trainable(net: nn.Module) -> bool:
    return all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("wrap", [False, True])
def test_one_module_as_student_and_teacher_is_refused_and_stays_trainable(wrap):
    net = _net()
    teacher = Wrapped(net) if wrap else net
    with pytest.raises(ValueError, match=r"^student and teacher are the same module \(Sequential\): the frozen "
                                         r"teacher would freeze the student too; for self-distillation pass a copy, "
                                         r"e\.g\. teacher=copy\.deepcopy\(student\)$"):
        M.Distillation(net, teacher, "kd", input_shape=SHAPE)
    assert _trainable(net)
    distill = M.Distillation(net, copy.deepcopy(net), "kd", input_shape=SHAPE)
    assert _trainable(net) and not any(p.requires_grad for p in distill.teacher.parameters())
    loss = distill(torch.randn(4, *SHAPE), torch.randint(0, 10, (4,)))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_a_teacher_holding_the_students_parameters_is_refused():
    student = Pair()
    teacher = Pair()
    teacher.body = student.body  # shares the student's first layer
    with pytest.raises(ValueError, match=r"^the teacher \(Pair\) holds 2 of the student's parameters \(e\.g\. "
                                         r"'body\.weight'\): the frozen teacher would freeze them"):
        M.Distillation(student, teacher, "kd", input_shape=SHAPE)
    assert _trainable(student)


@pytest.mark.parametrize("method", ["kd", "dkd", "dist", "bss", "mlkd"])
def test_a_logit_method_refuses_different_classes_when_built(method):
    student, teacher = _net(classes=10), _net(classes=100)
    with pytest.raises(ValueError, match=rf"^method '{method}' compares the student's and the teacher's logits class "
                                         rf"by class, but the student has 10 classes \(its classifier '3'\) and the "
                                         rf"teacher 100 \(its classifier '3'\)"):
        M.Distillation(student, teacher, method, input_shape=SHAPE, epochs=2)
    assert _trainable(teacher)  # refused before the teacher was frozen
    with pytest.raises(ValueError, match=r"the student has 10 classes \(its logits\) and the teacher 100 \(its logits\)"):
        M.Distillation(Pair(classes=10), Pair(classes=100), method, input_shape=SHAPE, epochs=2)


def test_different_classes_from_a_teacher_spec_are_refused():
    spec = M.ModelSpec(num_classes=100, feature_dim=16, input_shape=SHAPE)
    with pytest.raises(ValueError, match=r"the student has 10 classes \(its classifier '3'\) and the teacher 100 "
                                         r"\(teacher_spec\.num_classes\)"):
        M.Distillation(_net(classes=10), None, "kd", input_shape=SHAPE, teacher_spec=spec)


@pytest.mark.parametrize("method", ["rkd", "pkt", "cc", "paper"])
def test_methods_that_do_not_compare_logits_take_different_classes(method):
    """Features and relations carry over between label sets (and the paper preset has no KD term)."""
    options = {"views": 1} if method == "paper" else {}  # a plain batch, not the preset's 4 rotations of each image
    distill = M.Distillation(_net(classes=10), _net(classes=100), method, input_shape=SHAPE, **options)
    assert not distill.distiller.compares_logits
    loss = distill(torch.randn(8, *SHAPE), torch.randint(0, 10, (8,)))
    assert torch.isfinite(loss)


def test_the_logit_methods_are_read_from_the_traits():
    """Every method that distils outputs compares logits; MLKD only with its KD term."""
    spec = M.ModelSpec(num_classes=10, feature_dim=16, input_shape=SHAPE)
    for name in M.available():
        cls = M.method_class(name)
        if cls.needs_teacher and cls.family == "outputs":
            assert M.build(name, spec, spec).compares_logits, name
    assert M.build("mlkd", spec, spec).compares_logits
    assert not M.build("mlkd", spec, spec, w_kd=0.0).compares_logits

"""The distiller zoo's registry, taps and distiller modules (their losses' math is checked in
tests/test_methods_losses.py; their training runs in tests/test_train_methods.py)."""
import pytest
import torch

import mlkd_fast.methods as M
from mlkd_fast import MLKDLoss
from mlkd_fast.train.models import build_model

METHODS = ["at", "bss", "cb", "cc", "ce", "crd", "dist", "dkd", "dml", "fitnet", "fsp", "gce", "kd", "ls", "mlkd", "nst",
           "pkt", "rkd", "sp"]


def test_every_method_is_registered():
    assert M.available() == sorted(METHODS)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown method 'hinton'; available: at, bss, .*, sp"):
        M.build("hinton", M.ModelSpec(10, 8), M.ModelSpec(10, 8))


def test_unknown_option_lists_the_method_options():
    with pytest.raises(ValueError, match=r"method 'kd' has no option 'temprature'; its options are: w_ce, w_kd, temperature"):
        M.build("kd", M.ModelSpec(10, 8), M.ModelSpec(10, 8), temprature=2.0)


def test_the_total_is_the_terms_sum_and_nothing_to_train_on_is_named():
    """The loss is the sum of the terms in ``.last`` (CE unscaled at w_ce = 1, scaled otherwise); a
    method left with no term (CE at w_ce = 0) is an error naming it, not a crash on the number 0."""
    spec = M.ModelSpec(10, 8)
    s, t, y = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10), torch.randint(0, 10, (6,))
    for w_ce, backend in ((1.0, "torch"), (0.5, "torch"), (1.0, "auto"), (0.5, "auto")):
        kd = M.build("kd", spec, spec, w_ce=w_ce, backend=backend)
        loss = kd(M.Outputs(s), M.Outputs(t), y)
        assert torch.equal(loss.detach(), kd.last["total"]) and set(kd.last) == {"ce", "kd", "total"}
        assert torch.equal(loss.detach(), kd.last["ce"] + kd.last["kd"])
        ce = torch.nn.functional.cross_entropy(s, y)
        expected = (ce if w_ce == 1.0 else w_ce * ce).detach()
        if backend == "torch":  # the two terms as written; auto may take the one-pass op (its own rounding)
            assert torch.equal(kd.last["ce"], expected)
        else:
            torch.testing.assert_close(kd.last["ce"], expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="method 'ce' has no term to train on: w_ce is 0"):
        M.build("ce", spec, None, w_ce=0.0)(M.Outputs(s), None, y)


def test_a_layer_that_does_not_exist_is_named():
    net = build_model("cnn-small", 10)
    with pytest.raises(ValueError, match=r"no module named 'body.99' in SmallCNN; its modules are: body, body.0"):
        M.FeatureTaps(net, ["body.99"])


def test_stage_names_that_do_not_exist_are_named():
    spec = M.ModelSpec(10, 8, {"a": (4, 2, 2), "b": (8, 1, 1)})
    with pytest.raises(ValueError, match=r"method 'at': the student has no stage \['c'\]; its stages are \['a', 'b'\]"):
        M.build("at", spec, spec, student_stages=["c"], teacher_stages=["a"])


@pytest.mark.parametrize("arch, shape, stages", [
    ("cnn-small", (1, 8, 8), {"body.2": (8, 8, 8), "body.6": (16, 4, 4), "body.10": (32, 2, 2)}),
    ("resnet18", (3, 32, 32), {"body.layer1": (64, 8, 8), "body.layer2": (128, 4, 4), "body.layer3": (256, 2, 2),
                               "body.layer4": (512, 1, 1)}),
    ("mobilenet_v2", (3, 32, 32), {"body.features.1": (16, 16, 16), "body.features.3": (24, 8, 8),
                                   "body.features.6": (32, 4, 4), "body.features.13": (96, 2, 2)}),  # 1 x 1: no stage
    ("mobilenet_v2", (3, 64, 64), {"body.features.1": (16, 32, 32), "body.features.3": (24, 16, 16),
                                   "body.features.6": (32, 8, 8), "body.features.13": (96, 4, 4),
                                   "body.features.18": (1280, 2, 2)}),
])
def test_model_spec_taps_the_stage_outputs(arch, shape, stages):
    spec = M.model_spec(build_model(arch, 7), shape)
    assert spec.num_classes == 7 and spec.stages == stages


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    student, teacher = build_model("cnn-small", 10), build_model("cnn-large", 10)
    return student, teacher, M.model_spec(student, (1, 8, 8)), M.model_spec(teacher, (1, 8, 8))


def _outputs(net, needs_stages, x):
    with M.FeatureTaps(net, needs_stages) as taps:
        logits, feats = net(x)
        return M.Outputs(logits, feats, taps.take())


def _step(distiller, student, teacher, x, y):
    if distiller.schedule is not None and distiller.epoch is None:
        distiller.set_epoch(0, 10)
    needs = distiller.needs
    s_out = _outputs(student, needs.student_stages, x)
    with torch.no_grad():
        t_out = _outputs(teacher, needs.teacher_stages, x)
    context = {}
    if "index" in needs.context:
        context["index"] = torch.arange(x.shape[0])
    if "inputs" in needs.context:
        context.update(inputs=x, teacher_fn=lambda z: teacher(z)[0], student_fn=lambda z: student(z)[0])
    return distiller(s_out, t_out, y, **context)


@pytest.mark.parametrize("name", [m for m in METHODS if m != "dml"])
def test_distiller_trains_the_student_and_its_own_parts(nets, name):
    student, teacher, s_spec, t_spec = nets
    options = {"crd": {"num_data": 64}, "fsp": {"stage": "joint"},  # fsp's init stage: its own test
               "cb": {"class_counts": (9, 5, 3, 2, 1, 1, 1, 1, 1, 1)}}.get(name, {})
    distiller = M.build(name, s_spec, t_spec, **options)
    student.zero_grad(set_to_none=True)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss = _step(distiller, student, teacher, x, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(distiller.last["total"], loss.detach())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is not None for p in distiller.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("name, stage_role", [("at", "student"), ("fitnet", "teacher"), ("sp", "student")])
def test_a_missing_tap_names_the_method_and_the_output(nets, name, stage_role):
    student, teacher, s_spec, t_spec = nets
    distiller = M.build(name, s_spec, t_spec)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    s_out, t_out = M.Outputs(*student(x)), M.Outputs(*teacher(x))
    if stage_role == "teacher":
        s_out = _outputs(student, distiller.needs.student_stages, x)
    with pytest.raises(ValueError, match=rf"method '{name}' needs the {stage_role}'s stage outputs"):
        distiller(s_out, t_out, y)


def test_missing_loop_context_is_named(nets):
    student, teacher, s_spec, t_spec = nets
    distiller = M.build("crd", s_spec, t_spec, num_data=32)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"method 'crd' needs \['index'\] with every batch"):
        distiller(M.Outputs(*student(x)), M.Outputs(*teacher(x)), y)
    with pytest.raises(ValueError, match=r"method 'crd' keeps a memory bank of every training sample: it needs "
                                         r"num_data"):
        M.build("crd", s_spec, t_spec)


def test_pooled_feature_methods_name_missing_features(nets):
    _, _, s_spec, t_spec = nets
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"method 'pkt' needs the student's pooled features"):
        M.build("pkt", s_spec, t_spec)(M.Outputs(logits), M.Outputs(logits, torch.randn(4, 128)), torch.zeros(4).long())


def test_dkd_warms_up_linearly(nets):
    student, teacher, s_spec, t_spec = nets
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    full = M.build("dkd", s_spec, t_spec, warmup=0)
    ramped = M.build("dkd", s_spec, t_spec, warmup=20)
    _step(full, student, teacher, x, y)
    ramped.set_epoch(0)
    _step(ramped, student, teacher, x, y)
    torch.testing.assert_close(ramped.last["dkd"], full.last["dkd"] / 20)
    ramped.set_epoch(9)
    _step(ramped, student, teacher, x, y)
    torch.testing.assert_close(ramped.last["dkd"], full.last["dkd"] / 2)
    ramped.set_epoch(25)
    _step(ramped, student, teacher, x, y)
    torch.testing.assert_close(ramped.last["dkd"], full.last["dkd"])


def test_crd_bank_is_state_and_moves(nets):
    student, teacher, s_spec, t_spec = nets
    distiller = M.build("crd", s_spec, t_spec, num_data=32, num_negatives=8)
    keys = set(distiller.state_dict())
    assert {"memory.memory_s", "memory.memory_t"} <= keys
    before = distiller.memory.memory_s.clone()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    _step(distiller, student, teacher, x, y)
    after = distiller.memory.memory_s
    assert not torch.equal(before[:8], after[:8]) and torch.equal(before[8:], after[8:])


def test_in_batch_crd_needs_no_bank(nets):
    student, teacher, s_spec, t_spec = nets
    distiller = M.build("crd", s_spec, t_spec, negatives="batch")
    assert distiller.memory is None and distiller.needs.context == ()
    loss = _step(distiller, student, teacher, torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert torch.isfinite(loss)


def test_dml_gives_each_member_the_gradient_of_its_own_loss():
    torch.manual_seed(0)
    cohort = [build_model("cnn-small", 10) for _ in range(2)]
    spec = M.model_spec(cohort[0], (1, 8, 8))
    distiller = M.build("dml", spec, None, cohort=2)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    outs = [M.Outputs(*net(x)) for net in cohort]
    distiller(outs, None, y).backward()
    joint = [p.grad.clone() for p in cohort[0].parameters()]
    # member 0 alone: its CE plus the KL from member 1's (constant) prediction
    for p in cohort[0].parameters():
        p.grad = None
    logits0 = cohort[0](x)[0]
    own = torch.nn.functional.cross_entropy(logits0, y) + torch.nn.functional.kl_div(
        torch.log_softmax(logits0, 1), torch.softmax(cohort[1](x)[0].detach(), 1), reduction="batchmean")
    own.backward()
    for a, p in zip(joint, cohort[0].parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"method 'dml' takes its 2 students' outputs"):
        distiller(outs[0], None, y)


def test_mlkd_distiller_is_mlkd_loss(nets):
    student, teacher, s_spec, t_spec = nets
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    distiller = M.build("mlkd", s_spec, t_spec, backend="torch")
    loss = _step(distiller, student, teacher, x, y)
    s_logits, s_feats = student(x)
    t_logits, t_feats = teacher(x)
    ref = MLKDLoss(s_spec.feature_dim, t_spec.feature_dim, backend="torch")(s_logits, t_logits, s_feats, t_feats, y)
    torch.testing.assert_close(loss, ref)
    assert set(distiller.last) == {"ce", "kd", "corr", "total"}


def test_fsp_widens_a_narrower_student_only():
    narrow = M.ModelSpec(10, 8, {"a": (4, 4, 4), "b": (8, 2, 2)})
    wide = M.ModelSpec(10, 16, {"a": (8, 4, 4), "b": (16, 2, 2)})
    assert len(list(M.build("fsp", narrow, wide).parameters())) == 2
    assert len(list(M.build("fsp", wide, wide).parameters())) == 0



def test_fsp_is_an_initialisation_stage_then_ce_as_repdistiller(nets):
    student, teacher, s_spec, t_spec = nets
    fsp = M.build("fsp", s_spec, t_spec)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    fsp.set_epoch(0, 16)  # an eighth of 16 epochs: 2 of initialisation
    student.zero_grad(set_to_none=True)
    _step(fsp, student, teacher, x, y).backward()
    assert set(fsp.last) == {"fsp", "total"} and student.fc.weight.grad is None  # the classifier does not learn
    fsp.set_epoch(2, 16)
    student.zero_grad(set_to_none=True)
    _step(fsp, student, teacher, x, y).backward()
    assert set(fsp.last) == {"ce", "total"} and student.fc.weight.grad is not None
    with pytest.raises(ValueError, match=r"its initialisation stage takes 30 epochs of a 20-epoch run"):
        M.build("fsp", s_spec, t_spec, init_epochs=30).set_epoch(0, 20)
    joint = M.build("fsp", s_spec, t_spec, stage="joint")
    assert joint.schedule is None and set(_step(joint, student, teacher, x, y) and joint.last) == {"ce", "fsp", "total"}

"""The teacher-free controls of the KD study (ls, gce, cb) against hand formulas: label smoothing,
Zhang & Sabuncu's L_q loss, Cui et al.'s class-balanced weights; their traits and errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import mlkd_fast.functional as MF
import mlkd_fast.methods as M
from mlkd_fast.methods.cb import cb_loss, cb_weights
from mlkd_fast.methods.gce import gce_loss
from mlkd_fast.methods.ls import ls_loss

Z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-2.0, 1.5, 0.0], [0.0, 0.0, 0.0]])
Y = torch.tensor([0, 2, 1, 1])


def _softmax_rows(z):
    return [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in z.tolist()]


def test_label_smoothing_by_hand_and_as_torch():
    eps, p = 0.2, _softmax_rows(Z)
    k = Z.shape[1]
    hand = sum(-((1 - eps) * math.log(p[i][Y[i]]) + sum(eps / k * math.log(p[i][c]) for c in range(k)))
               for i in range(len(p))) / len(p)
    assert ls_loss(Z, Y, eps).item() == pytest.approx(hand, rel=1e-6)
    assert ls_loss(Z, Y, eps).item() == pytest.approx(F.cross_entropy(Z, Y, label_smoothing=eps).item(), rel=1e-6)
    assert ls_loss(Z, Y, 0.0).item() == pytest.approx(F.cross_entropy(Z, Y).item(), rel=1e-6)
    with pytest.raises(ValueError, match="smoothing"):
        ls_loss(Z, Y, 1.0)


def test_gce_by_hand_and_its_limits():
    q, p = 0.7, _softmax_rows(Z)
    hand = sum((1 - p[i][Y[i]] ** q) / q for i in range(len(p))) / len(p)
    assert gce_loss(Z, Y, q).item() == pytest.approx(hand, rel=1e-6)
    mae = sum(1 - p[i][Y[i]] for i in range(len(p))) / len(p)  # q = 1: MAE on the target's probability
    assert gce_loss(Z, Y, 1.0).item() == pytest.approx(mae, rel=1e-6)
    assert gce_loss(Z.double(), Y, 1e-7).item() == pytest.approx(F.cross_entropy(Z, Y).item(), rel=1e-5)  # q -> 0: CE
    with pytest.raises(ValueError, match="q must be"):
        gce_loss(Z, Y, 0.0)


def test_class_balanced_weights_and_loss_by_hand():
    counts, beta = (100, 10, 1), 0.99
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    w = [3 * r / sum(raw) for r in raw]
    assert cb_weights(counts, beta).tolist() == pytest.approx(w, rel=1e-12)
    p = _softmax_rows(Z)
    hand = sum(-w[Y[i]] * math.log(p[i][Y[i]]) for i in range(len(p))) / len(p)
    assert cb_loss(Z, Y, counts, beta).item() == pytest.approx(hand, rel=1e-6)
    assert cb_weights(counts, 0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])  # beta 0: plain CE
    inverse = [1 / n for n in counts]
    assert cb_weights(counts, 1 - 1e-9).tolist() == pytest.approx([3 * v / sum(inverse) for v in inverse], rel=1e-5)
    with pytest.raises(ValueError, match="class_counts"):
        cb_weights((3, 0, 2))
    with pytest.raises(ValueError, match="3 classes but the logits have 4"):
        cb_loss(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), counts)


@pytest.mark.parametrize("name, options, fn", [("ls", {"smoothing": 0.2}, lambda z, y: ls_loss(z, y, 0.2)),
                                               ("gce", {"q": 0.5}, lambda z, y: gce_loss(z, y, 0.5)),
                                               ("cb", {"class_counts": (5, 3, 1)}, lambda z, y: cb_loss(z, y, (5, 3, 1)))])
def test_the_controls_as_methods(name, options, fn):
    cls = M.method_class(name)
    assert not cls.needs_teacher and cls.family == "none" and cls.control_for in ("any", "noise", "imbalance")
    assert cls.main_weight in cls.options() and callable(getattr(MF, f"{name}_loss"))
    spec = M.ModelSpec(num_classes=3, feature_dim=4)
    d = M.build(name, spec, None, w_ce=2.0, **options)
    z = Z.clone().requires_grad_()
    loss = d(M.Outputs(z), None, Y)
    assert loss.item() == pytest.approx(2.0 * fn(Z, Y).item(), rel=1e-6)
    assert set(d.last) == {"ce", "total"}  # the label term replaces CE
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_class_balanced_needs_the_counts_of_every_class():
    spec = M.ModelSpec(num_classes=3, feature_dim=4)
    with pytest.raises(ValueError, match="needs class_counts"):
        M.build("cb", spec, None)
    with pytest.raises(ValueError, match="2 classes but the student has 3"):
        M.build("cb", spec, None, class_counts=(4, 4))
    assert M.method_class("cb").data_options == {"class_counts": "class_counts"}

"""Switching from the reference code with the same hyper-parameters gives the same behaviour: maps of
different sizes pooled as RepDistiller/mdistiller pool them, BSS's clamp, CC's weights per formula
(docs/design.md §6.3)."""
import json
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

import mlkd_fast.methods as M
from mlkd_fast.methods import cc as cc_module

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _maps(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("loss", [M.at_loss, M.nst_loss])
def test_attention_and_nst_pool_the_larger_map(loss):
    big, small = _maps(2, 3, 8, 8), _maps(2, 5, 4, 4, seed=1)
    torch.testing.assert_close(loss(big, small), loss(F.adaptive_avg_pool2d(big, 4), small))
    torch.testing.assert_close(loss(small, big), loss(small, F.adaptive_avg_pool2d(big, 4)))
    uneven = _maps(2, 3, 6, 6, seed=2)  # 6 -> 4: unequal windows, as adaptive pooling gives
    torch.testing.assert_close(loss([uneven], [small]), loss([F.adaptive_avg_pool2d(uneven, 4)], [small]))
    with pytest.raises(ValueError, match="cannot be pooled to one size"):
        loss(_maps(2, 3, 8, 2), _maps(2, 3, 2, 8))


def test_feature_map_methods_train_on_stages_of_other_sizes():
    student = M.ModelSpec(10, 8, {"a": (4, 16, 16), "b": (8, 8, 8)})
    teacher = M.ModelSpec(10, 16, {"a": (8, 8, 8), "b": (16, 4, 4)})
    s = M.Outputs(torch.randn(4, 10), torch.randn(4, 8), {"a": torch.randn(4, 4, 16, 16, requires_grad=True),
                                                           "b": torch.randn(4, 8, 8, 8, requires_grad=True)})
    t = M.Outputs(torch.randn(4, 10), torch.randn(4, 16), {"a": torch.randn(4, 8, 8, 8), "b": torch.randn(4, 16, 4, 4)})
    y = torch.randint(0, 10, (4,))
    for name in ("at", "nst", "fsp", "fitnet"):
        distiller = M.build(name, student, teacher)
        distiller.set_epoch(0, 16)
        loss = distiller(s, t, y)
        assert torch.isfinite(loss), name
        loss.backward()


def _linear_teacher():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 3)


def test_bss_clamps_every_step_as_its_authors_do():
    teacher = _linear_teacher()
    x = torch.zeros(16, 6)
    cls = M.bss_attack_classes(teacher(x).detach(), torch.Generator().manual_seed(0))
    clamped = M.bss_attack(teacher, x, cls, steps=10, step_size=50.0)
    free = M.bss_attack(teacher, x, cls, steps=10, step_size=50.0, clamp=None)
    assert clamped.abs().max() <= 2.5 and free.abs().max() > 2.5
    assert M.BSS.options()["clamp"] == (-2.5, 2.5)
    spec = M.ModelSpec(3, 6)
    assert M.build("bss", spec, spec).clamp == (-2.5, 2.5) and M.build("bss", spec, spec, clamp=None).clamp is None


def test_cc_repdistiller_formula_is_theirs_with_their_weight():
    e_s, e_t = _maps(6, 4), _maps(6, 4, seed=1)
    delta = (e_s - e_t).abs()
    by_hand = sum(float((delta[i] * delta[i + 1]).sum()) for i in range(5)) / 5
    assert math.isclose(float(M.cc_repdistiller_loss(e_s, e_t)), by_hand, rel_tol=1e-12)
    spec = M.ModelSpec(10, 8)
    assert M.build("cc", spec, spec, formula="repdistiller").w_cc == 0.02
    assert M.build("cc", spec, spec).w_cc == cc_module.CC_WEIGHT != 0.02
    assert float(M.cc_repdistiller_loss(e_s[:1], e_t[:1])) == 0.0


def test_cc_paper_weight_is_the_measured_calibration():
    result = json.loads((ROOT / "benchmarks" / "results" / "cc_weight.json").read_text())
    measured = result["digits"]["grad"]["median"]
    assert math.isclose(cc_module.CC_WEIGHT, float(f"{measured:.2g}"), rel_tol=1e-9), (cc_module.CC_WEIGHT, measured)

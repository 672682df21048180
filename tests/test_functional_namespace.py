"""mlkd_fast.functional holds every loss as a function: a <method>_loss for each registered method."""
import torch

import mlkd_fast
from mlkd_fast import functional as F
from mlkd_fast import methods


def test_every_registered_method_has_a_functional_loss():
    missing = [m for m in methods.available() if not callable(getattr(F, f"{m}_loss", None))]
    assert not missing, f"no mlkd_fast.functional.<name>_loss for {missing}"
    assert set(F.__all__) <= set(dir(F))
    assert F.sp_loss is methods.sp_loss and F.dkd_loss is methods.dkd_loss  # one implementation each


def test_mlkd_loss_equals_the_module_without_heads():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, 10, generator=gen, requires_grad=True), torch.randn(12, 10, generator=gen)
    fs, ft = torch.randn(12, 6, generator=gen, requires_grad=True), torch.randn(12, 8, generator=gen)
    y = torch.randint(0, 10, (12,), generator=gen)
    options = dict(temperature=2.0, tau=0.3, w_ce=0.5, w_kd=2.0, w_corr=3.0, backend="torch")
    got = F.mlkd_loss(s, t, fs, ft, y, **options)
    want = mlkd_fast.MLKDLoss(**options)(s, t, fs, ft, y)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    by_hand = (0.5 * torch.nn.functional.cross_entropy(s, y) + 2.0 * F.kd_kl_div(s, t, 2.0, backend="torch")
               + 3.0 * F.correlation_kl(fs, ft, tau=0.3, backend="torch"))
    torch.testing.assert_close(got, by_hand)
    got.backward()
    assert s.grad is not None and fs.grad is not None


def test_ce_loss_is_the_baseline_cross_entropy():
    logits, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(F.ce_loss(logits, y), torch.nn.functional.cross_entropy(logits, y))
    assert F.ce_loss(logits.half(), y).dtype == torch.float32  # computed in fp32 at least

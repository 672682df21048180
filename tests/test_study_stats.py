"""The study's statistics against independent computations: scipy's paired t-test, hand-worked Holm
and Benjamini-Hochberg examples, and the power formula's defining property."""
import math
import os
import sys

import pytest
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import study_stats as S  # noqa: E402


def test_paired_summary_matches_scipy():
    a, b = [71.2, 69.8, 72.5, 70.1, 71.9], [70.0, 69.9, 71.0, 69.2, 70.4]
    d = [x - y for x, y in zip(a, b)]
    s = S.paired_summary(d)
    assert math.isclose(s["p"], stats.ttest_rel(a, b).pvalue, rel_tol=1e-9)
    low, high = stats.t.interval(0.95, len(d) - 1, loc=sum(d) / len(d), scale=stats.sem(d))
    assert math.isclose(s["ci_low"], low, rel_tol=1e-9) and math.isclose(s["ci_high"], high, rel_tol=1e-9)
    assert S.paired_summary([1.0])["p"] is None


def test_holm_and_bh_by_hand():
    p = [0.01, 0.04, 0.03, None, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.06 (monotone)
    assert S.holm(p) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    # BH: p * m / rank with m = 4: 0.005*4/1=0.02, 0.01*4/2=0.02, 0.03*4/3=0.04, 0.04*4/4=0.04
    assert S.benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, None, 0.02])


def test_power_estimate():
    sd = 2.0
    n = S.seeds_for(sd, target=3.0)
    assert n >= 5 and S.detectable_difference(sd, n) <= 3.0
    assert n == 5 or S.detectable_difference(sd, n - 1) > 3.0
    assert S.detectable_difference(sd, 10) < S.detectable_difference(sd, 5)


def test_cells_pair_by_setting_and_seed_and_the_table_corrects_over_all_cells():
    rows = [{"method": m, "gap": g, "setting": s, "seed": seed, "top1_last": v}
            for m, g, off in (("ce", "-", 0.0), ("kd", "large", 2.0), ("dml", "-", 0.5))
            for s in ("clean", "sym20") for seed, g_v in enumerate((70.0, 71.0, 69.5, 70.5, 70.2))
            for v in [g_v + off * (1 + 0.1 * seed)]]
    t = S.table(rows, "ce")
    assert set(t) == {("large", "kd", "clean"), ("large", "kd", "sym20"), ("-", "dml", "clean"), ("-", "dml", "sym20")}
    kd = t[("large", "kd", "clean")]
    assert kd["mean"] == pytest.approx(2.4) and kd["n"] == 5 and kd["survives"]
    assert all(c["p_holm"] >= c["p"] for c in t.values())


# ---- the confirmatory family's tests (issue #37): known answers -----------------------------
def test_sign_flip_p_known_answers():
    # all ten differences positive: only the observed pattern and its mirror reach |sum|: 2 / 1024
    assert S.sign_flip_p([1.0] * 10) == pytest.approx(2 / 1024)
    assert S.min_sign_flip_p(10) == pytest.approx(2 / 1024)
    # [1, 2, 3]: |sum| = 6 reached by +++ and --- only: 2 / 8; [3, -1, 1]: observed |sum| = 3, and the
    # sums of +-3 +-1 +-1 are 5, 3, 3, 1, -1, -3, -3, -5: |sum| >= 3 in 6 of 8
    assert S.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    assert S.sign_flip_p([3.0, -1.0, 1.0]) == pytest.approx(6 / 8)
    assert S.sign_flip_p([0.0, 0.0]) == 1.0 and S.sign_flip_p([]) is None
    # against a brute force over every pattern of a random case
    import itertools
    import random
    rng = random.Random(5)
    d = [rng.gauss(0.8, 1.0) for _ in range(9)]
    brute = sum(abs(sum(s * x for s, x in zip(signs, d))) >= abs(sum(d)) - 1e-12
                for signs in itertools.product((1, -1), repeat=9)) / 512
    assert S.sign_flip_p(d) == pytest.approx(brute)
    # the Monte Carlo branch agrees with the exact one
    assert S.sign_flip_p(d, exact_up_to=4, draws=50_000) == pytest.approx(brute, abs=0.01)


def test_seeds_for_exact_reaches_holms_first_step():
    # 28 hypotheses: alpha / m = 0.00179; 2 / 1024 = 0.00195 is not below it, 2 / 2048 = 0.00098 is
    assert S.seeds_for_exact(28) == 11
    assert S.seeds_for_exact(25) == 10 and S.seeds_for_exact(1) == 6  # 2/64 = 0.031 < 0.05, 2/32 is not


def test_t_power_known_answers():
    # scipy-free check of one value: n = 10, delta = sd, alpha 0.05 -> power 0.8031 (G*Power / R's
    # power.t.test(n=10, delta=1, sd=1, type="one.sample") gives 0.8030962)
    assert S.t_power(1.0, 1.0, 10) == pytest.approx(0.8030962, abs=1e-6)
    assert S.t_power(0.0, 1.0, 10) == pytest.approx(0.05, abs=1e-9)  # the size at no effect
    delta = S.detectable_difference_exact(2.0, 12, alpha=0.05 / 28)
    assert S.t_power(delta, 2.0, 12, alpha=0.05 / 28) == pytest.approx(0.8, abs=1e-6)
    assert delta > S.detectable_difference_exact(2.0, 12)  # a corrected level needs a larger effect


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    d = [1.0, 2.0, 3.0, 4.0, 5.0, 2.5, 3.5, 1.5, 4.5, 3.0]
    lo, hi = S.bootstrap_ci(d)
    assert lo < 3.0 < hi and (lo, hi) == S.bootstrap_ci(d)
    assert S.bootstrap_ci([1.0]) == (None, None)
    assert S.bootstrap_ci([2.0] * 5) == (2.0, 2.0)


def test_family_corrects_the_exact_p_values_with_holm_and_lists_worse_cells():
    cells = {"a": [1.0] * 11, "b": [-2.0 - 0.1 * i for i in range(11)], "c": [0.5, -0.5] * 5 + [0.1]}
    out = S.family(cells)
    assert out["a"]["p_exact"] == pytest.approx(2 / 2048) and out["a"]["p_holm_exact"] == pytest.approx(3 * 2 / 2048)
    assert out["a"]["direction"] == "better" and out["b"]["direction"] == "worse" and out["c"]["direction"] == "none"
    assert all(c["p_holm_exact"] >= c["p_exact"] for c in out.values())


def test_trend_slope_per_seed():
    # gains 1 + 0.1 * severity + seed noise that is the same at every severity: every slope is 0.1
    gains = {s: {seed: 1 + 0.1 * s + 0.3 * seed for seed in range(6)} for s in (0, 20, 40, 60)}
    t = S.trend(gains)
    assert t["mean"] == pytest.approx(0.1) and t["seeds"] == list(range(6)) and t["severities"] == [0, 20, 40, 60]
    assert S.slope([0, 1, 2], [1.0, 3.0, 5.0]) == pytest.approx(2.0)
    # a seed missing at one severity is left out
    del gains[40][5]
    assert S.trend(gains)["seeds"] == list(range(5))

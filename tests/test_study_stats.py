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

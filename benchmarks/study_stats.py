"""The statistics of the KD-beyond-compression study: paired differences to the baseline with their
confidence intervals, p-values corrected over the whole table, and the power estimate that sets the
number of seeds.

A cell is (gap, method, setting). Its runs are paired with the baseline's runs of the same setting
and seed (same split, same corruption, same initialisation of the student, same batch order), so the
quantity tested is the mean over seeds of ``top1(method) - top1(baseline)``:

- 95 % confidence interval: ``mean +- t(0.975, n - 1) * sd / sqrt(n)`` (Student's t, paired);
- p-value: the two-sided paired t-test of "mean difference = 0";
- correction over every cell of the table at once: Holm's step-down (controls the family-wise error
  rate) and, reported beside it, Benjamini-Hochberg (controls the false-discovery rate); a cell
  "survives" when its Holm-adjusted p-value is below 0.05;
- power: with the paired SD ``s`` measured on a pilot, ``n`` seeds detect a difference
  ``delta(n) = (t(1 - alpha / 2, n - 1) + t(power, n - 1)) * s / sqrt(n)`` at level ``alpha`` with the given
  power (the usual t approximation of the non-central t); the study takes the smallest n >= 5 whose
  delta is at most the target.

For the pre-specified confirmatory family (issue #37) beside those:

- the exact sign-flip permutation test of "the paired differences are symmetric about 0"
  (:func:`sign_flip_p`: all ``2^n`` sign patterns, the statistic ``|sum d|``; its smallest two-sided
  p-value is ``2 / 2^n``, so Holm's first step at ``alpha / m`` is reachable only with
  ``2 / 2^n < alpha / m``: :func:`seeds_for_exact`);
- a percentile bootstrap interval of the mean (:func:`bootstrap_ci`, fixed seed);
- the exact power of the two-sided paired t-test from the non-central t (:func:`t_power`) and the
  difference a number of seeds detects at a corrected level (:func:`detectable_difference_exact`);
- :func:`family` corrects a dict of cells at once (Holm on the exact p-values, the primary test;
  Holm on the t-test's and BH beside), and :func:`trend` tests a trend of the paired gain over
  ordered severities: per seed the least-squares slope of the gain on the severity, then the mean slope
  with the same tests.
"""
from __future__ import annotations

import itertools
import math
import random
import statistics
from typing import Iterable, Mapping, Optional, Sequence

from scipy import stats as _st


def t_quantile(q: float, df: int) -> float:
    return float(_st.t.ppf(q, df))


def paired_summary(differences: Sequence[float], level: float = 0.95) -> dict:
    """Mean, SD, the ``level`` confidence interval and the two-sided paired t-test p-value of a cell's
    per-seed differences (``n >= 2``; with ``n < 2`` only the mean)."""
    n = len(differences)
    mean = statistics.fmean(differences) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci_low": None, "ci_high": None, "p": None}
    sd = statistics.stdev(differences)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        p = float(2 * _st.t.sf(abs(t), n - 1))
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "p": p}


def holm(p_values: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjusted p-values (``None`` entries are skipped and stay ``None``)."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(indexed)
    adjusted: list[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def benjamini_hochberg(p_values: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Benjamini-Hochberg adjusted p-values (q-values; ``None`` entries stay ``None``)."""
    indexed = sorted(((p, i) for i, p in enumerate(p_values) if p is not None), reverse=True)
    m = len(indexed)
    adjusted: list[Optional[float]] = [None] * len(p_values)
    running = 1.0
    for k, (p, i) in enumerate(indexed):
        rank = m - k
        running = min(running, p * m / rank)
        adjusted[i] = min(1.0, running)
    return adjusted


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest mean paired difference ``n`` seeds detect at level ``alpha`` with ``power``."""
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def seeds_for(sd: float, target: float, alpha: float = 0.05, power: float = 0.8, least: int = 5,
              most: int = 30) -> int:
    """The smallest number of seeds (at least ``least``) whose detectable difference is at most ``target``;
    ``most`` when none up to it is."""
    for n in range(max(2, least), most + 1):
        if detectable_difference(sd, n, alpha, power) <= target:
            return n
    return most


def cells(rows: Iterable[dict], baseline: str, value: str = "top1_last") -> dict[tuple, dict]:
    """Per (gap, method, setting) the paired differences to ``baseline`` (same setting and seed): the
    baseline and teacher-free methods are stored under gap "-" and compared with every gap's
    methods. Returns ``{cell: {"differences": [...], "seeds": [...], "values": [...]}}`` for every
    method but the baseline and the teachers."""
    rows = list(rows)
    base = {(r["setting"], r["seed"]): r[value] for r in rows if r["method"] == baseline}
    out: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] in (baseline, "teacher"):
            continue
        key = (r["setting"], r["seed"])
        if key not in base:
            continue
        cell = out.setdefault((r["gap"], r["method"], r["setting"]), {"differences": [], "seeds": [], "values": []})
        cell["differences"].append(r[value] - base[key])
        cell["seeds"].append(r["seed"])
        cell["values"].append(r[value])
    return out


def table(rows: Iterable[dict], baseline: str, alpha: float = 0.05, value: str = "top1_last") -> dict[tuple, dict]:
    """:func:`cells` with every cell's :func:`paired_summary`, its Holm and BH adjusted p-values
    (corrected over all cells together) and ``survives`` (Holm-adjusted p < ``alpha``)."""
    found = cells(rows, baseline, value)
    keys = sorted(found)
    summaries = [paired_summary(found[k]["differences"]) for k in keys]
    holm_p = holm([s["p"] for s in summaries])
    bh_p = benjamini_hochberg([s["p"] for s in summaries])
    out = {}
    for k, s, h, b in zip(keys, summaries, holm_p, bh_p):
        out[k] = {**found[k], **s, "p_holm": h, "p_bh": b, "survives": h is not None and h < alpha}
    return out


# ---------------------------------------------------------------------------------------------
# the confirmatory family's tests (issue #37)
# ---------------------------------------------------------------------------------------------
def sign_flip_p(differences: Sequence[float], exact_up_to: int = 22, draws: int = 200_000, seed: int = 0) -> Optional[float]:
    """Two-sided p-value of the sign-flip permutation test of paired differences (H0: each difference is
    as likely positive as negative): the fraction of the ``2^n`` sign patterns whose ``|sum|`` is at least
    the observed one (the observed pattern included, so never 0). Exact up to ``exact_up_to`` differences,
    a Monte Carlo estimate with ``draws`` random patterns (fixed ``seed``, the observed counted once)
    above. ``None`` for no differences; 1.0 when every difference is 0."""
    d = [float(x) for x in differences]
    n = len(d)
    if n == 0:
        return None
    observed = abs(sum(d))
    tol = 1e-9 * max(1.0, sum(abs(x) for x in d))
    if n <= exact_up_to:
        count = 0
        # one half of the patterns and their mirror images have the same |sum|: enumerate signs of d[1:]
        first, rest = d[0], d[1:]
        for signs in itertools.product((1.0, -1.0), repeat=n - 1):
            if abs(first + sum(s * x for s, x in zip(signs, rest))) >= observed - tol:
                count += 2
        return count / 2 ** n
    rng = random.Random(seed)
    hits = sum(1 for _ in range(draws) if abs(sum(x if rng.random() < 0.5 else -x for x in d)) >= observed - tol)
    return (hits + 1) / (draws + 1)


def min_sign_flip_p(n: int) -> float:
    """The smallest two-sided p-value the sign-flip test can give with ``n`` non-zero differences."""
    return 2.0 / 2 ** n


def seeds_for_exact(m: int, alpha: float = 0.05) -> int:
    """The fewest seeds with which the exact sign-flip test can pass Holm's first step over ``m``
    hypotheses (``2 / 2^n < alpha / m``)."""
    n = 1
    while min_sign_flip_p(n) >= alpha / m:
        n += 1
    return n


def bootstrap_ci(differences: Sequence[float], level: float = 0.95, draws: int = 10_000,
                 seed: int = 0) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval of the mean of ``differences`` (resampled with replacement,
    ``draws`` times, fixed ``seed``); ``(None, None)`` with fewer than 2 values."""
    d = list(differences)
    n = len(d)
    if n < 2:
        return None, None
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(d) for _ in range(n)) / n for _ in range(draws))
    lo = means[max(0, int(math.floor((1 - level) / 2 * draws)))]
    hi = means[min(draws - 1, int(math.ceil((1 + level) / 2 * draws)) - 1)]
    return lo, hi


def t_power(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Exact power of the two-sided paired t-test at level ``alpha`` with ``n`` pairs against a true mean
    difference ``delta`` with SD ``sd``: ``P(|T| > t(1 - alpha/2, n-1))`` for ``T`` non-central t with
    ``n - 1`` degrees of freedom and non-centrality ``delta / (sd / sqrt(n))``."""
    if n < 2 or sd <= 0:
        raise ValueError(f"t_power needs n >= 2 and sd > 0, got n={n}, sd={sd}")
    crit = t_quantile(1 - alpha / 2, n - 1)
    nc = delta / (sd / math.sqrt(n))
    return float(_st.nct.sf(crit, n - 1, nc) + _st.nct.cdf(-crit, n - 1, nc))


def detectable_difference_exact(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The mean paired difference that ``n`` pairs detect with ``power`` at level ``alpha`` (two-sided
    paired t-test, exact non-central t), by bisection on :func:`t_power`."""
    lo, hi = 0.0, sd
    while t_power(hi, sd, n, alpha) < power:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_power(mid, sd, n, alpha) < power else (lo, mid)
    return hi


def compare(differences: Sequence[float], level: float = 0.95) -> dict:
    """:func:`paired_summary` with the exact sign-flip p-value (``p_exact``) and the bootstrap interval."""
    out = paired_summary(differences, level)
    out["p_exact"] = sign_flip_p(differences) if len(differences) else None
    out["boot_low"], out["boot_high"] = bootstrap_ci(differences, level)
    return out


def family(differences: Mapping[str, Sequence[float]], alpha: float = 0.05) -> dict[str, dict]:
    """Every cell's :func:`compare`, corrected over the cells together: ``p_holm_exact`` (Holm on the
    exact sign-flip p-values: the primary test), ``p_holm`` (Holm on the t-test's), ``p_bh`` (BH on the
    t-test's); ``survives`` = ``p_holm_exact < alpha``; ``direction`` "better" / "worse" / "none" (the
    sign of the mean where it survives)."""
    keys = sorted(differences)
    summaries = [compare(differences[k]) for k in keys]
    holm_exact = holm([s["p_exact"] for s in summaries])
    holm_t = holm([s["p"] for s in summaries])
    bh_t = benjamini_hochberg([s["p"] for s in summaries])
    out = {}
    for k, s, he, ht, b in zip(keys, summaries, holm_exact, holm_t, bh_t):
        survives = he is not None and he < alpha
        out[k] = {**s, "p_holm_exact": he, "p_holm": ht, "p_bh": b, "survives": survives,
                  "direction": ("better" if s["mean"] > 0 else "worse") if survives else "none"}
    return out


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """The least-squares slope of ``y`` on ``x`` (at least two distinct ``x``)."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        raise ValueError("slope needs at least two distinct severities")
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx


def trend(gains: Mapping[float, Mapping[int, float]]) -> dict:
    """The trend of a paired gain over ordered severities: ``gains[severity][seed]`` is the seed's paired
    difference at that severity. Per seed present at every severity, the least-squares slope of its gains
    on the severities; then :func:`compare` of those slopes (mean slope in points per unit of severity,
    its CI, the t-test and the exact sign-flip p-value) and the seeds used."""
    levels = sorted(gains)
    if len(levels) < 2:
        raise ValueError("a trend needs at least two severities")
    seeds = sorted(set.intersection(*(set(gains[s]) for s in levels)))
    slopes = [slope(levels, [gains[s][seed] for s in levels]) for seed in seeds]
    return {**compare(slopes), "severities": levels, "seeds": seeds}

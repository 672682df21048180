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
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional, Sequence

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

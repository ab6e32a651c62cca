"""Whether two sets of repeat timings differ by more than their noise, as asv and hyperfine's scripts ask.

Mann-Whitney U, a rank test that assumes nothing about how times are distributed: scipy's when scipy is
installed, else the same test computed here as a permutation test of the rank sum (every split of the pooled
repeats for small samples, which is the exact test; seeded random splits for large ones). A bootstrap of the
ratio of medians was tried first and rejected: on 2-3 repeats it calls any two non-overlapping sets
different (p ~ 0.0005 for [1, 2] against [3, 4]) and it flagged 1 in 25 same-distribution pairs of 10.
Repeats matter: with 3 and 3 the smallest possible two-sided p is 0.1, so nothing is marked; 4 and 4 can
reach 0.029, 5 and 5 reach 0.008.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import itertools
import math

import numpy as np
import pandas as pd

ALPHA = 0.05
EXACT_LIMIT = 20_000  # splits of the pooled repeats enumerated exactly; beyond this, that many random ones
MIN_REPEATS = 2  # fewer on either side: no test at all


@dataclass(frozen=True)
class Verdict:
    significant: bool
    p_value: float | None  # None when no test could run
    method: str  # "mann-whitney (scipy)", "mann-whitney (permutation)" or "too few repeats"

    @property
    def mark(self) -> str:
        return "*" if self.significant else ""


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError:
        return None
    return stats


def _splits(n: int, n_a: int, rng: np.random.Generator):
    """Index sets that could have been A's: all of them when few, else EXACT_LIMIT random ones."""
    if math.comb(n, n_a) <= EXACT_LIMIT:
        return itertools.combinations(range(n), n_a)
    return (rng.permutation(n)[:n_a] for _ in range(EXACT_LIMIT))


def rank_sum_p(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> float:
    """Two-sided p of Mann-Whitney U by permutation: the share of splits of the pooled ranks whose U lies at
    least as far from its mean as the observed one (ties take average ranks)."""
    ranks = pd.Series(np.concatenate([a, b])).rank().to_numpy()
    n_a = len(a)
    offset, center = n_a * (n_a + 1) / 2, n_a * len(b) / 2
    observed = abs(ranks[:n_a].sum() - offset - center)
    distances = [abs(ranks[list(split)].sum() - offset - center) for split in _splits(len(ranks), n_a, rng)]
    return float(np.mean(np.asarray(distances) >= observed - 1e-9))


def compare_samples(a: Sequence[float], b: Sequence[float], use_scipy: bool = True) -> Verdict:
    """Do the repeats of B differ from those of A beyond noise (two-sided, at ALPHA)?"""
    a = np.asarray([x for x in a if x == x], dtype=float)  # NaN (per-token time of a 1-token run) is no sample
    b = np.asarray([x for x in b if x == x], dtype=float)
    if min(len(a), len(b)) < MIN_REPEATS:
        return Verdict(False, None, "too few repeats")
    stats = _scipy_stats() if use_scipy else None
    if stats is not None:
        p = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
        return Verdict(p < ALPHA, p, "mann-whitney (scipy)")
    p = rank_sum_p(a, b, np.random.default_rng(0))
    return Verdict(p < ALPHA, p, "mann-whitney (permutation)")


def method_name() -> str:
    how = "scipy" if _scipy_stats() is not None else "permutation test"
    return f"Mann-Whitney U on the repeats ({how}), two-sided, p < {ALPHA}"


def mark_differences(joined: pd.DataFrame, runs_a: pd.DataFrame, runs_b: pd.DataFrame,
                     keys: Sequence[str] = ("strategy", "new_tokens")) -> pd.DataFrame:
    """Add to each joined point p-values and marks for total_s and per_token_ms, from both runs' repeats."""
    keys = list(keys)
    groups_a, groups_b = runs_a.groupby(keys), runs_b.groupby(keys)
    added: dict[str, list] = {f"{c}_{f}": [] for c in ("total", "per_token") for f in ("p", "significant")}
    for key in joined[keys].itertuples(index=False, name=None):
        ra, rb = groups_a.get_group(key), groups_b.get_group(key)
        for label, column in (("total", "total_s"), ("per_token", "per_token_ms")):
            verdict = compare_samples(ra[column], rb[column])
            added[f"{label}_p"].append(verdict.p_value)
            added[f"{label}_significant"].append(verdict.significant)
    return joined.assign(**added)

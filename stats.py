"""Paired statistics for comparing response sources on the same questions.

Every source answers the same questions and is tested on the same test questions, so two runs
are compared per question, never as two independent samples:
- accuracy difference A - B: mean of the per-question differences, with a paired bootstrap 95%
  interval (resample test questions with replacement, both runs together);
- an exact McNemar test: under "no difference" each discordant question (right under one, wrong
  under the other) is a fair coin, so the two-sided p-value is a binomial tail on them;
- a mean (perplexity, a log-likelihood change) with a bootstrap interval;
- a correlation with its n and a two-sided permutation p-value (shuffle one side).

Deterministic: every resampling uses a numpy Generator seeded by the caller (default 0), so a
report prints the same intervals every time. Percentile intervals (not BCa): simple to audit;
with a few hundred questions they are close to the textbook alternatives.

Nothing here imports the rest of the project.
"""

from __future__ import annotations

import math
from itertools import permutations
from typing import Sequence

import numpy as np

N_BOOT = 10_000  # bootstrap resamples: the interval's ends move by < 0.002 between seeds at n=500


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values to average")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(v.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """(mean of a - b, low, high): the per-item differences of two paired lists (same items, same
    order; correct = 1.0, wrong = 0.0 for accuracies) with a paired bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired lists differ in length: {len(a)} and {len(b)}")
    return bootstrap_mean_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64),
                             n_boot, seed, level)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of two paired lists of verdicts: {"a_only", "b_only", "p"}.

    a_only = questions right under a and wrong under b, b_only the reverse. Under the null each
    of the n = a_only + b_only discordant questions goes either way with probability 1/2, so
    p = min(1, 2 * P[Binomial(n, 1/2) <= min(a_only, b_only)]); p = 1 with no discordant pair."""
    if len(a) != len(b):
        raise ValueError(f"paired lists differ in length: {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation; nan when either side is constant or fewer than 2 points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def permutation_test(x: Sequence[float], y: Sequence[float], n_perm: int = N_BOOT, seed: int = 0) -> dict:
    """{"r", "p", "n"}: Pearson's r and its two-sided permutation p-value, the share of
    shufflings of y with |r| at least the observed one (the observed order counted once, so
    p >= 1 / (n_perm + 1)). With n points there are only n! orderings: for n <= 7 every one is
    enumerated and p is exact."""
    if len(x) != len(y):
        raise ValueError(f"paired lists differ in length: {len(x)} and {len(y)}")
    r = pearson(x, y)
    n = len(x)
    if math.isnan(r):
        return {"r": r, "p": float("nan"), "n": n}
    yv = np.asarray(y, dtype=np.float64)
    if n <= 7:
        rs = [pearson(x, yv[list(p)]) for p in permutations(range(n))]
        p = sum(abs(v) >= abs(r) - 1e-12 for v in rs) / len(rs)
    else:
        rng = np.random.default_rng(seed)
        hits = sum(abs(pearson(x, rng.permutation(yv))) >= abs(r) - 1e-12 for _ in range(n_perm))
        p = (hits + 1) / (n_perm + 1)
    return {"r": r, "p": float(p), "n": n}

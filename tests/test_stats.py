"""stats.py against hand-computed values: McNemar's binomial tail, the exact permutation p-value,
and bootstrap intervals that collapse on constant data and match the normal approximation."""

import math

import numpy as np
import pytest

import stats


@pytest.mark.parametrize("a_only, b_only, p", [
    (5, 0, 2 / 32),  # 2 * P[Bin(5, 1/2) <= 0]
    (8, 2, 2 * (1 + 10 + 45) / 1024),  # 2 * P[Bin(10, 1/2) <= 2] = 0.109375
    (1, 1, 1.0),  # 2 * 3/4, capped at 1
    (0, 0, 1.0),  # no discordant question
])
def test_mcnemar_exact(a_only, b_only, p):
    both, neither = 7, 4  # concordant questions do not count
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    r = stats.mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"]) == (a_only, b_only) and r["p"] == pytest.approx(p)


def test_paired_difference_of_constant_differences_is_exact():
    mean, lo, hi = stats.paired_difference([1, 1, 0, 1], [0, 0, -1, 0])  # every difference is 1
    assert mean == lo == hi == 1.0


def test_bootstrap_interval_matches_the_normal_approximation():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    mean, lo, hi = stats.bootstrap_mean_ci(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))  # ~0.196
    assert mean == pytest.approx(x.mean())
    assert lo == pytest.approx(mean - half, abs=0.03) and hi == pytest.approx(mean + half, abs=0.03)
    assert stats.bootstrap_mean_ci(x) == (mean, lo, hi)  # seeded: the same interval every time


def test_paired_beats_unpaired_when_items_vary():
    """The point of pairing: two sources whose scores share a large per-question effect."""
    rng = np.random.default_rng(2)
    question = rng.normal(0, 5, size=200)
    a, b = question + 0.5 + rng.normal(0, 0.1, 200), question + rng.normal(0, 0.1, 200)
    diff, lo, hi = stats.paired_difference(a, b)
    assert diff == pytest.approx(0.5, abs=0.05) and 0.4 < lo < hi < 0.6


def test_permutation_test_exact_for_small_n():
    # x and y in the same order: r = 1; of the 5! = 120 orderings of y only itself and its
    # reverse reach |r| = 1, so p = 2 / 120
    r = stats.permutation_test([1, 2, 3, 4, 5], [2, 4, 5, 8, 10])
    assert r["n"] == 5 and r["r"] == pytest.approx(np.corrcoef([1, 2, 3, 4, 5], [2, 4, 5, 8, 10])[0, 1])
    r = stats.permutation_test([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    assert r["r"] == pytest.approx(1.0) and r["p"] == pytest.approx(2 / 120)
    assert math.isnan(stats.permutation_test([1, 2, 3], [4, 4, 4])["p"])  # a constant side


def test_permutation_test_sampled_for_larger_n():
    x = np.arange(30, dtype=float)
    r = stats.permutation_test(x, x ** 2, n_perm=2000)
    assert r["p"] == pytest.approx(1 / 2001)  # no shuffle of 30 points comes near r = 0.97
    noise = stats.permutation_test(x, np.random.default_rng(3).normal(size=30), n_perm=2000)
    assert noise["p"] > 0.05


def test_paired_lists_must_match():
    with pytest.raises(ValueError, match="differ in length"):
        stats.mcnemar_exact([True], [True, False])

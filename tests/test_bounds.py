"""Racing's confidence bounds on a full evaluation's mean, from a prefix of a seeded order."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.fitness.bounds import (
    binary_mean,
    chunk_ends,
    chunk_fractions,
    difference_bounds,
    mean_bounds,
    ones_lower,
    ones_upper,
    serfling_radius,
)


def _hypergeom_pmf(k: int, population: int, ones: int, n: int) -> float:
    if k < 0 or k > ones or n - k > population - ones:
        return 0.0
    return math.comb(ones, k) * math.comb(population - ones, n - k) / math.comb(population, n)


@settings(max_examples=150, deadline=None)
@given(
    population=st.integers(1, 60),
    data=st.data(),
    delta=st.sampled_from([0.0, 0.001, 0.05, 0.2, 0.5]),
)
def test_count_bounds_are_exact(population, data, delta):
    """For every population, the chance (exact, summed over the hypergeometric law of what a
    prefix sees) that the bound misses the population's count of ones is at most delta; at
    delta 0 never."""
    ones = data.draw(st.integers(0, population))
    n = data.draw(st.integers(0, population))
    miss_up = miss_low = 0.0
    for k in range(0, n + 1):
        p = _hypergeom_pmf(k, population, ones, n)
        if p == 0:
            continue
        up, low = ones_upper(k, n, population, delta), ones_lower(k, n, population, delta)
        assert k <= up <= k + population - n and k <= low + (population - n) and low >= k
        miss_up += p * (up < ones)
        miss_low += p * (low > ones)
    assert miss_up <= delta + 1e-9 and miss_low <= delta + 1e-9


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=40),
    frac=st.floats(0, 1),
    seed=st.integers(0, 10**6),
)
def test_certainty_is_the_hard_bound_and_always_holds(values, frac, seed):
    """At delta 0 the bounds are what the unscored items could make of the mean, whatever the
    order: they always contain full evaluation's mean, and they shrink to it at the end."""
    order = list(values)
    random.Random(seed).shuffle(order)
    n = int(frac * len(order))
    truth = sum(values) / len(values)
    lo, hi = binary_mean(int(sum(order[:n])), n, len(order), 0.0)
    assert lo == (sum(order[:n])) / len(order)
    assert hi == (sum(order[:n]) + len(order) - n) / len(order)
    assert lo <= truth <= hi
    lo2, hi2 = mean_bounds(order[:n], len(order), 0.0, 1.0, 0.0)
    assert (lo2, hi2) == pytest.approx((lo, hi), abs=1e-12)
    full = binary_mean(int(sum(order)), len(order), len(order), 0.3)
    assert full == (truth, truth)


@settings(max_examples=60, deadline=None)
@given(
    a=st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=50),
    data=st.data(),
    seed=st.integers(0, 10**6),
)
def test_paired_hard_bound_always_holds(a, data, seed):
    """At delta 0 the paired bounds on mean(x) - mean(y) contain full evaluation's difference
    for every order, binary or not, and are exact once every item is scored."""
    b = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=len(a), max_size=len(a)))
    idx = list(range(len(a)))
    random.Random(seed).shuffle(idx)
    x, y = [a[i] for i in idx], [b[i] for i in idx]
    truth = (sum(a) - sum(b)) / len(a)
    binary = all(v in (0.0, 1.0) for v in b)
    for n in range(len(a) + 1):
        lo, hi = difference_bounds(x[:n], y[:n], len(a), 0.0, binary)
        assert lo - 1e-12 <= truth <= hi + 1e-12
        assert hi - lo == pytest.approx(2 * (len(a) - n) / len(a), abs=1e-12)
    assert difference_bounds(x, y, len(a), 0.2, binary) == pytest.approx((truth, truth))


@pytest.mark.parametrize("kind", ["binary", "paired", "continuous"])
@pytest.mark.parametrize("delta", [0.05, 0.2])
def test_bounds_hold_at_least_as_often_as_promised(kind, delta):
    """Random score streams: populations of 120 items (candidates of random skill; pairs that
    agree on most items, as similar candidates do), 400 seeded orders each, every prefix
    length checked: each one-sided bound misses full evaluation's mean at most delta of the
    time (plus three binomial standard errors)."""
    rng = np.random.default_rng(7)
    checks = misses_up = misses_low = 0
    for _ in range(6):
        p = rng.uniform(0.05, 0.95)
        x = (rng.random(120) < p).astype(float)
        if kind == "paired":
            y = np.where(rng.random(120) < 0.8, x, (rng.random(120) < p).astype(float))
        elif kind == "continuous":
            x = np.clip(rng.beta(2, 2, 120) * p * 2, 0, 1)
            y = np.zeros(120)
        else:
            y = np.zeros(120)
        truth = x.mean() - y.mean()
        for _ in range(400):
            order = rng.permutation(120)
            n = int(rng.integers(5, 115))
            xs, ys = x[order[:n]], y[order[:n]]
            if kind == "continuous":
                lo, hi = mean_bounds(xs, 120, 0.0, 1.0, delta)
            else:
                lo, hi = difference_bounds(xs, ys, 120, delta, binary=True)
            checks += 1
            misses_up += hi < truth - 1e-12
            misses_low += lo > truth + 1e-12
    slack = 3 * math.sqrt(delta * (1 - delta) / checks)
    assert misses_up / checks <= delta + slack
    assert misses_low / checks <= delta + slack


def test_bounds_tighten_with_items_and_confidence():
    up = [ones_upper(k, n, 300, 0.05) for k, n in ((3, 30), (10, 100), (30, 300))]
    assert up[0] > up[1] > up[2] == 30
    assert ones_upper(10, 100, 300, 0.001) > ones_upper(10, 100, 300, 0.1)
    r = [serfling_radius(0.3, n, 300, 1.0, 0.05) for n in (10, 100, 299)]
    assert r[0] > r[1] > r[2] > 0 and serfling_radius(0.3, 300, 300, 1.0, 0.05) == 0
    assert serfling_radius(0.3, 10, 300, 1.0, 0.0) == math.inf


def test_chunks_take_every_task_in_proportion():
    fractions = chunk_fractions(0.1, 10)
    assert fractions[0] == 0.1 and fractions[-1] == 1.0 and len(fractions) == 10
    for total in (0, 1, 7, 100, 333):
        ends = chunk_ends(total, fractions)
        assert ends[-1] == total and ends == sorted(ends)
        assert all(abs(e - total * q) <= 1 for e, q in zip(ends[:-1], fractions, strict=False))
    assert chunk_fractions(0.5, 1) == (1.0,) and chunk_fractions(1.0, 5) == (1.0,)


@settings(max_examples=25, deadline=None)
@given(
    population=st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=20, max_size=120),
    pair=st.lists(st.sampled_from([0.0, 1.0]), min_size=120, max_size=120),
    share=st.floats(0.05, 0.95),
    delta=st.sampled_from([0.05, 0.2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_score_streams_are_covered_as_often_as_promised(
    population, pair, share, delta, seed
):
    """Any population of graded scores (Bernstein-Serfling) and any paired 0/1 population
    (hypergeometric): over 300 seeded orders scored to a prefix, each one-sided bound misses
    full evaluation's mean (or difference) at most delta of the time, plus four binomial
    standard errors of the estimate."""
    rng = np.random.default_rng(seed)
    x = np.asarray(population)
    a, b = np.asarray(pair[: len(x)]), np.asarray(pair[::-1][: len(x)])
    n = max(1, int(share * len(x)))
    trials, misses = 300, np.zeros(4)
    for _ in range(trials):
        order = rng.permutation(len(x))[:n]
        lo, hi = mean_bounds(x[order], len(x), 0.0, 1.0, delta)
        dlo, dhi = difference_bounds(a[order], b[order], len(x), delta, binary=True)
        misses += [
            hi < x.mean() - 1e-12,
            lo > x.mean() + 1e-12,
            dhi < a.mean() - b.mean() - 1e-12,
            dlo > a.mean() - b.mean() + 1e-12,
        ]
    slack = 4 * math.sqrt(delta * (1 - delta) / trials)
    assert (misses / trials <= delta + slack).all()

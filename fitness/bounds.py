"""Confidence bounds on a full evaluation's mean from a prefix of its items (racing).

A prefix of a seeded order is a sample WITHOUT replacement of the N items, so each bound is on a
finite population's mean: the hard bound (the unscored items lie in [lo, hi]; alone at
`delta = 0`) intersected with one failing w.p. at most `delta`, one-sided. For 0/1 scores, the
exact hypergeometric bound (a paired difference through its two discordance counts, each at
`delta / 2`); otherwise the better of Hoeffding-Serfling and empirical Bernstein-Serfling
(Bardenet & Maillard 2015, Bernoulli 21(3), Cor. 2.5 and Thm. 3.5), each at `delta / 2`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

KAPPA = 7 / 3 + 3 / math.sqrt(2)  # Bardenet & Maillard's empirical Bernstein-Serfling constant


@lru_cache(maxsize=64)
def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=float)))])


def _log_choose(lf: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ok = (b >= 0) & (b <= a)
    a_, b_ = np.where(ok, a, 0), np.where(ok, b, 0)
    return np.where(ok, lf[a_] - lf[b_] - lf[a_ - b_], -np.inf)


def _cdf_over_population(k: int, n: int, population: int, ones: np.ndarray) -> np.ndarray:
    """P(X <= k) for X ~ Hypergeometric(population, ones, n), for each count of `ones`."""
    lf = _log_factorials(population)
    x = np.arange(k + 1)[None, :]
    big = ones[:, None]
    logp = (
        _log_choose(lf, big, x)
        + _log_choose(lf, population - big, n - x)
        - _log_choose(lf, np.array(population), np.array(n))
    )
    top = logp.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.minimum(1.0, np.exp(top[:, 0]) * np.exp(logp - top).sum(axis=1))


@lru_cache(maxsize=1 << 16)
def ones_upper(k: int, n: int, population: int, delta: float) -> int:
    """The largest count of ones in the population that `k` ones in `n` draws without
    replacement do not reject at level `delta` (one-sided): P(ones > it) <= delta."""
    hard = k + population - n
    if delta <= 0 or n == population:
        return hard
    if k == n:  # seen no zero: every count up to the hard bound is consistent
        return hard
    candidates = np.arange(k, hard + 1)
    cdf = _cdf_over_population(k, n, population, candidates)
    keep = candidates[cdf > delta]
    return int(keep.max()) if len(keep) else k


def ones_lower(k: int, n: int, population: int, delta: float) -> int:
    """The smallest count of ones consistent with `k` of `n` at level `delta` (one-sided)."""
    return population - ones_upper(n - k, n, population, delta)


def binary_mean(k: int, n: int, population: int, delta: float) -> tuple[float, float]:
    """Bounds on the population mean of 0/1 scores, `k` ones seen in `n` (each side `delta`)."""
    return (
        ones_lower(k, n, population, delta) / population,
        ones_upper(k, n, population, delta) / population,
    )


def serfling_radius(std: float, n: int, population: int, width: float, delta: float) -> float:
    """How far the population mean may lie above (or below) the sample mean of `n` draws
    without replacement, with probability >= 1 - delta: the smaller of Hoeffding-Serfling and
    empirical Bernstein-Serfling, each at delta / 2. `std`: the sample's standard deviation
    (the 1/n one), `width`: the range of a value."""
    if delta <= 0 or n == 0:
        return math.inf
    if n >= population:
        return 0.0
    rho = 1 - (n - 1) / population if n <= population / 2 else (1 - n / population) * (1 + 1 / n)
    log_h = math.log(2 / delta)  # Hoeffding-Serfling at delta / 2
    hoeffding = width * math.sqrt(rho * log_h / (2 * n))
    log_b = math.log(5 * 2 / delta)  # Thm 3.5 holds with probability 1 - 5 delta'
    bernstein = std * math.sqrt(2 * rho * log_b / n) + KAPPA * width * log_b / n
    return min(hoeffding, bernstein)


def mean_bounds(
    values: Sequence[float], population: int, lo: float, hi: float, delta: float
) -> tuple[float, float]:
    """Bounds on the mean of a population of `population` values in [lo, hi], of which
    `values` are a uniform sample without replacement (each side holds w.p. >= 1 - delta)."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    total = float(v.sum())
    hard = (
        (total + (population - n) * lo) / population,
        (total + (population - n) * hi) / population,
    )
    if n == 0:
        return hard
    r = serfling_radius(float(v.std()), n, population, hi - lo, delta)
    m = total / n
    return max(hard[0], m - r), min(hard[1], m + r)


def difference_bounds(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    population: int,
    delta: float,
    binary: bool,
) -> tuple[float, float]:
    """Bounds on mean(x) - mean(y) over the population, from both candidates' scores on the same
    prefix of items (paired: common random numbers). Each side holds w.p. >= 1 - delta."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(xa)
    if binary:
        wins, losses = int(((xa == 1) & (ya == 0)).sum()), int(((xa == 0) & (ya == 1)).sum())
        half = delta / 2
        upper = ones_upper(wins, n, population, half) - ones_lower(losses, n, population, half)
        lower = ones_lower(wins, n, population, half) - ones_upper(losses, n, population, half)
        rest = population - n  # the hard bound: each unscored item moves the sum by at most 1
        upper = min(upper, wins - losses + rest)
        lower = max(lower, wins - losses - rest)
        return lower / population, upper / population
    return mean_bounds(xa - ya, population, -1.0, 1.0, delta)


def chunk_fractions(first: float, chunks: int) -> tuple[float, ...]:
    """Cumulative fractions of every task's items after each chunk: a first chunk of `first`,
    then the rest in equal chunks (`chunks` in all; the last ends at 1)."""
    if chunks <= 1 or first >= 1:
        return (1.0,)
    step = (1 - first) / (chunks - 1)
    return tuple(first + step * c for c in range(chunks - 1)) + (1.0,)


def chunk_ends(total: int, fractions: Sequence[float], batch: int = 1) -> list[int]:
    """How many of a task's `total` items are scored after each chunk: every chunk takes its
    share of every task, rounded to whole `batch`es (a partial batch costs a whole one's time;
    a chunk may then be empty), at least one item (one batch) in the first."""
    ends = [
        min(total, max(min(total, batch), batch * round(total * q / batch))) for q in fractions[:-1]
    ]
    ends.append(total)
    for c in range(1, len(ends)):
        ends[c] = max(ends[c], ends[c - 1])
    return ends


def piece(n: int, j: int, k: int) -> tuple[int, int]:
    """Piece j of k of a chunk of n items: contiguous, so the pieces in order are the chunk."""
    return j * n // k, (j + 1) * n // k

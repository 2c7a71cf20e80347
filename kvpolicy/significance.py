"""Significance of paired differences: a paired permutation test and Holm's correction over a family of them.

`paired_permutation_p` tests the same statistic the paired intervals of kvpolicy.intervals are of, on the same pairs:
transform(Σ a_num / Σ a_den) − transform(Σ b_num / Σ b_den) over n samples that both methods were evaluated on. Under
the null hypothesis that the two methods are interchangeable on every sample, swapping the values of a and b within
any subset of the pairs (a sign flip of each sample's contribution) leaves the statistic's distribution unchanged, so
the two-sided p-value is the share of the 2^n swap patterns whose |statistic| is at least the observed one (Fisher's
randomization test; Good, "Permutation, Parametric, and Bootstrap Tests of Hypotheses", 2005, ch. 3). It is exact
whatever n, where a bootstrap p-value relies on n being large: all 2^n patterns are enumerated while 2^n ≤
`permutations`, beyond that `permutations` seeded random patterns give p = (1 + hits) / (1 + permutations), never 0
(Phipson & Smyth, "Permutation P-values Should Never Be Zero", 2010).

`holm_survivors` applies Holm's step-down correction ("A Simple Sequentially Rejective Multiple Test Procedure",
1979), which bounds the chance of any false claim among the family's m tests by alpha: with the p-values in increasing
order, the k-th (from 1) is rejected while it and every smaller one satisfy p ≤ alpha / (m − k + 1).

Each fast function has a slow `*_reference` beside it that follows the definition one pattern or one test at a time.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np

from kvpolicy.intervals import Ratio, Transform, pooled_ratio, ratio_of_sums, sample_columns

ALPHA = 0.05
PERMUTATIONS = 20_000  # random swap patterns beyond exact enumeration: p >= 1 / 20,001, enough for 1,000 tests
_TIES = 1e-9  # relative: a pattern's |statistic| within this of the observed one counts as at least as extreme


def paired_permutation_p(a: Ratio, b: Ratio, transform: Transform | None = None, permutations: int = PERMUTATIONS,
                         seed: int = 0) -> float | None:
    """Two-sided p-value of the paired permutation test of transform(Σ a_num / Σ a_den) − transform(Σ b_num /
    Σ b_den) over n paired samples (a and b: (n,) numerators and denominators each); 1 for identical methods, None
    for n < 2. Exact (all 2^n swap patterns) while 2^n ≤ permutations, else Monte Carlo over seeded patterns."""
    num_a, den_a, num_b, den_b = sample_columns(*a, *b)
    n = len(num_a)
    _check(permutations)
    if n < 2:
        return None
    exact = 2**n <= permutations
    swaps = _swap_patterns(n, permutations, seed)
    moved_num, moved_den = swaps @ (num_b - num_a), swaps @ (den_b - den_a)  # (patterns,) what the swaps move
    stats = (ratio_of_sums(num_a.sum() + moved_num, den_a.sum() + moved_den, transform)
             - ratio_of_sums(num_b.sum() - moved_num, den_b.sum() - moved_den, transform))
    observed = pooled_ratio(num_a, den_a, transform) - pooled_ratio(num_b, den_b, transform)
    hits = int(np.count_nonzero(np.abs(stats) >= abs(observed) * (1 - _TIES)))
    return hits / len(swaps) if exact else (1 + hits) / (1 + permutations)


def paired_permutation_p_reference(a: Ratio, b: Ratio, transform: Transform | None = None,
                                   permutations: int = PERMUTATIONS, seed: int = 0) -> float | None:
    """Slow reference for `paired_permutation_p`: each swap pattern's pair of pooled ratios written out, the
    patterns from itertools.product when exact, else the same seeded patterns as the fast one, drawn row by row."""
    pairs = list(zip(*a, *b))  # (num_a, den_a, num_b, den_b) of each sample
    n = len(pairs)
    _check(permutations)
    if n < 2:
        return None

    def statistic(swaps: Sequence[int]) -> float:
        mine = [(nb, db) if s else (na, da) for s, (na, da, nb, db) in zip(swaps, pairs)]
        theirs = [(na, da) if s else (nb, db) for s, (na, da, nb, db) in zip(swaps, pairs)]
        return float(_ratio(mine, transform) - _ratio(theirs, transform))

    observed = abs(statistic([0] * n))
    if 2**n <= permutations:
        patterns = [list(p) for p in itertools.product((0, 1), repeat=n)]
    else:
        rng = np.random.default_rng(seed)
        patterns = [rng.integers(0, 2, size=n).tolist() for _ in range(permutations)]
    hits = sum(abs(statistic(p)) >= observed * (1 - _TIES) for p in patterns)
    return hits / len(patterns) if 2**n <= permutations else (1 + hits) / (1 + permutations)


def holm_survivors(p_values: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Which of a family's m tests Holm's step-down correction rejects at family-wise level alpha, in the order
    given: sorted increasingly, the k-th p-value (from 1) survives if it and every smaller one are ≤ alpha divided
    by the number of p-values from it on (m − k + 1)."""
    p = np.asarray(p_values, dtype=np.float64)
    _check_family(p, alpha)
    order = np.argsort(p, kind="stable")
    passes = p[order] <= alpha / (len(p) - np.arange(len(p)))  # (m,) each sorted p against its own threshold
    survives = np.empty(len(p), dtype=bool)
    survives[order] = np.logical_and.accumulate(passes)  # step-down: the first failure stops every later one
    return survives.tolist()


def holm_survivors_reference(p_values: Sequence[float], alpha: float = ALPHA) -> list[bool]:
    """Slow reference for `holm_survivors`, as Holm (1979) states it: test the hypotheses from the smallest p-value
    up, the k-th of m against alpha / (m − k + 1), and stop at the first one not rejected."""
    p = [float(v) for v in p_values]
    _check_family(np.asarray(p), alpha)
    survives = [False] * len(p)
    for k, i in enumerate(sorted(range(len(p)), key=lambda j: p[j])):
        if p[i] > alpha / (len(p) - k):
            break
        survives[i] = True
    return survives


@functools.lru_cache(maxsize=4)
def _swap_patterns(n: int, permutations: int, seed: int) -> np.ndarray:
    """(patterns, n) 0/1 floats, 1 = swap sample i: all 2^n patterns while 2^n <= permutations, else `permutations`
    seeded ones. Cached, read-only: a report tests hundreds of comparisons of the same n with the same seed."""
    if 2**n <= permutations:
        swaps = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # bit i of the pattern's number swaps sample i
    else:
        swaps = np.random.default_rng(seed).integers(0, 2, size=(permutations, n))
    swaps = swaps.astype(np.float64)
    swaps.flags.writeable = False
    return swaps


def _ratio(terms: list[tuple[float, float]], transform: Transform | None) -> float:
    """transform(Σ num / Σ den) of (num, den) terms, summed one by one."""
    num, den = sum(float(num) for num, _ in terms), sum(float(den) for _, den in terms)
    return float(ratio_of_sums(np.float64(num), np.float64(den), transform))


def _check(permutations: int) -> None:
    if permutations < 1:
        raise ValueError(f"permutations must be at least 1, got {permutations}")


def _check_family(p: np.ndarray, alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p-values must be a 1-D sequence of values in [0, 1]")

"""Paired permutation p-values and Holm's correction: the fast ones equal their definitions (exact enumeration,
Holm's step-down as he states it), match textbook examples, and are deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvpolicy.significance import (
    holm_survivors,
    holm_survivors_reference,
    paired_permutation_p,
    paired_permutation_p_reference,
)


def _ones(n: int) -> np.ndarray:
    return np.ones(n)


@pytest.mark.parametrize("n", [2, 3, 5, 9, 12])
@pytest.mark.parametrize("seed", [0, 4])
def test_exact_enumeration_equals_the_reference_to_the_last_bit(n, seed):
    """0/1 scores, eighths and whole token counts add up exactly in any order, so every pattern's statistic, and so
    the p-value, is the same in the vectorized test and in the one written out pattern by pattern."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2, size=n).astype(float), rng.integers(0, 2, size=n).astype(float)
    nll_a, nll_b = rng.integers(0, 800, size=n) / 8, rng.integers(0, 800, size=n) / 8
    tokens = rng.integers(1, 50, size=n).astype(float)
    for x, y, den, transform in ((a, b, _ones(n), None), (nll_a, nll_b, tokens, np.exp)):
        fast = paired_permutation_p((x, den), (y, den), transform)
        assert fast == paired_permutation_p_reference((x, den), (y, den), transform)
        assert fast * 2**n == pytest.approx(round(fast * 2**n))  # a share of the 2^n patterns


def test_monte_carlo_equals_the_reference_drawing_the_same_patterns():
    rng = np.random.default_rng(1)
    nll_a, nll_b = rng.integers(0, 800, size=20) / 8, rng.integers(0, 800, size=20) / 8
    tokens = rng.integers(1, 50, size=20).astype(float)
    for permutations in (50, 999):
        fast = paired_permutation_p((nll_a, tokens), (nll_b, tokens), np.exp, permutations=permutations, seed=3)
        assert fast == paired_permutation_p_reference((nll_a, tokens), (nll_b, tokens), np.exp,
                                                      permutations=permutations, seed=3)
        assert fast * (1 + permutations) == pytest.approx(round(fast * (1 + permutations)))


def test_sign_test_by_hand():
    """Scores: only discordant pairs move under a swap, so the test is the exact two-sided sign test on them."""
    a = [1.0] * 7 + [0.0] * 3
    b = [0.0] * 7 + [0.0] * 3  # 7 discordant pairs, all for a; 3 ties
    p = paired_permutation_p((a, _ones(10)), (b, _ones(10)))
    assert p == pytest.approx(2 / 2**7)  # all 7 for a or all 7 for b
    mixed = [1.0] * 6 + [0.0] + [0.0] * 3, [0.0] * 6 + [1.0] + [0.0] * 3  # 6 of 7 discordant pairs for a
    p = paired_permutation_p((mixed[0], _ones(10)), (mixed[1], _ones(10)))
    assert p == pytest.approx(2 * (1 + 7) / 2**7)  # 7 or 6 of the 7 for one side, either side


def test_identical_methods_give_one_and_a_monte_carlo_p_is_never_zero():
    rng = np.random.default_rng(2)
    x, den = rng.normal(size=40), rng.uniform(1, 2, size=40)
    assert paired_permutation_p((x, den), (x, den)) == 1.0
    far = paired_permutation_p((x + 10, _ones(40)), (x, _ones(40)), permutations=999)
    assert far == 1 / 1000  # no random pattern is as extreme as the observed one, and the observed counts


def test_deterministic_and_seeded():
    rng = np.random.default_rng(5)
    a, b, den = rng.normal(size=30), rng.normal(size=30), _ones(30)
    first = paired_permutation_p((a, den), (b, den), permutations=500)
    assert first == paired_permutation_p((a, den), (b, den), permutations=500)
    assert any(paired_permutation_p((a, den), (b, den), permutations=500, seed=s) != first for s in (1, 2))


def test_monte_carlo_agrees_with_the_exact_p_within_its_error():
    rng = np.random.default_rng(6)
    a, b, den = rng.normal(0.3, 1, size=14), rng.normal(size=14), _ones(14)
    exact = paired_permutation_p((a, den), (b, den), permutations=2**14)
    sampled = paired_permutation_p((a, den), (b, den), permutations=2**14 - 1)  # one short: Monte Carlo
    assert abs(sampled - exact) < 4 * math.sqrt(exact * (1 - exact) / 2**14) + 1e-4


def test_fewer_than_two_pairs_and_bad_arguments():
    assert paired_permutation_p(([1.0], [1.0]), ([0.0], [1.0])) is None
    with pytest.raises(ValueError, match="one length"):
        paired_permutation_p(([1.0, 0.0], [1.0]), ([0.0, 1.0], [1.0, 1.0]))
    with pytest.raises(ValueError, match="permutations"):
        paired_permutation_p(([1.0, 0.0], [1.0, 1.0]), ([0.0, 1.0], [1.0, 1.0]), permutations=0)
    with pytest.raises(ValueError, match="alpha"):
        holm_survivors([0.1], alpha=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm_survivors([0.1, 1.5])


@pytest.mark.parametrize(("p", "alpha", "expected"), [
    # Wikipedia, "Holm–Bonferroni method", example: 0.005 ≤ 0.05/4, 0.01 ≤ 0.05/3, then 0.03 > 0.05/2 stops
    ([0.01, 0.04, 0.03, 0.005], 0.05, [True, False, False, True]),
    # Holm's adjusted p-values (R: p.adjust(c(.01,.02,.03,.04,.05), "holm")) are .05 .08 .09 .09 .09
    ([0.01, 0.02, 0.03, 0.04, 0.05], 0.05, [True, False, False, False, False]),
    ([0.01, 0.02, 0.03, 0.04, 0.05], 0.08, [True, True, False, False, False]),
    ([0.01, 0.02, 0.03, 0.04, 0.05], 0.09, [True, True, True, True, True]),
    # the step-down stops at the first failure even though a later p would pass its own threshold
    ([0.02, 0.024, 0.04], 0.05, [False, False, False]),
    ([], 0.05, []),
])
def test_holm_textbook_examples(p, alpha, expected):
    assert holm_survivors(p, alpha) == expected == holm_survivors_reference(p, alpha)


def test_holm_equals_its_definition_and_is_between_bonferroni_and_uncorrected():
    rng = np.random.default_rng(7)
    for _ in range(300):
        m = int(rng.integers(1, 30))
        p = np.round(rng.uniform(0, 0.1, size=m) ** 2, 4)  # small, with ties
        alpha = float(rng.choice([0.01, 0.05, 0.1]))
        survives = holm_survivors(p, alpha)
        assert survives == holm_survivors_reference(p, alpha)
        assert all(s >= (v <= alpha / m) for s, v in zip(survives, p))  # at least Bonferroni's
        assert all(v <= alpha for s, v in zip(survives, p) if s)  # at most the uncorrected tests'

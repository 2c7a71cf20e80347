"""Bootstrap intervals: the vectorized resampler equals its one-resample-at-a-time reference, is deterministic, covers
what it should, and pairs samples."""

from __future__ import annotations

import numpy as np
import pytest

from kvpolicy.intervals import (
    bootstrap_ci,
    bootstrap_ci_reference,
    bootstrap_ratio_ci,
    bootstrap_ratio_ci_reference,
    paired_difference_ci,
    paired_difference_ci_reference,
    paired_ratio_difference_ci,
    paired_ratio_difference_ci_reference,
    pooled_ratio,
)


def percent(ratio: np.ndarray) -> np.ndarray:
    return 100.0 * ratio


def _all_four(a, b, tokens, transform, **kw):
    """(fast, reference) intervals of every function on the same samples."""
    return [
        (bootstrap_ci(a, **kw), bootstrap_ci_reference(a, **kw)),
        (bootstrap_ratio_ci(a, tokens, transform, **kw), bootstrap_ratio_ci_reference(a, tokens, transform, **kw)),
        (paired_difference_ci(a, b, **kw), paired_difference_ci_reference(a, b, **kw)),
        (paired_ratio_difference_ci((a, tokens), (b, tokens), transform, **kw),
         paired_ratio_difference_ci_reference((a, tokens), (b, tokens), transform, **kw)),
    ]


@pytest.mark.parametrize("n", [2, 3, 17, 64])
@pytest.mark.parametrize("seed", [0, 7])
def test_fast_equals_reference_exactly_where_sums_are_exact(n, seed):
    """0/1 scores, eighths and whole token counts add up exactly in any order, so the fast and the slow
    statistics are equal to the last bit: the same indices, resample by resample, and the same percentiles."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 2, size=n).astype(float)
    eighths = rng.integers(0, 80, size=n) / 8
    tokens = rng.integers(1, 50, size=n).astype(float)
    for fast, reference in _all_four(scores, eighths, tokens, percent, resamples=500, seed=seed):
        assert fast == reference
    for fast, reference in _all_four(eighths, scores, tokens, None, level=0.8, resamples=300, seed=seed + 1):
        assert fast == reference


def test_fast_equals_reference_on_any_values_up_to_summation_order():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=41), rng.normal(size=41)
    nll, tokens = rng.uniform(10, 90, size=41), rng.integers(5, 40, size=41).astype(float)
    for fast, reference in _all_four(a, b, tokens, None) + _all_four(nll, nll[::-1], tokens, np.exp):
        assert fast == pytest.approx(reference, rel=1e-12, abs=1e-12)


def test_seeded_and_deterministic():
    values = np.random.default_rng(0).normal(size=30)
    assert bootstrap_ci(values) == bootstrap_ci(values) == bootstrap_ci(values, seed=0)
    assert bootstrap_ci(values, seed=1) != bootstrap_ci(values)


def test_fewer_than_two_samples_have_no_interval():
    for values in ([], [1.0]):
        assert bootstrap_ci(values) is None and bootstrap_ci_reference(values) is None
        assert bootstrap_ratio_ci(values, values) is None and paired_difference_ci(values, values) is None
        assert paired_ratio_difference_ci((values, values), (values, values)) is None
    assert bootstrap_ci([1.0, 1.0]) == (1.0, 1.0)


def test_interval_of_a_large_normal_sample_holds_the_true_mean_with_the_normal_width():
    values = np.random.default_rng(1).normal(3.0, 2.0, size=4000)
    lo, hi = bootstrap_ci(values)
    assert lo < 3.0 < hi and lo < values.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(4000), rel=0.1)
    narrow = bootstrap_ci(values, level=0.5)
    assert lo < narrow[0] < narrow[1] < hi


def test_coverage_over_repeated_small_samples_is_near_the_level():
    rng = np.random.default_rng(2)
    trials = 200
    hits = 0
    for seed in range(trials):
        lo, hi = bootstrap_ci(rng.exponential(1.0, size=40), resamples=500, seed=seed)
        hits += lo <= 1.0 <= hi
    assert 0.85 <= hits / trials <= 0.99  # the percentile bootstrap undercovers a little on a skewed distribution


def test_pooled_ratio_interval_is_of_the_pooled_statistic():
    nll = np.array([20.0, 90.0, 33.0, 41.0, 60.0])
    tokens = np.array([10.0, 30.0, 11.0, 20.0, 25.0])
    ppl = pooled_ratio(nll, tokens, np.exp)
    assert ppl == pytest.approx(np.exp(nll.sum() / tokens.sum()))
    lo, hi = bootstrap_ratio_ci(nll, tokens, np.exp)
    assert lo < ppl < hi
    assert bootstrap_ratio_ci(2.0 * tokens, tokens, np.exp) == pytest.approx((np.exp(2.0), np.exp(2.0)))


def test_paired_interval_of_identical_methods_is_zero():
    values = np.random.default_rng(4).random(25)
    tokens = np.arange(1.0, 26.0)
    assert paired_difference_ci(values, values) == (0.0, 0.0)
    assert paired_ratio_difference_ci((values, tokens), (values, tokens), np.exp) == (0.0, 0.0)


def test_pairing_cancels_what_a_sample_adds_to_both_methods():
    """b is a plus 0.1 on every sample, and the samples differ far more than that: the methods' own intervals
    overlap, the paired difference is exactly −0.1."""
    rng = np.random.default_rng(5)
    a = rng.normal(0.0, 1.0, size=50)
    b = a + 0.1
    own_a, own_b = bootstrap_ci(a), bootstrap_ci(b)
    assert own_a[0] < own_b[1] and own_b[0] < own_a[1]
    assert paired_difference_ci(a, b) == pytest.approx((-0.1, -0.1))


def test_unequal_lengths_and_bad_levels_are_refused():
    with pytest.raises(ValueError, match="one length"):
        paired_difference_ci([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="one length"):
        bootstrap_ratio_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="one length"):
        paired_ratio_difference_ci(([1.0, 2.0], [1.0, 1.0]), ([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([1.0, 2.0], resamples=0)

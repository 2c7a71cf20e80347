"""Percentile bootstrap confidence intervals over samples: seeded, so a report's intervals are reproducible.

A statistic of n samples is recomputed on `resamples` resamples of the samples drawn with replacement, and its
interval is the (1 − level)/2 and (1 + level)/2 percentiles of those values (Efron & Tibshirani, "An Introduction
to the Bootstrap", 1993, ch. 13). Every statistic here is a pooled ratio transform(Σ num / Σ den) over the samples
of a resample, or a difference of two such ratios on the same resample (paired samples):

- `bootstrap_ci`: the mean of per-sample values (num = values, den = 1), e.g. a score;
- `bootstrap_ratio_ci`: a pooled statistic: perplexity exp(Σ nll / Σ tokens), cost Σ lost / Σ oracle's lost;
- `paired_difference_ci`, `paired_ratio_difference_ci`: method a minus method b, both resampled with the same
  indices, so what a sample's difficulty adds to both cancels.

One vectorized resampler (`_interval`) serves all four; each has a slow `*_reference` beside it that draws the same
indices one resample at a time from the same seeded generator and writes its statistic out in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
_TINY = 1e-12  # floor of a resample's summed denominators (cost: an oracle that loses nothing), as the point's

Interval = tuple[float, float]
Transform = Callable[[np.ndarray], np.ndarray]  # elementwise, from a pooled ratio to the statistic's units
Ratio = tuple[Sequence[float], Sequence[float]]  # per-sample numerators and denominators, (n,) each


def pooled_ratio(numerators: Sequence[float], denominators: Sequence[float], transform: Transform | None = None
                 ) -> float:
    """The statistic the ratio intervals are of: transform(Σ num / Σ den) over the (n,) per-sample values."""
    num, den = sample_columns(numerators, denominators)
    return float(_pooled(num, den, transform))


def bootstrap_ci(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
                 ) -> Interval | None:
    """Percentile bootstrap interval of the mean of (n,) per-sample values, in their units; None for n < 2."""
    (x,) = sample_columns(values)
    return _interval([(x, np.ones_like(x))], None, level, resamples, seed)


def bootstrap_ci_reference(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
                           ) -> Interval | None:
    """Slow reference for `bootstrap_ci`: each resample's mean, one resample at a time."""
    x = [float(v) for v in values]
    return _interval_reference(lambda row: sum(x[i] for i in row) / len(row), len(x), level, resamples, seed)


def bootstrap_ratio_ci(numerators: Sequence[float], denominators: Sequence[float], transform: Transform | None = None,
                       level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval | None:
    """Percentile bootstrap interval of transform(Σ num / Σ den) over (n,) per-sample numerators and denominators,
    resampling samples (both values of a sample together), in the transform's units; None for n < 2."""
    return _interval([sample_columns(numerators, denominators)], transform, level, resamples, seed)


def bootstrap_ratio_ci_reference(numerators: Sequence[float], denominators: Sequence[float],
                                 transform: Transform | None = None, level: float = LEVEL,
                                 resamples: int = RESAMPLES, seed: int = 0) -> Interval | None:
    """Slow reference for `bootstrap_ratio_ci`: each resample's pooled ratio, one resample at a time."""
    ratio = _ratio_reference((numerators, denominators), transform)
    return _interval_reference(ratio, len(numerators), level, resamples, seed)


def paired_difference_ci(a: Sequence[float], b: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                         seed: int = 0) -> Interval | None:
    """Percentile bootstrap interval of the mean of a − b over (n,) paired per-sample values (sample i of a and of b
    are the same sample, resampled together); [0, 0] for identical methods, None for n < 2."""
    x, y = sample_columns(a, b)
    ones = np.ones_like(x)
    return _interval([(x, ones), (y, ones)], None, level, resamples, seed)


def paired_difference_ci_reference(a: Sequence[float], b: Sequence[float], level: float = LEVEL,
                                   resamples: int = RESAMPLES, seed: int = 0) -> Interval | None:
    """Slow reference for `paired_difference_ci`: each resample's mean of a minus its mean of b."""
    x, y = [float(v) for v in a], [float(v) for v in b]
    return _interval_reference(lambda row: sum(x[i] for i in row) / len(row) - sum(y[i] for i in row) / len(row),
                               len(x), level, resamples, seed)


def paired_ratio_difference_ci(a: Ratio, b: Ratio, transform: Transform | None = None, level: float = LEVEL,
                               resamples: int = RESAMPLES, seed: int = 0) -> Interval | None:
    """Percentile bootstrap interval of transform(Σ a_num / Σ a_den) − transform(Σ b_num / Σ b_den) over n paired
    samples (a and b: (n,) numerators and denominators each, sample i of both the same sample); in the transform's
    units (a perplexity or cost difference); [0, 0] for identical methods, None for n < 2."""
    num_a, den_a, num_b, den_b = sample_columns(*a, *b)
    return _interval([(num_a, den_a), (num_b, den_b)], transform, level, resamples, seed)


def paired_ratio_difference_ci_reference(a: Ratio, b: Ratio, transform: Transform | None = None,
                                         level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
                                         ) -> Interval | None:
    """Slow reference for `paired_ratio_difference_ci`: each resample's ratio of a minus its ratio of b."""
    ratio_a, ratio_b = _ratio_reference(a, transform), _ratio_reference(b, transform)
    return _interval_reference(lambda row: ratio_a(row) - ratio_b(row), len(a[0]), level, resamples, seed)


def sample_columns(*arrays: Sequence[float]) -> list[np.ndarray]:
    """The per-sample sequences as (n,) float64 arrays, refused unless they are 1-D and of one length."""
    columns = [np.asarray(a, dtype=np.float64) for a in arrays]
    shapes = {c.shape for c in columns}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"per-sample values must be 1-D sequences of one length, got shapes {sorted(shapes)}")
    return columns


def ratio_of_sums(num_sum: np.ndarray, den_sum: np.ndarray, transform: Transform | None = None) -> np.ndarray:
    """transform(Σ num / Σ den) from sums of any shape, the denominators floored at a tiny positive value."""
    ratio = num_sum / np.maximum(den_sum, _TINY)
    return ratio if transform is None else transform(ratio)


def _pooled(num: np.ndarray, den: np.ndarray, transform: Transform | None) -> np.ndarray:
    """transform(Σ num / Σ den) over the last axis: (..., n) -> (...)."""
    return ratio_of_sums(num.sum(-1), den.sum(-1), transform)


def _interval(terms: Sequence[Sequence[np.ndarray]], transform: Transform | None, level: float, resamples: int,
              seed: int) -> Interval | None:
    """The interval of the first term's pooled ratio, minus the second's when there are two (a paired difference):
    terms are (num, den) pairs of (n,) arrays over the same n samples, all resampled with one (resamples, n) index
    matrix. None for n < 2."""
    n = len(terms[0][0])
    _check(level, resamples)
    if n < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    stats = [_pooled(num[idx], den[idx], transform) for num, den in terms]  # (resamples,) each
    return _percentiles(stats[0] - stats[1] if len(stats) == 2 else stats[0], level)


def _ratio_reference(ratio: Ratio, transform: Transform | None) -> Callable[[list[int]], float]:
    """The pooled ratio of one resample (its sample indices), written out."""
    num, den = [float(v) for v in ratio[0]], [float(v) for v in ratio[1]]
    apply = transform or (lambda r: r)

    def of(row: list[int]) -> float:
        return float(apply(sum(num[i] for i in row) / max(sum(den[i] for i in row), _TINY)))

    return of


def _interval_reference(statistic: Callable[[list[int]], float], n: int, level: float, resamples: int,
                        seed: int) -> Interval | None:
    """The interval of `statistic` (of one resample's n sample indices) over resamples drawn one at a time: the
    same indices as `_interval`'s matrix, row by row."""
    _check(level, resamples)
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    stats = [statistic(rng.integers(0, n, size=n).tolist()) for _ in range(resamples)]
    return _percentiles(np.array(stats), level)


def _check(level: float, resamples: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def _percentiles(stats: np.ndarray, level: float) -> Interval:
    """The (1 − level)/2 and (1 + level)/2 quantiles (linear interpolation) of (resamples,) statistics."""
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)

"""What a runner reports for one (sample, scorer, budget): the measurements that become a result record."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kvpolicy.evaluation.lineup import Contender


@dataclass
class Outcome:
    """sample: the sample id; budget: the budget label (FULL for the full-cache reference); length: cache entries
    per head before compression; kept: after; seconds: the time this result took beyond the shared prefill (its
    share of the ranking, the cut, the answer); prefill_seconds: the prefill it shared; fields: the metric's own
    values, named as Result's fields (value, prediction, nll_sum, per_head, ...)."""

    sample: str
    contender: Contender
    budget: str
    length: int
    kept: int
    cache_bytes_full: int
    cache_bytes: int
    seconds: float
    prefill_seconds: float
    fields: dict[str, Any] = field(default_factory=dict)


class Clock:
    """Seconds since the last `lap()`."""

    def __init__(self):
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._t = now - self._t, now
        return elapsed

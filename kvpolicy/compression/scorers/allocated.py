"""Any scorer with the budget moved between heads and layers: `--allocation layer|model`, or `NAME@layer` /
`NAME@model` as a `--scorer` spec.

The wrapped scorer ranks as it always does; what changes is how many entries each head keeps (compression/
allocation.py, `MODES`): every head the budget (`head`, the plain scorer), the heads of a layer one count that
differs between layers (`layer`), or each head its own count from the model's one pool (`model`). The total is
always the uniform cut's, and the sinks and recent tokens stay in every head. Moving budget between heads needs
scores that compare across them (`Scorer.incomparable` says when they do not): attention- and norm-based scores
do, as kvpress's AdaKVPress assumes; KVP's do once a calibration maps each head's ranking scores to its tokens'
predicted log future attention (`kvp calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvpolicy.compression.allocation import MODES, UNIFORM, Allocation
from kvpolicy.compression.names import ALLOCATION_MODES, HEAD
from kvpolicy.compression.scorers.base import LayerView, Scorer
from kvpolicy.errors import KVPError


@dataclass
class Allocated(Scorer):
    """`inner`'s comparable scores, cut with allocation `mode` ("layer" or "model")."""

    inner: Scorer
    mode: str

    def __post_init__(self):
        if self.mode not in ALLOCATION_MODES or self.mode == HEAD:
            raise KVPError(f"allocation mode '{self.mode}' is not one that moves budget; choose one of "
                           f"{', '.join(m for m in ALLOCATION_MODES if m != HEAD)} (or {HEAD}: the plain scorer)")
        if self.inner.allocation is not UNIFORM:
            raise KVPError(f"scorer '{self.inner.name}' already spreads its budget its own way "
                           f"({self.inner.allocation.name}); drop the allocation mode, or give a uniform scorer")
        reason = self.inner.incomparable()
        if reason is not None:
            raise KVPError(f"scorer '{self.inner.name}' cannot move budget between heads ({self.mode} allocation): "
                           f"{reason}")

    # what the wrapped scorer is and needs (its name, the queries it reads, ...) is the inner scorer's
    name = property(lambda self: self.inner.name)
    query_window = property(lambda self: self.inner.query_window)
    reads_text = property(lambda self: self.inner.reads_text)
    whole_prefill = property(lambda self: self.inner.whole_prefill)

    @property
    def allocation(self) -> Allocation:
        return MODES[self.mode]

    def score(self, view: LayerView) -> torch.Tensor:
        return self.inner.comparable_score(view)

    def score_layers(self, views: list[LayerView]) -> list[torch.Tensor]:
        return self.inner.comparable_scores(views)

    def check_model(self, info: Any) -> None:
        self.inner.check_model(info)

    def check_budgets(self, budgets: list[Any]) -> None:
        self.inner.check_budgets(budgets)

    def identity(self) -> dict[str, Any]:
        return {**self.inner.identity(), **self.inner.comparable_identity(), "allocation": self.mode}


def with_allocation(scorer: Scorer, mode: str) -> Scorer:
    """`scorer` cutting with allocation `mode`: itself for "head", else wrapped (`kvp.with_allocation(policy,
    "model")` in the Python API; the same as the spec suffix `@model`)."""
    if mode == HEAD:
        return scorer
    return Allocated(scorer, mode)

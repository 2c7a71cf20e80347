"""Head- and layer-adaptive presses of kvpress: a scorer's ranking with an allocation that moves the budget between
heads (AdaKV, arXiv 2407.11550) or between layers (PyramidKV, arXiv 2406.02069), at the memory of the uniform cut.

The scores are kvpress's own (its ExpectedAttentionPress, SnapKVPress and PyramidKVPress, whose scoring is
SnapKV's); the counts follow kvpress's AdaKVPress and PyramidKVPress (compression/allocation.py). kvpress realizes
AdaKV's head-wise budgets by masking, keeping the whole cache; kvpolicy's engine stores each layer padded to its
largest head count and reports those bytes. Each SnapKV-based row also comes with the window that fits small
budgets (`_w16`), as SnapKV does.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpress import PyramidKVPress, ScorerPress

from kvpolicy.compression.allocation import AdaKV, Allocation, Pyramid
from kvpolicy.compression.scorers.kvpress_backed import ExpectedAttentionScorer, SnapKVFitScorer, SnapKVScorer
from kvpolicy.models.baseline_defaults import SNAPKV_FIT_WINDOW

ADAKV = AdaKV()  # kvpress's default safeguard: each head keeps at least a fifth of its uniform budget


@dataclass
class AdaKVExpectedAttentionScorer(ExpectedAttentionScorer):
    """ExpectedAttention's scores, the budget shared by the heads of each layer (kvpress AdaKVPress)."""

    name = "adakv_expected_attention"
    allocation = ADAKV


@dataclass
class AdaKVSnapKVScorer(SnapKVScorer):
    """SnapKV's scores (window 64), the budget shared by the heads of each layer (kvpress AdaKVPress)."""

    name = "adakv_snapkv"
    allocation = ADAKV


@dataclass
class AdaKVSnapKVFitScorer(SnapKVFitScorer):
    """SnapKV's scores (window 16), the budget shared by the heads of each layer (kvpress AdaKVPress)."""

    name = "adakv_snapkv_w16"
    allocation = ADAKV


@dataclass
class PyramidKVScorer(SnapKVScorer):
    """SnapKV's scores (kvpress PyramidKVPress, window 64), many entries in the first layers and few in the last;
    beta: the pyramid's steepness (kvpress's default 20)."""

    name = "pyramidkv"
    beta: int = 20

    def make_press(self) -> ScorerPress:
        return PyramidKVPress(window_size=self.window_size, kernel_size=self.kernel_size, beta=self.beta)

    @property
    def allocation(self) -> Allocation:
        return Pyramid(window_size=self.window_size, beta=self.beta)


@dataclass
class PyramidKVFitScorer(PyramidKVScorer):
    """PyramidKV with SnapKV's window that fits small budgets (16)."""

    name = "pyramidkv_w16"
    window_size: int = SNAPKV_FIT_WINDOW

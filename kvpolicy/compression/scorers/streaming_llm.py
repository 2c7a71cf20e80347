"""StreamingLLM (Xiao et al. 2023, arXiv 2309.17453) as a ranking: attention sinks first, then newest first.

kvpress's StreamingLLMPress scores depend on the compression ratio; as a budget-agnostic ranking the same rule
is "keep the first n_sink tokens, then the most recent", which cut at any budget gives kvpress's kept set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.compression.scorers.base import LayerView, Scorer


@dataclass
class StreamingLLMScorer(Scorer):
    """Scores (B, H, T): sinks (position < n_sink) above everything, earliest first; then by position."""

    name = "streaming_llm"
    n_sink: int = 4

    def score(self, view: LayerView) -> torch.Tensor:
        pos = view.positions.float()
        above_all = pos.max() + 1 + self.n_sink
        return torch.where(view.positions < self.n_sink, above_all - pos, pos)

"""H2O-style accumulated attention: the mean attention each cached entry received from the recorded queries.

Heavy-Hitter Oracle (Zhang et al. 2023, arXiv 2306.14048) keeps the tokens with the largest accumulated
attention. Like kvpress's ObservedAttentionPress we divide each entry's sum by the number of queries that could
see it (so early tokens are not favoured just for being early) and average over the GQA group. kvpress needs
eager attention for this; we recompute the attention of the recorded queries in blocks instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.compression.scorers.base import ALL_QUERIES, LayerView, Scorer
from kvpolicy.models.attention import causal_window_attention, project_queries


@dataclass
class H2OScorer(Scorer):
    """Mean attention received from every query of the latest chunk (B, H, T); `block` queries at a time."""

    name = "h2o"
    query_window = ALL_QUERIES
    block: int = 256

    def score(self, view: LayerView) -> torch.Tensor:
        B, H, T, _ = view.keys.shape
        W = view.hidden_states.shape[1]
        cos, sin = view.position_embeddings
        total = torch.zeros(B, view.module.config.num_attention_heads, T, dtype=torch.float32, device=view.keys.device)
        for start in range(0, W, self.block):
            rows = slice(start, start + self.block)
            end = min(T, T - W + start + self.block)  # the block's queries are the last rows of keys[:end]
            queries = project_queries(view.module, view.hidden_states[:, rows], (cos[:, rows], sin[:, rows]))
            attn = causal_window_attention(queries, view.keys[:, :, :end], view.module.scaling)  # (B, Hq, w, end)
            total[..., :end] += attn.sum(dim=2)
        seen_by = (T - torch.arange(T, device=total.device)).clamp(max=W)  # queries at cache index >= key index
        return (total / seen_by).view(B, H, -1, T).mean(dim=2)

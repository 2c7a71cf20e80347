"""H2O-style accumulated attention: the mean attention each cached entry received from the recorded queries.

Heavy-Hitter Oracle (Zhang et al. 2023, arXiv 2306.14048) keeps the tokens with the largest accumulated
attention. Like kvpress's ObservedAttentionPress we divide each entry's sum by the number of queries that could
see it (so early tokens are not favoured just for being early) and average over the GQA group. kvpress needs
eager attention for this; we recompute the attention of the recorded queries in blocks instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress.utils import get_prerope_query_states
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from kvpolicy.compression.scorers.base import ALL_QUERIES, LayerView, Scorer


def window_attention(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    offset: int,
) -> torch.Tensor:
    """Causal softmax attention (B, Hq, W, T) of W queries at cache indices offset..offset+W-1 over T keys.

    hidden_states: (B, W, hidden) attention inputs; keys: (B, H, T, d) after RoPE; cos/sin: (B, W, d).
    """
    queries = get_prerope_query_states(module, hidden_states)
    cos, sin = position_embeddings
    queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
    keys = repeat_kv(keys, queries.shape[1] // keys.shape[1])
    logits = queries @ keys.transpose(2, 3) * module.scaling
    query_idx = torch.arange(offset, offset + queries.shape[2], device=keys.device)
    future = torch.arange(keys.shape[2], device=keys.device)[None, :] > query_idx[:, None]
    return logits.masked_fill_(future, float("-inf")).softmax(dim=-1, dtype=torch.float32)


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
            end = min(T, T - W + start + self.block)  # keys after the block's last query get no attention from it
            inputs = view.hidden_states[:, rows], view.keys[:, :, :end], (cos[:, rows], sin[:, rows])
            attn = window_attention(view.module, *inputs, offset=T - W + start)
            total[..., :end] += attn.sum(dim=2)
        seen_by = (T - torch.arange(T, device=total.device)).clamp(max=W)  # queries at cache index >= key index
        return (total / seen_by).view(B, H, -1, T).mean(dim=2)

"""The one interface every eviction method implements: score cached tokens per KV head, higher = keep.

A scorer sees one layer at a time through a `LayerView`. Attention-free scorers (and the learned KVP policy)
read only the cache: keys, values, positions. Attention-based scorers declare `query_window` > 0 and then also
receive the attention module and the inputs to attention (hidden states + RoPE cos/sin) of the most recent
tokens, from which they recompute just the queries they need.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from kvpolicy.models.attention import ALL_QUERIES  # a query_window value: every query of the latest chunk

__all__ = ["ALL_QUERIES", "LayerView", "Scorer"]


@dataclass
class LayerView:
    """One layer's cache as a scorer sees it.

    keys, values: (batch, kv_heads, T, head_dim), keys after RoPE, exactly as stored in the cache.
    positions: (batch, kv_heads, T) int64, the true token position of every cached entry (per head, since
        heads evict different tokens).
    module: the layer's attention module (only for scorers with query_window != 0).
    hidden_states: (batch, W, hidden) inputs to attention of the W most recent tokens, W >= query_window
        (all tokens of the latest forward chunk when query_window == ALL_QUERIES).
    position_embeddings: (cos, sin), each (batch, W, head_dim), RoPE for those W tokens.
    rotary_emb: the model's rotary embedding module (for scorers that rotate queries to future positions).
    """

    layer_idx: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    module: Any = None
    hidden_states: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    rotary_emb: Any = None


@dataclass
class Scorer:
    """Base class: subclasses implement `score`. Scores are budget-agnostic rankings: rank once, cut anywhere."""

    name = "scorer"
    query_window = 0  # 0: attention-free (can run at any time, e.g. during decoding); >0 or ALL_QUERIES: needs queries

    @property
    def attention_free(self) -> bool:
        return self.query_window == 0

    def score(self, view: LayerView) -> torch.Tensor:
        """Scores (batch, kv_heads, T), higher = keep."""
        raise NotImplementedError

    def check_model(self, info: Any) -> None:
        """Raise KVPError if this scorer cannot score the model described by `info` (a ModelInfo); any model by
        default (a learned policy refuses models it was not trained for)."""

    def identity(self) -> dict[str, Any]:
        """What identifies this scorer's results (name + settings, checkpoint hash for learned ones)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"name": self.name, **{k: v for k, v in settings.items() if isinstance(v, (bool, int, float, str))}}

"""The one interface every eviction method implements: score cached tokens per KV head, higher = keep.

A scorer sees one layer at a time through a `LayerView`. Attention-free scorers (and the learned KVP policy)
read only the cache: keys, values, positions. Attention-based scorers declare `query_window` > 0 and then also
receive the attention module and the inputs to attention (hidden states + RoPE cos/sin) of the most recent
tokens, from which they recompute just the queries they need. A scorer that `reads_text` (KVzip) instead ranks the
whole cache at once with the model (`rank_cache`), by feeding it the cached text again: only an uncut prefill.
A head- or layer-adaptive method (AdaKV, PyramidKV) is a scorer with its `allocation`: the engine's cut gives each
head the count it allots; any scorer whose scores compare across heads takes `--allocation layer|model`
(scorers/allocated.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from kvpolicy.compression.allocation import UNIFORM
from kvpolicy.errors import KVPError
from kvpolicy.models.attention import ALL_QUERIES  # a query_window value: every query of the latest chunk

if TYPE_CHECKING:
    from kvpolicy.compression.state import KVState
    from kvpolicy.models import ModelHandle

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

    def entry_states(self, scorer: str, instead: str) -> torch.Tensor:
        """(batch, T, hidden): the hidden state each cached entry entered attention with, for a scorer that reads
        them (KVzap, a KVP policy trained with --hidden-states). Only a cache ranked right after its one prefill has
        them all: otherwise a KVPError names `scorer` and ends with `instead`, what to use then."""
        fed = 0 if self.hidden_states is None else self.hidden_states.shape[1]
        cached = self.keys.shape[2]
        if fed != cached:
            raise KVPError(f"scorer '{scorer}' predicts each cached entry's score from the hidden state it entered "
                           f"attention with, but only the latest {fed} of the {cached} cached entries' are recorded (a "
                           f"cache fed in several chunks); rank a cache right after its one prefill, or {instead}")
        return self.hidden_states


@dataclass
class Scorer:
    """Base class: subclasses implement `score`. Scores are budget-agnostic rankings: rank once, cut anywhere."""

    name = "scorer"
    query_window = 0  # 0: needs no queries; >0 or ALL_QUERIES: the queries of the latest chunk's last tokens
    # True: ranks by re-reading the cached text with the model, e.g. KVzip: only an uncut prefill, never while decoding
    reads_text = False
    # True: ranks only the cache of one whole prefill, never a cut cache fed more tokens later: KVzip (the cached text)
    # and KVzap (every entry's own hidden state)
    whole_prefill = False
    # how a cut spreads the budget over heads and layers (compression/allocation.py); head-adaptive methods set theirs
    allocation = UNIFORM

    @property
    def attention_free(self) -> bool:
        """Ranks from the cache alone, so it can run at any time (during decoding included)."""
        return self.query_window == 0 and not self.reads_text

    def score(self, view: LayerView) -> torch.Tensor:
        """Scores (batch, kv_heads, T), higher = keep."""
        raise NotImplementedError

    def rank_cache(self, handle: ModelHandle, state: KVState) -> list[torch.Tensor]:
        """For a scorer that `reads_text`, instead of `score`: per layer scores (1, kv_heads, T), higher = keep, of
        the cache of `state` (one sequence whose `ids` hold every token fed), computed with the model of `handle`;
        `state` is left as it was."""
        raise NotImplementedError

    def check_model(self, info: Any) -> None:
        """Raise KVPError if this scorer cannot score the model described by `info` (a ModelInfo); any model by
        default (a learned policy refuses models it was not trained for)."""

    def score_layers(self, views: list[LayerView]) -> list[torch.Tensor]:
        """Scores of every layer (each (batch, kv_heads, T)), from one view per layer in order: `score` on each by
        default; a scorer that can score all layers in one call overrides it."""
        return [self.score(view) for view in views]

    def check_budgets(self, budgets: list[Any]) -> None:
        """Raise KVPError if this scorer cannot cut to one of `budgets` (each a Budget); any budget by default."""

    def incomparable(self) -> str | None:
        """Why this scorer's scores cannot move budget between heads and layers (`--allocation layer|model`), or
        None when they compare across heads: by default they do, as kvpress's AdaKVPress assumes of any press."""
        return None

    def comparable_score(self, view: LayerView) -> torch.Tensor:
        """Scores (batch, kv_heads, T) that compare across heads and layers, for an allocation that moves budget
        between them: `score`'s by default."""
        return self.score(view)

    def comparable_scores(self, views: list[LayerView]) -> list[torch.Tensor]:
        """`comparable_score` of every layer, from one view per layer in order."""
        return [self.comparable_score(view) for view in views]

    def comparable_identity(self) -> dict[str, Any]:
        """What `comparable_score` adds to `identity` (e.g. a calibration's hash); nothing by default."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What identifies this scorer's results (name + settings, checkpoint hash for learned ones)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"name": self.name, **{k: v for k, v in settings.items() if isinstance(v, (bool, int, float, str))}}

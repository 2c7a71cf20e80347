"""`EvictingCache`: a transformers KV cache that evicts as it is filled, so that `model.generate` (sampling, stopping
criteria, streamers, batches) runs on a bounded cache with any attention-free kvpolicy scorer, the KVP policy
included:

    cache = kvp.EvictingCache(policy, budget=256)                       # or Budget(ratio=0.5); every=16 while decoding
    model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

How it works. transformers calls `update` once per layer per forward with the new keys and values, and attends to what
it returns. After a forward of several tokens (the prefill, a chunk of it, a new dialogue turn) the layer returns every
entry to that forward's attention, as a full cache would, then keeps only the budget's best, scored from keys,
values and true positions alone (hence attention-free scorers only). With `every=N` it also cuts back to the budget
whenever decoding has added N entries, as the engine's `BoundedDecoding` does. Every cut is the engine's: the
budget's protected sinks and recent tokens, then the scorer's best (`Allocation.select`), in position order.

Positions. The cache tracks each entry's true position; `get_seq_length` answers the number of tokens fed (so that
generate and the model place new tokens right after them), while each layer reports its stored length and an offset
to the mask (`get_mask_sizes`), so transformers' causal and padding masks line up with the entries kept.

Hybrid models. Given the model's config (`config=model.config`), a model with sliding-window layers (Gemma 3) keeps
each sliding layer as transformers does (its last window - 1 entries) and evicts only from the full-attention ones,
which the scorer numbers 0, 1, ... as a policy trained for that model numbers its agents.

Batches. A left-padded batch (`padding_mask=inputs["attention_mask"]`) has its padding never attended and never
kept before a real entry: padding scores below every entry, so a row keeps its own best entries, exactly as it
would alone. A row shorter than the budget keeps its padding as masked filler (every row of a batch has one
length), in front of its entries, where the attention mask already has it. Right padding is refused.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvpolicy.compression.allocation import UNIFORM, kept_entries
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.catalog import attention_free
from kvpolicy.compression.scorers.base import LayerView, Scorer
from kvpolicy.compression.state import gather_entries
from kvpolicy.errors import KVPError
from kvpolicy.models.handle import full_attention_layers, layer_windows


class EvictingLayer(DynamicLayer):
    """One layer's entries (B, H, T, d) with their true positions (B, H, T) and `fed`, the tokens fed to it."""

    def __init__(self):
        super().__init__()
        self.fed = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.positions = torch.zeros(*key_states.shape[:2], 0, dtype=torch.long, device=key_states.device)

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(stored + new entries, offset): the offset maps the stored entries onto the last columns of the fed
        tokens, so a new token's causal mask sees every kept entry and its own chunk's earlier tokens."""
        stored = self.get_seq_length()
        return stored + cache_position.shape[0], self.fed - stored


class EvictingCache(DynamicCache):
    """scorer: an attention-free kvpolicy scorer (`kvp.load_policy(...)`, `make_scorer("knorm")`, ...) with the
    uniform allocation; budget: a `Budget` or entries per KV head; every: with a token budget, cut back to it each
    time decoding has added this many entries (None: cut after multi-token forwards only); padding_mask: (B, T) the
    attention mask of a left-padded batch's prompts (1 = token, 0 = padding); config: the model's config, which a
    model with sliding-window layers needs (those layers are kept as transformers keeps them)."""

    def __init__(self, scorer: Scorer, budget: Budget | int, every: int | None = None,
                 padding_mask: torch.Tensor | None = None, config=None):
        budget = Budget(tokens=budget) if isinstance(budget, int) and not isinstance(budget, bool) else budget
        if not isinstance(scorer, Scorer):
            raise KVPError(f"EvictingCache needs a kvpolicy scorer (kvp.load_policy(...), kvp.make_scorer('knorm')), "
                           f"got {type(scorer).__name__}")
        if not isinstance(budget, Budget):
            raise KVPError(f"EvictingCache's budget is a kvp.Budget or a number of entries per KV head, got {budget!r}")
        if not scorer.attention_free:
            raise KVPError(f"scorer '{scorer.name}' needs more than the cache (queries, or the cached text), which a "
                           f"cache does not see; use an attention-free scorer ({', '.join(attention_free())}, kvp:...)")
        if scorer.allocation is not UNIFORM:
            raise KVPError(f"EvictingCache cuts each layer as it is filled, so every head keeps the same count; "
                           f"{scorer.allocation.name} allocation moves the budget between heads: use the engine "
                           "(kvp.generate) for it")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise KVPError(f"every re-cuts the cache every N >= 1 decoded tokens; got every={every!r}")
        if every is not None and budget.tokens is None:
            raise KVPError("every=N keeps decoding within a budget of entries: give budget as a number of entries")
        windows = () if config is None else layer_windows(config.get_text_config(decoder=True), "this model")
        super().__init__()
        self.layer_class_to_replicate = EvictingLayer
        self.layers = [DynamicSlidingWindowLayer(w) if w is not None else EvictingLayer() for w in windows]
        # a layer's number for the scorer
        self.numbers = {idx: number for number, idx in enumerate(full_attention_layers(windows))}
        self.scorer, self.budget, self.every = scorer, budget, every
        self.pads = None if padding_mask is None else _left_padding(padding_mask)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far (not entries kept): where generate and the model place the next token."""
        if layer_idx >= len(self.layers) or not self.layers[layer_idx].is_initialized:
            return 0
        layer = self.layers[layer_idx]
        return layer.fed if isinstance(layer, EvictingLayer) else layer.get_seq_length()  # a sliding layer's: fed

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new entries (B, H, n, d) to layer `layer_idx`; return what this forward attends to (every
        entry, before any cut), and keep what the budget keeps."""
        while len(self.layers) <= layer_idx:
            self.layers.append(EvictingLayer())
        layer = self.layers[layer_idx]
        if not isinstance(layer, EvictingLayer):  # a sliding-window layer: transformers' own
            return layer.update(key_states, value_states, cache_kwargs)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        rows, heads, n = key_states.shape[:3]
        if self.pads is not None and self.pads.shape[0] != rows:
            raise KVPError(f"padding_mask has {self.pads.shape[0]} rows, the batch {rows}")
        if self.every is not None and n == 1 and layer.get_seq_length() >= self.budget.tokens + self.every:
            self._cut(layer_idx)  # decoding: back to the budget before the token is added, as BoundedDecoding
        new = torch.arange(layer.fed, layer.fed + n, device=key_states.device).expand(rows, heads, n)
        layer.positions = torch.cat([layer.positions, new], dim=-1)
        layer.fed += n
        keys, values = DynamicLayer.update(layer, key_states, value_states)
        if n > 1:
            self._cut(layer_idx)
        return keys, values

    def true_positions(self, layer_idx: int) -> torch.Tensor:
        """(B, H, T) each stored entry's position in its own row (padding negative)."""
        positions = self.layers[layer_idx].positions
        return positions if self.pads is None else positions - self.pads.to(positions.device).view(-1, 1, 1)

    def _cut(self, layer_idx: int) -> None:
        """Keep the budget's entries of layer `layer_idx`: its protected sinks and recent tokens, then its best
        scores, in position order (padding below every entry)."""
        layer = self.layers[layer_idx]
        length = layer.get_seq_length()
        kept = self.budget.kept(length)
        if kept >= length:
            return
        positions = self.true_positions(layer_idx)
        fed = layer.fed if self.pads is None else (layer.fed - self.pads.to(positions.device)).view(-1, 1, 1)
        masks = None if self.pads is None else [positions >= 0]
        with torch.no_grad():
            number = self.numbers.get(layer_idx, layer_idx)
            scores = self.scorer.score(LayerView(number, layer.keys, layer.values, positions))
        [(keep, _)] = kept_entries(*UNIFORM.select([scores], [positions], self.budget, fed, masks))
        layer.keys, layer.values = gather_entries(keep, layer.keys, layer.values)
        layer.positions = layer.positions.gather(2, keep)


def _left_padding(mask: torch.Tensor) -> torch.Tensor:
    """(B,) padding tokens in front of each row of a (B, T) attention mask; right padding is refused."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise KVPError("padding_mask is the (batch, tokens) attention mask of the prompts: inputs['attention_mask']")
    mask = mask.bool()
    pads = (~mask).sum(dim=1)
    left = torch.arange(mask.shape[1], device=mask.device) >= pads.unsqueeze(1)
    if not bool((mask == left).all()):
        raise KVPError("the batch is padded on the right (or in the middle); pad on the left for generation: "
                       "tokenizer.padding_side = 'left'")
    if bool((pads == mask.shape[1]).any()):
        raise KVPError("a row of the batch is all padding; give every row at least one token")
    return pads

"""`WindowLayer`: a sliding-window layer of a hybrid model (Gemma 3) in a `KVState`, kept as the model keeps it.

kvpolicy evicts only from full-attention layers; a sliding layer holds its last window - 1 entries, as transformers'
DynamicSlidingWindowLayer does, and no scorer touches it. What differs is the mask. The engine numbers new tokens by
their index in the evicted layers' (shrunken) cache (`cache_position`), not by the tokens fed, so that the causal mask
of a full-attention layer sees every kept entry; a window layer therefore reports its entries at the indices just
before that: kv_offset = cache_position[0] - held, negative when it holds more entries than the evicted layers. The
sliding mask then compares index differences, which equal true position differences, so each query sees exactly the
window - 1 tokens before it and itself, as with a full cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer


class WindowLayer(DynamicSlidingWindowLayer):
    """A sliding layer's last window - 1 entries (B, H, <= window - 1, d), numbered relative to the engine's
    cache_position."""

    @classmethod
    def holding(cls, window: int, keys: torch.Tensor, values: torch.Tensor) -> WindowLayer:
        """A layer holding these (keys, values) (B, H, T, d), T <= window - 1, as they are (no copy)."""
        layer = cls(sliding_window=window)
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        layer.cumulative_length = keys.shape[2]
        return layer

    def get_seq_length(self) -> int:
        """Entries held (not tokens fed), as every layer of a KVState reports."""
        return self.keys.shape[2] if self.is_initialized else 0

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        held = self.get_seq_length()
        return held + cache_position.shape[0], int(cache_position[0]) - held

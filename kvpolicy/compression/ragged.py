"""`RaggedLayer`: one layer's cache when its heads keep different numbers of entries, stored without padding.

After an adaptive cut (compression/allocation.py) the heads of a layer hold different counts. Stored as dense
(B, H, T, d) tensors, every head would be padded to the longest; here the cut's entries are one flat (N, d)
tensor, N = the entries the heads really keep, in (row, head, position) order, beside the (B, H, W) mask of where
they sit in the padded layout. Tokens fed after the cut are the same for every head, so they grow a dense
(B, H, m, d) tail, as a DynamicCache does.

Attention reads the padded layout for the duration of one layer's forward: `update` rebuilds it (zeros where a head
has nothing) and returns it with the new tokens, and `head_masks.masked_heads` masks the zeros out, so attention
is exactly that of the padded cache (bit for bit: a masked entry's softmax weight is exactly 0). What stays in
memory between forwards is the flat cut and the tail; the padded copy of one layer at a time is a working buffer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvpolicy.errors import KVPError


class RaggedLayer(DynamicLayer):
    """A cache layer holding cut entries flat and later tokens dense.

    mask: (B, H, W) bool, True where the padded layout has an entry of its head; flat_keys / flat_values: (N, d),
    N = mask.sum(), the padded layout's entries at mask in row-major order; tail_keys / tail_values: (B, H, m, d),
    the m tokens fed since the cut. The padded layout (`keys`, `values`) is (B, H, W + m, d)."""

    def __init__(self, mask: torch.Tensor, flat_keys: torch.Tensor, flat_values: torch.Tensor,
                 tail_keys: torch.Tensor, tail_values: torch.Tensor):
        # no super().__init__(): `keys` and `values` are derived here, never assigned
        if flat_keys.shape[0] != int(mask.sum()) or flat_keys.shape != flat_values.shape:
            raise KVPError(f"a ragged layer's flat keys {tuple(flat_keys.shape)} and values "
                           f"{tuple(flat_values.shape)} must hold one row per masked entry ({int(mask.sum())})")
        self.mask, self.flat_keys, self.flat_values = mask, flat_keys, flat_values
        self.tail_keys, self.tail_values = tail_keys, tail_values
        self.dtype, self.device, self.is_initialized = flat_keys.dtype, flat_keys.device, True

    @classmethod
    def from_padded(cls, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> RaggedLayer:
        """The layer of padded keys / values (B, H, W, d) whose entries at mask (B, H, W) are real (the rest are
        dropped)."""
        B, H, _, d = keys.shape  # new empty tails: a view of the padded tensors would keep them alive
        return cls(mask, keys[mask], values[mask], keys.new_empty(B, H, 0, d), values.new_empty(B, H, 0, d))

    def _padded(self, flat: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        body = flat.new_zeros(*self.mask.shape, flat.shape[-1])
        body[self.mask] = flat
        return torch.cat([body, tail], dim=2) if tail.shape[2] else body

    @property
    def keys(self) -> torch.Tensor:
        """The padded keys (B, H, W + m, d), zeros where a head holds nothing (built anew on each call)."""
        return self._padded(self.flat_keys, self.tail_keys)

    @property
    def values(self) -> torch.Tensor:
        """The padded values (B, H, W + m, d), like `keys`."""
        return self._padded(self.flat_values, self.tail_values)

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held: the flat cut and the tail (no padding)."""
        return sum(t.nbytes for t in (self.flat_keys, self.flat_values, self.tail_keys, self.tail_values))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new tokens (B, H, n, d) to the tail; returns the padded keys and values (B, H, W + m + n, d)
        for this forward's attention."""
        self.tail_keys = torch.cat([self.tail_keys, key_states], dim=2)
        self.tail_values = torch.cat([self.tail_values, value_states], dim=2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.mask.shape[-1] + self.tail_keys.shape[2]

    def shared(self) -> RaggedLayer:
        """A layer holding the same tensors: updates replace tensors, never write into them, so either can grow
        without changing the other."""
        return RaggedLayer(self.mask, self.flat_keys, self.flat_values, self.tail_keys, self.tail_values)


def layer_bytes(layer: DynamicLayer) -> int:
    """Bytes of the keys and values a cache layer holds (a ragged layer's without padding)."""
    return layer.nbytes if isinstance(layer, RaggedLayer) else layer.keys.nbytes + layer.values.nbytes

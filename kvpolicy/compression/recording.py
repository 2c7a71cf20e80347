"""Record the inputs to every layer's attention during a forward pass, for query-based scorers.

A forward pre-hook on each layer's `self_attn` keeps the hidden states and RoPE (cos, sin) of only the last
`rows` tokens (all of them for ALL_QUERIES). Scorers then recompute just the queries they need, so the model
keeps its fused (SDPA) attention and never materialises a full attention matrix.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from kvpolicy.compression.scorers.base import ALL_QUERIES
from kvpolicy.compression.state import AttentionInputs


def _last_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """The last `rows` positions of (B, T, ...) as a compact copy (a view would keep the whole chunk alive)."""
    if rows == ALL_QUERIES or rows >= x.shape[1]:
        return x
    return x[:, -rows:].clone()


@contextlib.contextmanager
def record_attention_inputs(layers: list[torch.nn.Module], rows: int) -> Iterator[list[AttentionInputs | None]]:
    """Within the block, each forward through `layers[i].self_attn` stores its inputs' last `rows` tokens in
    the yielded list at index i (None for layers not run). rows: > 0, or ALL_QUERIES."""
    recorded: list[AttentionInputs | None] = [None] * len(layers)

    def hook_for(idx: int):
        def hook(module, args, kwargs):
            hidden, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
            recorded[idx] = AttentionInputs(
                _last_rows(hidden, rows),
                (_last_rows(cos, rows), _last_rows(sin, rows)),
                whole_chunk=rows == ALL_QUERIES or rows >= hidden.shape[1],
            )

        return hook

    handles = [
        layer.self_attn.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()

"""Attention mechanics shared by traces and compression: record a layer's attention inputs, recompute its queries,
and the causal attention of a window of queries over a cache.

A forward pre-hook on each layer's `self_attn` keeps the hidden states and RoPE (cos, sin) of only the last `rows`
tokens of a forward chunk (all of them for ALL_QUERIES). The queries are recomputed from those inputs (q_proj,
then RoPE), so the model keeps its fused (SDPA) attention and no T×T attention matrix is ever built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvpolicy.errors import KVPError

ALL_QUERIES = -1  # rows to record: every token of the latest forward chunk (e.g. H2O accumulated attention)


@dataclass
class AttentionInputs:
    """Inputs to one layer's attention for the last W tokens of a forward chunk.

    hidden_states: (B, W, hidden); position_embeddings: RoPE (cos, sin), each (B, W, head_dim);
    whole_chunk: whether the W rows are every token of the chunk.
    """

    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    whole_chunk: bool

    @property
    def rows(self) -> int:
        return self.hidden_states.shape[1]

    def clone(self) -> AttentionInputs:
        cos, sin = self.position_embeddings
        return AttentionInputs(self.hidden_states.clone(), (cos.clone(), sin.clone()), self.whole_chunk)


def _last_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """The last `rows` positions of (B, T, ...) as a compact copy (a view would keep the whole chunk alive)."""
    if rows == ALL_QUERIES or rows >= x.shape[1]:
        return x
    return x[:, -rows:].clone()


@contextlib.contextmanager
def record_attention_inputs(layers: Sequence[torch.nn.Module], rows: int) -> Iterator[list[AttentionInputs | None]]:
    """Within the block, each forward through `layers[i].self_attn` stores its inputs' last `rows` tokens (all of
    them when the chunk is shorter) in the yielded list at index i (None for layers not run); a later forward
    replaces an earlier one's. rows: >= 1, or ALL_QUERIES."""
    if rows != ALL_QUERIES and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise KVPError(f"rows of attention inputs to record must be >= 1 or ALL_QUERIES, got {rows!r}")
    recorded: list[AttentionInputs | None] = [None] * len(layers)

    def hook_for(idx: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (B, heads, R, d) with cos, sin (B, R, d), as Llama-family models apply it
    (halves rotated: x·cos + [−x₂, x₁]·sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat([-x2, x1], dim=-1) * sin.unsqueeze(1)


def project_queries(
    module: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Post-RoPE queries (B, Hq, R, d) of one layer, exactly as its Llama/Qwen-style attention computes them:
    q_proj (Phi-3: the query part of qkv_proj), the query norm where the model has one (Qwen3, Gemma3), RoPE.

    hidden_states: (B, R, hidden) attention inputs; position_embeddings: (cos, sin), each (B, R, d).
    """
    batch, n_rows, _ = hidden_states.shape
    n_q, dim = module.config.num_attention_heads, module.head_dim
    if hasattr(module, "q_proj"):
        queries = module.q_proj(hidden_states)
    else:
        queries = module.qkv_proj(hidden_states)[..., : n_q * dim]
    queries = queries.view(batch, n_rows, n_q, dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        queries = module.q_norm(queries)
    return apply_rope(queries, *position_embeddings)


def recorded_queries(
    attention_modules: Sequence[torch.nn.Module], recorded: Sequence[AttentionInputs], rows: int | None = None
) -> torch.Tensor:
    """Post-RoPE queries (L, Hq, R, d) of one sequence's recorded rows in every layer (the last `rows` of them).

    attention_modules: each layer's `self_attn`; recorded: each layer's inputs, batch size 1.
    """
    window = slice(-rows, None) if rows else slice(None)
    return torch.cat([
        project_queries(module, r.hidden_states[:, window], tuple(p[:, window] for p in r.position_embeddings))
        for module, r in zip(attention_modules, recorded)
    ])


def causal_window_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax attention of the LAST W rows of a sequence over its K keys, batched over any leading axes.

    queries: (..., Hq, W, d) post-RoPE; keys: (..., H, K, d) post-RoPE, Hq = G·H with query head h·G + g in KV
    head h's group (as in `repeat_kv`), without repeating the keys. The logits are computed in the inputs' dtype
    and the softmax in fp32. Returns (..., Hq, W, K) fp32: row t sees the keys j ≤ K − W + t.
    """
    *lead, n_q, n_rows, dim = queries.shape
    n_kv, n_keys = keys.shape[-3], keys.shape[-2]
    group = n_q // n_kv
    q = queries.reshape(-1, group * n_rows, dim)
    k = keys.reshape(-1, n_keys, dim)
    logits = torch.bmm(q, k.transpose(1, 2)).view(*lead, n_q, n_rows, n_keys) * scaling
    row_position = torch.arange(n_keys - n_rows, n_keys, device=keys.device)  # absolute position of each row
    after_row = torch.arange(n_keys, device=keys.device)[None, :] > row_position[:, None]  # (W, K)
    logits.masked_fill_(after_row, float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def causal_window_attention_reference(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Slow, obviously-correct version of `causal_window_attention` for queries (Hq, W, d), keys (H, K, d):
    one softmax per query head and row over the keys up to the row's position, in float64."""
    n_q, n_rows, _ = queries.shape
    n_kv, n_keys, _ = keys.shape
    group = n_q // n_kv
    probs = torch.zeros(n_q, n_rows, n_keys, dtype=torch.float64)
    for head in range(n_q):
        for t in range(n_rows):
            visible = n_keys - n_rows + t + 1
            logits = keys[head // group, :visible].double() @ queries[head, t].double() * scaling
            probs[head, t, :visible] = torch.softmax(logits, dim=0)
    return probs.float()

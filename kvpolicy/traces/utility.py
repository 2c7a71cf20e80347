"""Future utility: how much attention each prompt token receives from the tokens that follow the prompt.

    u_i = Σ_{t in future}  max_{query heads q in the KV head's GQA group}  softmax-attention_q(t → i)

Computed from the future queries only: forward pre-hooks on every layer's attention module keep the attention
inputs (hidden states and RoPE cos/sin) of the future rows; the queries are recomputed from them (q_proj + RoPE)
and attend over the full cache (prompt + future keys, causal). No T×T attention matrix is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class AttentionInputs:
    """The inputs to one attention layer for the last R rows of a forward call.

    hidden_states: (1, R, hidden); cos, sin: (1, R, head_dim).
    """

    hidden_states: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class AttentionInputRecorder:
    """Forward pre-hooks on each layer's `self_attn` that keep the attention inputs of the last `rows` rows of the
    latest forward call (all rows when the call is shorter). `records[layer]` is an `AttentionInputs`."""

    def __init__(self, layers: Sequence[torch.nn.Module], rows: int):
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.layers = list(layers)
        self.rows = rows
        self.records: list[AttentionInputs | None] = [None] * len(self.layers)
        self._handles: list = []

    def _hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            self.records[layer_idx] = AttentionInputs(
                hidden[:, -self.rows :].detach(), cos[:, -self.rows :].detach(), sin[:, -self.rows :].detach()
            )

        return hook

    def __enter__(self) -> "AttentionInputRecorder":
        self._handles = [
            layer.self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (B, heads, R, d) with cos, sin (B, R, d), as Llama-family models apply it
    (halves rotated: x·cos + [−x₂, x₁]·sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat([-x2, x1], dim=-1) * sin.unsqueeze(1)


def project_queries(attention_modules: Sequence[torch.nn.Module], recorded: Sequence[AttentionInputs],
                    rows: int | None = None) -> torch.Tensor:
    """Post-RoPE queries (L, n_query_heads, R, head_dim) of the recorded rows (the last `rows` of them), exactly as
    each layer of a Llama/Qwen2-style attention computes them: q_proj, then RoPE (batched over layers)."""
    window = slice(-rows, None) if rows else slice(None)
    q = torch.stack([a.q_proj(r.hidden_states[0, window]) for a, r in zip(attention_modules, recorded)])
    q = q.view(*q.shape[:2], -1, attention_modules[0].head_dim).transpose(1, 2)  # (L, Hq, R, d)
    cos = torch.cat([r.cos[:, window] for r in recorded])
    sin = torch.cat([r.sin[:, window] for r in recorded])
    return apply_rope(q, cos, sin)


def grouped_future_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float, n_prompt: int) -> torch.Tensor:
    """Future utility of the first `n_prompt` keys, batched over any leading axes (e.g. layers).

    queries: (..., Hq, F, d) post-RoPE queries of the future rows, which are the LAST F rows of the sequence.
    keys: (..., H, K, d) post-RoPE keys of the whole sequence (K = n_prompt + F; Hq = G·H, query head h·G + g
        belongs to KV head h, as in `repeat_kv`).
    Returns (..., H, n_prompt) fp32: Σ_t max_g softmax_j(q_{hg,t}·k_{h,j}·scaling; j ≤ K − F + t)[i].
    """
    *lead, n_q, n_future, dim = queries.shape
    n_kv, n_keys = keys.shape[-3], keys.shape[-2]
    group = n_q // n_kv
    q = queries.float().reshape(-1, group * n_future, dim)
    k = keys.float().reshape(-1, n_keys, dim)
    logits = torch.bmm(q, k.transpose(1, 2)).view(-1, group, n_future, n_keys) * scaling
    row_position = torch.arange(n_keys - n_future, n_keys, device=keys.device)  # absolute position of each future row
    hidden = torch.arange(n_keys, device=keys.device)[None, :] > row_position[:, None]  # (F, K): key after the row
    logits.masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.amax(dim=1).sum(dim=1)[:, :n_prompt].reshape(*lead, n_kv, n_prompt)


def grouped_future_attention_reference(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                                       n_prompt: int) -> torch.Tensor:
    """Slow, obviously-correct version of `grouped_future_attention` (loops over heads and rows)."""
    n_q, n_future, _ = queries.shape
    n_kv, n_keys, _ = keys.shape
    group = n_q // n_kv
    utility = torch.zeros(n_kv, n_prompt, dtype=torch.float64)
    for h in range(n_kv):
        for t in range(n_future):
            visible = n_keys - n_future + t + 1
            best = torch.zeros(n_prompt, dtype=torch.float64)
            for g in range(group):
                q = queries[h * group + g, t].double()
                weights = torch.softmax(keys[h, :visible].double() @ q * scaling, dim=0)
                best = torch.maximum(best, weights[:n_prompt])
            utility[h] += best
    return utility.float()


def future_utility(
    attention_modules: Sequence[torch.nn.Module],
    recorded: Sequence[AttentionInputs],
    keys: Sequence[torch.Tensor],
    n_prompt: int,
    chunk_bytes: int = 128 << 20,
) -> torch.Tensor:
    """Future utility for every layer: (L, H, n_prompt) fp32.

    attention_modules: each layer's `self_attn`; recorded: each layer's attention inputs of the future rows;
    keys: each layer's cached keys (1, H, n_prompt + F, d) after the future rows were fed. Layers go through the
    attention in chunks whose (Hq, F, K) fp32 attention fits in about `chunk_bytes`.
    """
    queries = project_queries(attention_modules, recorded)  # (L, Hq, F, d)
    n_layers, n_q, n_future, _ = queries.shape
    n_keys = keys[0].shape[-2]
    step = max(1, chunk_bytes // (4 * n_q * n_future * n_keys))
    scaling = attention_modules[0].scaling
    return torch.cat([
        grouped_future_attention(queries[i : i + step], torch.cat(list(keys[i : i + step])), scaling, n_prompt)
        for i in range(0, n_layers, step)
    ])

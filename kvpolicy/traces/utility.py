"""Future utility: how much attention each prompt token receives from the tokens that follow the prompt.

    u_i = Σ_{t in future}  max_{query heads q in the KV head's GQA group}  softmax-attention_q(t → i)

Computed from the future queries only: the attention inputs of the future rows are recorded while they are fed
(`record_attention_inputs`), the queries are recomputed from them and attend over the full cache (prompt + future
keys, causal; `causal_window_attention`). No T×T attention matrix is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpolicy.models.attention import AttentionInputs, causal_window_attention, recorded_queries


def grouped_future_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float, n_prompt: int) -> torch.Tensor:
    """Future utility of the first `n_prompt` keys, batched over any leading axes (e.g. layers).

    queries: (..., Hq, F, d) post-RoPE queries of the future rows, which are the LAST F rows of the sequence.
    keys: (..., H, K, d) post-RoPE keys of the whole sequence (K = n_prompt + F; Hq = G·H, query head h·G + g
        belongs to KV head h, as in `repeat_kv`).
    Returns (..., H, n_prompt) fp32: Σ_t max_g softmax_j(q_{hg,t}·k_{h,j}·scaling; j ≤ K − F + t)[i].
    """
    probs = causal_window_attention(queries.float(), keys.float(), scaling)  # (..., Hq, F, K)
    n_kv = keys.shape[-3]
    return probs.unflatten(-3, (n_kv, -1)).amax(dim=-3).sum(dim=-2)[..., :n_prompt]


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
    queries = recorded_queries(attention_modules, recorded)  # (L, Hq, F, d)
    n_layers, n_q, n_future, _ = queries.shape
    n_keys = keys[0].shape[-2]
    step = max(1, chunk_bytes // (4 * n_q * n_future * n_keys))
    scaling = attention_modules[0].scaling
    return torch.cat([
        grouped_future_attention(queries[i : i + step], torch.cat(list(keys[i : i + step])), scaling, n_prompt)
        for i in range(0, n_layers, step)
    ])

"""Shared attention mechanics: RoPE, query projection, the causal window attention vs its slow reference, and
the recorder of attention inputs on the real model."""

from __future__ import annotations

import pytest
import torch
from kvpress.utils import get_prerope_query_states
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpolicy.errors import KVPError
from kvpolicy.models.attention import (
    ALL_QUERIES,
    apply_rope,
    causal_window_attention,
    causal_window_attention_reference,
    project_queries,
    record_attention_inputs,
    recorded_queries,
)


def test_apply_rope_is_the_llama_rotation():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 4, 5, 8, generator=gen)
    cos, sin = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    expected, _ = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), expected)


@pytest.mark.parametrize("n_q,n_kv,n_rows,n_keys", [(9, 3, 4, 11), (4, 4, 1, 7), (6, 2, 5, 5), (2, 1, 3, 3)])
def test_causal_window_attention_matches_reference(n_q, n_kv, n_rows, n_keys):
    gen = torch.Generator().manual_seed(n_q * 100 + n_keys)
    queries, keys = torch.randn(n_q, n_rows, 16, generator=gen), torch.randn(n_kv, n_keys, 16, generator=gen)
    fast = causal_window_attention(queries, keys, 0.3)
    assert fast.shape == (n_q, n_rows, n_keys) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, causal_window_attention_reference(queries, keys, 0.3), atol=1e-6, rtol=1e-5)


def test_causal_window_attention_batches_over_leading_axes():
    gen = torch.Generator().manual_seed(5)
    queries, keys = torch.randn(2, 3, 6, 4, 8, generator=gen), torch.randn(2, 3, 2, 9, 8, generator=gen)
    batched = causal_window_attention(queries, keys, 0.5)
    assert batched.shape == (2, 3, 6, 4, 9)
    for i in range(2):
        for j in range(3):
            expected = causal_window_attention_reference(queries[i, j], keys[i, j], 0.5)
            torch.testing.assert_close(batched[i, j], expected, atol=1e-6, rtol=1e-5)


def test_causal_window_attention_rows_are_causal_distributions():
    gen = torch.Generator().manual_seed(1)
    probs = causal_window_attention(torch.randn(2, 6, 4, 8, generator=gen), torch.randn(2, 3, 9, 8, generator=gen), 0.5)
    assert probs.shape == (2, 6, 4, 9)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 6, 4))
    assert (probs[..., 0, 6:] == 0).all() and (probs[..., 2, 8:] == 0).all() and (probs[..., 3, :] > 0).all()


def test_causal_window_attention_softmax_is_fp32_for_half_inputs():
    gen = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(4, 3, 8, generator=gen), torch.randn(2, 7, 8, generator=gen)
    probs = causal_window_attention(queries.bfloat16(), keys.bfloat16(), 0.5)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, causal_window_attention_reference(queries, keys, 0.5), atol=2e-2, rtol=0)


@pytest.mark.parametrize("rows", [0, -2, True, 1.5])
def test_recording_refuses_bad_row_counts(rows):
    with pytest.raises(KVPError, match="ALL_QUERIES"):
        with record_attention_inputs([], rows):
            pass


@pytest.mark.model
def test_recorder_keeps_the_last_rows_and_unhooks(smollm):
    ids = torch.randint(100, 5000, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with record_attention_inputs(smollm.layers, ALL_QUERIES) as everything:
            smollm.model.model(input_ids=ids)
        with record_attention_inputs(smollm.layers, 5) as last, record_attention_inputs(smollm.layers, 50) as more:
            smollm.model.model(input_ids=ids)
        smollm.model.model(input_ids=ids[:, :3])  # after the blocks: recorded nothing
    assert len(everything) == len(last) == smollm.info.n_layers
    for full, five, all_rows in zip(everything, last, more):
        assert full.whole_chunk and full.rows == 20 and all_rows.whole_chunk and all_rows.rows == 20
        assert not five.whole_chunk and five.rows == 5
        assert torch.equal(five.hidden_states, full.hidden_states[:, -5:])
        for p5, p in zip(five.position_embeddings, full.position_embeddings):
            assert torch.equal(p5, p[:, -5:])
        assert five.hidden_states.untyped_storage().nbytes() == five.hidden_states.nbytes  # a compact copy


@pytest.mark.model
def test_project_queries_equal_kvpress_queries(smollm):
    ids = torch.randint(100, 5000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), record_attention_inputs(smollm.layers, 7) as recorded:
        smollm.model.model(input_ids=ids)
    module, inputs = smollm.layers[4].self_attn, recorded[4]
    with torch.no_grad():
        ours = project_queries(module, inputs.hidden_states, inputs.position_embeddings)
        theirs = get_prerope_query_states(module, inputs.hidden_states)
        theirs, _ = apply_rotary_pos_emb(theirs, theirs, *inputs.position_embeddings)
    assert ours.shape == (2, smollm.info.n_query_heads, 7, smollm.info.head_dim)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.model
@pytest.mark.parametrize("model", ["smollm", "gemma"])
def test_recorded_queries_reproduce_the_models_own_attention(model, request):
    """The last rows' attention recomputed from recorded inputs (what TOVA, SnapKV and the traces' utilities
    compute) equals the eager attention weights of the model in every layer it evicts: all of SmolLM2's, Gemma's
    full-attention layers (with their query norm and their own RoPE)."""
    handle = request.getfixturevalue(model)
    ids = torch.randint(100, 5000, (1, 30), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache()  # every layer whole (a sliding one too)
    handle.model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), record_attention_inputs(handle.layers, 8) as recorded:
            out = handle.model.model(input_ids=ids, past_key_values=cache, use_cache=True, output_attentions=True)
    finally:
        handle.model.set_attn_implementation("sdpa")
    evicted = handle.info.evicted_layers
    attn = [handle.layers[i].self_attn for i in evicted]
    with torch.no_grad():
        queries = recorded_queries(attn, [recorded[i] for i in evicted], rows=6)  # (L, Hq, 6, d)
        probs = causal_window_attention(queries, torch.cat([cache.layers[i].keys for i in evicted]), attn[0].scaling)
    expected = torch.stack([out.attentions[i][0, :, -6:] for i in evicted])  # (L, Hq, 6, T)
    assert probs.shape == expected.shape == (len(evicted), handle.info.n_query_heads, 6, 30)
    torch.testing.assert_close(probs, expected.float(), atol=1e-5, rtol=1e-4)

"""Hybrid attention (Gemma 3: sliding-window and full-attention layers) on a tiny Gemma 3 with random weights, fp32:
the engine answers exactly as transformers' own generate with a full cache, and with any budget >= the length; a cut
touches only the full-attention layers, leaving every sliding layer's window as it was; the engine and `EvictingCache`
(two independent ways of lining masks up with the kept entries) give the same answers under eviction; traces and
policies cover the evicted layers only; attention kinds kvpolicy cannot evict from are refused in one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import (BoundedDecoding, compress, greedy_decode, prefill, prefill_chunked,
                                         rank)
from kvpolicy.compression.evicting_cache import EvictingCache
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.compression.state import stack_states
from kvpolicy.compression.window import WindowLayer
from kvpolicy.errors import KVPError
from kvpolicy.models.handle import ModelHandle, ModelInfo, layer_windows
from kvpolicy.traces.future import FutureConfig
from kvpolicy.traces.record import record_trace

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 8
KINDS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
BUDGET = Budget(tokens=24, sinks=2, recent=4)
NEW = 12


@pytest.fixture(scope="module")
def gemma():
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
                              layer_types=KINDS, max_position_embeddings=256, attn_implementation="sdpa")
    model = Gemma3ForCausalLM(config).eval()
    windows = layer_windows(config, "tiny-gemma")
    info = ModelInfo("tiny-gemma", "gemma3", 2, 1, 2, 16, 256, "none", windows)
    tokenizer = SimpleNamespace(eos_token_id=None, convert_tokens_to_ids=lambda token: None, unk_token_id=None)
    return ModelHandle(info=info, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(5, 64, (1, 40), generator=torch.Generator().manual_seed(1))


def _reference(handle, ids) -> list[int]:
    """transformers' own generate with its own hybrid cache (no kvpolicy code)."""
    out = handle.model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _engine(handle, ids, budget=None, bounded=None) -> list[int]:
    state, _ = prefill(handle, ids)
    if budget is not None:
        state = compress(handle, state, make_scorer("knorm"), budget)
    return greedy_decode(handle, state, state.logits, NEW, stop_ids=[], bounded=bounded)


def test_the_layout_names_each_layer_window(gemma):
    assert gemma.info.layer_windows == (WINDOW, None, WINDOW, None)
    assert gemma.info.evicted_layers == [1, 3] and gemma.info.n_agents == 2


def test_full_cache_and_any_budget_at_least_the_length_answer_as_transformers(gemma, ids):
    reference = _reference(gemma, ids)
    assert _engine(gemma, ids) == reference
    assert _engine(gemma, ids, Budget(tokens=ids.shape[1])) == reference
    assert _engine(gemma, ids, Budget(tokens=200)) == reference


def test_a_cut_touches_only_the_full_attention_layers(gemma, ids):
    full, _ = prefill(gemma, ids)
    assert [type(layer) for layer in full.cache.layers][::2] == [WindowLayer, WindowLayer]
    assert full.lengths() == [WINDOW - 1, 40, WINDOW - 1, 40] and full.length == 40
    small = compress(gemma, full, make_scorer("knorm"), BUDGET)
    assert small.lengths() == [WINDOW - 1, 24, WINDOW - 1, 24] and small.attended() == 24
    for idx in (0, 2):  # the windows are the very tensors the prefill left
        assert small.layer(idx)[0] is full.layer(idx)[0] and torch.equal(small.positions[idx], full.positions[idx])
        assert full.positions[idx][0, 0].tolist() == list(range(40 - WINDOW + 1, 40))
    assert len(rank(gemma, full, make_scorer("knorm"))) == 2
    assert small.nbytes_at(40) == full.nbytes()  # the whole prompt's bytes: windows as held, evicted layers scaled
    assert _engine(gemma, ids, BUDGET) != _reference(gemma, ids)  # the cut changes the answer: it is a real one


@pytest.mark.parametrize("every", [None, 4])
def test_the_engine_and_evicting_cache_answer_alike_under_eviction(gemma, ids, every):
    scorer = make_scorer("knorm")
    bounded = BoundedDecoding(scorer, BUDGET, every) if every else None
    cache = EvictingCache(scorer, BUDGET, every=every, config=gemma.model.config)
    out = gemma.model.generate(ids, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == _engine(gemma, ids, BUDGET, bounded)
    assert [layer.keys.shape[2] for layer in cache.layers][::2] == [WINDOW - 1, WINDOW - 1]
    assert all(layer.keys.shape[2] <= BUDGET.tokens + (every or NEW) for layer in cache.layers[1::2])


def test_a_chunked_prefill_bounds_the_evicted_layers(gemma, ids):
    state, chunked = prefill_chunked(gemma, ids, make_scorer("knorm"), BUDGET, chunk=10)
    assert chunked.peak <= BUDGET.tokens + 10 and chunked.chunks == 4
    assert state.lengths()[::2] == [WINDOW - 1, WINDOW - 1]
    assert greedy_decode(gemma, compress(gemma, state, make_scorer("knorm"), BUDGET), state.logits, NEW, [])


def test_stacked_cuts_decode_as_each_alone(gemma, ids):
    full, _ = prefill(gemma, ids)
    cuts = [compress(gemma, full, make_scorer(name), BUDGET) for name in ("knorm", "streaming_llm")]
    alone = [greedy_decode(gemma, cut.branch(), cut.logits, NEW, []) for cut in cuts]
    assert _batch(gemma, stack_states(cuts)) == alone


def _batch(handle, state) -> list[list[int]]:
    from kvpolicy.compression.engine import greedy_decode_batch

    return greedy_decode_batch(handle, state, state.logits, NEW, [])


def test_rows_with_partly_filled_windows_of_other_lengths_are_refused(gemma, ids):
    short, _ = prefill(gemma, ids[:, :5])
    other, _ = prefill(gemma, ids[:, :6])
    with pytest.raises(KVPError, match="sliding-window layers decode together only when"):
        stack_states([short, other], pad=True)
    rows = [prefill(gemma, ids[:, :30])[0], prefill(gemma, ids)[0]]  # both hold a whole window: they decode together
    alone = [greedy_decode(gemma, row.branch(), row.logits, NEW, []) for row in rows]
    batch = stack_states(rows, pad=True)
    assert batch.offsets is not None and _batch(gemma, batch) == alone


def test_traces_cover_the_evicted_layers_only(gemma, ids):
    trace = record_trace(gemma, ids, FutureConfig(mode="greedy", max_tokens=6), baselines=["snapkv"])
    assert trace.keys.shape[:3] == (2, 1, 40) and trace.utility.shape == trace.baselines["snapkv"].shape == (2, 1, 40)
    full, _ = prefill(gemma, ids)
    for number, idx in enumerate(gemma.info.evicted_layers):
        assert torch.allclose(trace.keys[number].float(), full.layer(idx)[0][0].half().float())


def test_attention_kinds_that_cannot_be_evicted_are_refused():
    chunked = SimpleNamespace(layer_types=["chunked_attention", "full_attention"], num_hidden_layers=2,
                              sliding_window=None)
    with pytest.raises(KVPError, match="chunked_attention layers, an attention kind kvpolicy cannot evict from"):
        layer_windows(chunked, "llama4")
    all_sliding = SimpleNamespace(num_hidden_layers=2, sliding_window=16, max_position_embeddings=64)
    with pytest.raises(KVPError, match="sliding-window attention in every layer"):
        layer_windows(all_sliding, "mistral")
    assert layer_windows(SimpleNamespace(num_hidden_layers=2, sliding_window=64, max_position_embeddings=64),
                         "phi3-128k") == ()  # a window as long as the positions never slides


def test_the_kvpress_press_cuts_the_full_attention_layers_as_the_engine(gemma, ids):
    from transformers import DynamicCache

    from kvpolicy.compression.press import KVPolicyPress

    full, _ = prefill(gemma, ids)
    ours = compress(gemma, full, make_scorer("knorm"), Budget(ratio=0.5, sinks=2, recent=4))
    cache = DynamicCache(config=gemma.model.config)
    with torch.no_grad(), KVPolicyPress(compression_ratio=0.5, scorer="knorm", sinks=2, recent=4)(gemma.model):
        gemma.model.model(input_ids=ids, past_key_values=cache)
    for idx, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys, ours.layer(idx)[0]), f"layer {idx}"  # windows as the model keeps them
    assert [layer.keys.shape[2] for layer in cache.layers] == [WINDOW - 1, 20, WINDOW - 1, 20]

"""Every baseline scorer keeps exactly the entries kvpress's own press keeps (through kvpress's forward hook)."""

from __future__ import annotations

import pytest
import torch
from kvpress import (
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    LagKVPress,
    ObservedAttentionPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from transformers import DynamicCache

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import compress, prefill, rank
from kvpolicy.compression.scorers import ALL_QUERIES, SCORERS, LayerView, OracleScorer, make_scorer
from kvpolicy.compression.scorers.kvpress_backed import rotary_attached
from kvpolicy.data.essays import load_essays
from kvpolicy.errors import KVPError

RATIO = 0.6
UNPROTECTED = Budget(ratio=RATIO, sinks=0, recent=0)  # the comparison with kvpress: no sinks/recent protection

PRESSES = {
    "random": RandomPress(compression_ratio=RATIO, seed=0),
    "streaming_llm": StreamingLLMPress(compression_ratio=RATIO),
    "knorm": KnormPress(compression_ratio=RATIO),
    "keydiff": KeyDiffPress(compression_ratio=RATIO),
    "lagkv": LagKVPress(compression_ratio=RATIO),
    "tova": TOVAPress(compression_ratio=RATIO),
    "snapkv": SnapKVPress(compression_ratio=RATIO),
    "expected_attention": ExpectedAttentionPress(compression_ratio=RATIO),
}


def kept_positions(full_keys: torch.Tensor, kept_keys: torch.Tensor) -> torch.Tensor:
    """Which positions of full_keys (B, H, T, d) the compressed kept_keys (B, H, k, d) hold: (B, H, k) sorted."""
    return torch.cdist(kept_keys, full_keys).argmin(dim=-1).sort(dim=-1).values


@pytest.fixture(scope="module")
def prompt(smollm):
    return smollm.encode(load_essays()[5].text)[:, :400]  # > 4 + 2 * 128 so LagKV really scores


@pytest.fixture(scope="module")
def full(smollm, prompt):
    state, _ = prefill(smollm, prompt, record_queries=ALL_QUERIES)
    return state


def kvpress_kept(handle, prompt, press) -> list[torch.Tensor]:
    cache = DynamicCache()
    with torch.no_grad(), press(handle.model):
        handle.model.model(input_ids=prompt, past_key_values=cache)
    return [layer.keys for layer in cache.layers]


@pytest.mark.model
@pytest.mark.parametrize("name", list(PRESSES))
def test_kept_set_equals_kvpress_press(smollm, prompt, full, name):
    ours = compress(smollm, full, make_scorer(name), UNPROTECTED)
    theirs = kvpress_kept(smollm, prompt, PRESSES[name])
    assert ours.length == theirs[0].shape[2] == UNPROTECTED.kept(prompt.shape[1])
    for idx, keys in enumerate(theirs):
        assert torch.equal(ours.positions[idx], kept_positions(full.layer(idx)[0], keys)), f"layer {idx}"


@pytest.mark.model
def test_h2o_equals_kvpress_observed_attention_under_eager(smollm, prompt):
    """H2O recomputes attention in blocks; kvpress's ObservedAttentionPress reads eager attention weights."""
    smollm.model.set_attn_implementation("eager")
    try:
        full, _ = prefill(smollm, prompt, record_queries=ALL_QUERIES)
        theirs = kvpress_kept(smollm, prompt, ObservedAttentionPress(compression_ratio=RATIO))
    finally:
        smollm.model.set_attn_implementation("sdpa")
    ours = compress(smollm, full, make_scorer("h2o", block=64), UNPROTECTED)
    for idx, keys in enumerate(theirs):
        assert torch.equal(ours.positions[idx], kept_positions(full.layer(idx)[0], keys)), f"layer {idx}"


@pytest.mark.model
def test_query_scorers_use_only_the_rows_they_need(smollm, prompt, full):
    windowed, _ = prefill(smollm, prompt, record_queries=make_scorer("snapkv").query_window)
    assert windowed.recorded[0].rows == 65 and not windowed.recorded[0].whole_chunk
    for name in ("tova", "snapkv"):  # TOVA needs 1 row, SnapKV 65: the same 65 recorded rows serve both
        for a, b in zip(rank(smollm, windowed, make_scorer(name)), rank(smollm, full, make_scorer(name))):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.model
def test_expected_attention_rotates_to_the_true_next_position(smollm, prompt, full):
    """After eviction + a new chunk, future queries start at next_position, not at the chunk length."""
    small = compress(smollm, full, make_scorer("knorm"), Budget(tokens=100))
    prefill(smollm, prompt[:, :50], small, record_queries=ALL_QUERIES)
    shifted = rank(smollm, small, make_scorer("expected_attention"))[3]
    keys, values = small.layer(3)
    inputs, module = small.recorded[3], smollm.layers[3].self_attn
    with rotary_attached(module, smollm.model.model.rotary_emb):  # kvpress: futures start at the chunk length (50)
        naive = ExpectedAttentionPress().score(module, inputs.hidden_states, keys, values, None,
                                               {"position_embeddings": inputs.position_embeddings})
    assert shifted.shape == naive.shape and not torch.allclose(shifted, naive)


def test_streaming_llm_ranking_matches_kvpress_at_every_ratio():
    keys = torch.randn(2, 3, 50, 8)
    view = LayerView(0, keys, keys, torch.arange(50).expand(2, 3, 50))
    scores = make_scorer("streaming_llm").score(view)
    for ratio in (0.1, 0.3, 0.5, 0.8):
        theirs = StreamingLLMPress(compression_ratio=ratio).score(None, None, keys, keys, None, {})
        k = Budget(ratio=ratio).kept(50)
        assert torch.equal(scores.topk(k).indices.sort().values, theirs.topk(k).indices.sort().values)


def test_oracle_ranks_by_true_utility_at_true_positions():
    utility = torch.rand(2, 3, 40)  # (layers, heads, positions) as traces store it
    oracle = make_scorer("oracle", utility=utility)
    positions = torch.tensor([0, 1, 5, 9, 20, 39]).expand(1, 3, 6)
    scores = oracle.score(LayerView(1, torch.zeros(1, 3, 6, 4), torch.zeros(1, 3, 6, 4), positions))
    assert torch.equal(scores[0], utility[1][:, [0, 1, 5, 9, 20, 39]])
    with pytest.raises(KVPError, match="does not cover"):
        oracle.score(LayerView(0, torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4), torch.full((1, 3, 1), 40)))


def test_registry_errors_and_identity():
    assert set(SCORERS) == {"random", "streaming_llm", "knorm", "keydiff", "lagkv", "tova", "snapkv", "snapkv_w16",
                            "h2o", "expected_attention", "adakv_expected_attention", "adakv_snapkv",
                            "adakv_snapkv_w16", "pyramidkv", "pyramidkv_w16", "kvzip", "kvzip_plus", "kvzap_linear",
                            "kvzap_mlp", "kvzap_linear_threshold", "kvzap_mlp_threshold", "oracle"}
    with pytest.raises(KVPError, match="known scorers: random, streaming_llm"):
        make_scorer("nope")
    with pytest.raises(KVPError, match="utility"):
        make_scorer("oracle")
    with pytest.raises(KVPError, match="checkpoint"):
        make_scorer("kvp:/no/such/checkpoint")
    with pytest.raises(KVPError, match="bad settings"):
        make_scorer("knorm", window_size=3)
    assert make_scorer("snapkv", window_size=32).identity() == {"name": "snapkv", "window_size": 32, "kernel_size": 5}
    assert make_scorer("snapkv", window_size=32).query_window == 33
    assert make_scorer("knorm").attention_free and not make_scorer("h2o").attention_free
    assert isinstance(make_scorer("oracle", utility=[torch.zeros(3, 4)]), OracleScorer)

"""A prefill that evicts as it goes: the prompt fed C tokens at a time, the cache cut back to the budget after each
chunk, checked against the same cuts made by hand with prefill + compress, on the real SmolLM2."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import compress, generate, prefill, prefill_chunked
from kvpolicy.compression.scorers import ALL_QUERIES, make_scorer
from kvpolicy.data.essays import load_essays
from kvpolicy.errors import KVPError

CONTEXT = 330  # prompt tokens: a first chunk of 10, then four of 80


@pytest.fixture(scope="module")
def prompt(smollm):
    return smollm.encode(load_essays()[2].text)[:, :CONTEXT]


def chunked_by_hand(handle, ids, scorer, budget, chunk):
    """The reference: the prompt split by hand (the remainder first, then whole chunks), each chunk prefilled on the
    state with the scorer's queries recorded, and the state compressed after every chunk but the last while it
    holds more than the budget. Returns the state and the entries per head it held after each chunk."""
    sizes, bounds = [], list(range(ids.shape[1], 0, -chunk))[::-1]
    starts = [0] + bounds[:-1]
    state = None
    for i, (start, stop) in enumerate(zip(starts, bounds)):
        state, _ = prefill(handle, ids[:, start:stop], state, record_queries=scorer.query_window)
        sizes.append(state.attended())  # entries per head, on average over heads and layers (adaptive allocations)
        if i < len(bounds) - 1 and state.attended() > budget.tokens:
            state = compress(handle, state, scorer, budget)
    return state, sizes


@pytest.mark.parametrize("scorer_name", ["knorm", "snapkv", "h2o", "knorm@model"])
def test_chunked_prefill_equals_cuts_made_by_hand(smollm, prompt, scorer_name):
    scorer, budget, chunk = make_scorer(scorer_name), Budget(tokens=48), 80
    state, done = prefill_chunked(smollm, prompt, scorer, budget, chunk)
    reference, sizes = chunked_by_hand(smollm, prompt, scorer, budget, chunk)
    assert done.peak == max(sizes) <= budget.tokens + chunk  # never more than budget + C entries per head
    assert done.chunks == len(sizes) == 5 and done.cut_s > 0
    assert state.next_position == reference.next_position == CONTEXT
    for mine, theirs in zip(state.positions, reference.positions):
        assert torch.equal(mine, theirs)
    assert torch.allclose(state.logits, reference.logits, atol=1e-5)
    window = scorer.query_window  # the last chunk's queries stay recorded, for the final cut the caller makes
    if window == 0:
        assert state.recorded is None
    else:
        assert state.recorded[0].rows == (chunk if window == ALL_QUERIES else window)


def test_generate_with_a_chunked_prefill(smollm):
    context = load_essays()[4].text[:1500]
    scorer = make_scorer("knorm")
    once = generate(smollm, context, " Summarize.", scorer, Budget(tokens=64), max_new_tokens=4)
    chunked = generate(smollm, context, " Summarize.", scorer, Budget(tokens=64), max_new_tokens=4, prefill_chunk=96)
    assert chunked.prefill_chunk == 96 and chunked.cache_tokens_peak <= 64 + 96 < once.cache_tokens_peak
    assert chunked.cache_tokens_compressed == once.cache_tokens_compressed == 64
    assert (chunked.cache_bytes_full, chunked.cache_bytes_compressed) == (once.cache_bytes_full,
                                                                          once.cache_bytes_compressed)
    whole = generate(smollm, context, " Summarize.", scorer, Budget(tokens=64), max_new_tokens=4, prefill_chunk=10**6)
    assert whole.token_ids == once.token_ids and whole.cache_tokens_peak == once.cache_tokens_peak  # one chunk
    ratio = generate(smollm, context, " Summarize.", scorer, Budget(ratio=0.75), "question-agnostic", 2,
                     prefill_chunk=64)
    assert ratio.cache_tokens_compressed == Budget(ratio=0.75).kept(ratio.context_tokens)  # of the whole prompt
    assert ratio.budget == "r0.75" and ratio.budget_shortfall is None
    assert ratio.cache_tokens_peak <= ratio.cache_tokens_compressed + 64


def test_chunked_prefill_refusals(smollm, prompt):
    budget = Budget(tokens=48)
    with pytest.raises(KVPError, match="re-reads the whole text"):
        prefill_chunked(smollm, prompt, make_scorer("kvzip"), budget, 64)
    with pytest.raises(KVPError, match="smaller than the 4 sinks \\+ 16 recent"):
        prefill_chunked(smollm, prompt, make_scorer("knorm"), budget, 16)
    with pytest.raises(KVPError, match="use --prefill-chunk 65 or more"):
        prefill_chunked(smollm, prompt, make_scorer("snapkv"), budget, 32)  # SnapKV reads the last 65 queries
    with pytest.raises(KVPError, match="leave a first chunk of 50: more than the budget"):
        prefill_chunked(smollm, prompt, make_scorer("snapkv"), budget, 70)
    with pytest.raises(KVPError, match="a number of entries per head"):
        prefill_chunked(smollm, prompt, make_scorer("knorm"), Budget(ratio=0.5), 64)
    with pytest.raises(KVPError, match="give both"):
        generate(smollm, "text", "?", None, None, prefill_chunk=64)

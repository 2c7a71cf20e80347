"""KVPolicyPress: our scorers inside kvpress, through its forward hook and its text-generation pipeline."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, pipeline

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import compress, generate, prefill
from kvpolicy.compression.press import KVPolicyPress
from kvpolicy.compression.scorers import ALL_QUERIES, make_scorer
from kvpolicy.data.essays import load_essays
from kvpolicy.errors import KVPError


def test_press_needs_a_scorer():
    with pytest.raises(KVPError, match="scorer"):
        KVPolicyPress(compression_ratio=0.5)


@pytest.mark.model
@pytest.mark.parametrize("name", ["knorm", "snapkv"])
def test_press_keeps_what_the_engine_keeps(smollm, name):
    prompt = smollm.encode(load_essays()[6].text)[:, :300]
    full, _ = prefill(smollm, prompt, record_queries=ALL_QUERIES)
    ours = compress(smollm, full, make_scorer(name), Budget(ratio=0.7))  # default sinks 4, recent 16 on both sides
    cache = DynamicCache()
    with torch.no_grad(), KVPolicyPress(compression_ratio=0.7, scorer=make_scorer(name))(smollm.model):
        smollm.model.model(input_ids=prompt, past_key_values=cache)
    for idx, layer in enumerate(cache.layers):
        theirs = torch.cdist(layer.keys, full.layer(idx)[0]).argmin(dim=-1).sort(dim=-1).values
        assert torch.equal(ours.positions[idx], theirs), f"layer {idx}"
        assert set(range(4)) | set(range(284, 300)) <= set(theirs[0, 0].tolist())


@pytest.mark.model
@pytest.mark.parametrize("name", ["knorm", "snapkv"])
def test_press_in_kvpress_pipeline_answers_like_the_engine(smollm, name):
    context = load_essays()[7].text[:700]
    question = " What is the main point of this text?"
    pipe = pipeline("kv-press-text-generation", model=smollm.model, tokenizer=smollm.tokenizer, device="cpu")
    press = KVPolicyPress(compression_ratio=0.5, scorer=make_scorer(name))
    answer = pipe(context, question=question, press=press, max_new_tokens=6)["answer"]
    ours = generate(smollm, context, question, make_scorer(name), Budget(ratio=0.5), "question-agnostic", 6)
    assert answer and answer == ours.text
    assert ours.cache_tokens_compressed == Budget(ratio=0.5).kept(ours.context_tokens)

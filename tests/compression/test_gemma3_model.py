"""The real Gemma 3 270M (a hybrid model: 15 sliding-window layers, 3 full-attention ones), fp32, on a prompt longer
than its 512-token window: its converted tokenizer is the GGUF's, the engine answers as transformers' own generate
with a full cache and with any budget >= the length, and `model.generate` with `EvictingCache` answers as the engine
under eviction."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import compress, greedy_decode, prefill
from kvpolicy.compression.evicting_cache import EvictingCache
from kvpolicy.compression.prompts import split_prompt
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.data.essays import load_essays
from kvpolicy.models.gguf_tokenizer import GGUFVocabulary, reference_tokenize
from kvpolicy.models.loader import assemble_chunks
from kvpolicy.models.registry import MODELS

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread")]

NEW = 8


@pytest.fixture(scope="module")
def ids(gemma):
    essay = " ".join(load_essays()[3].text.split()[:440])
    context = "Remember this: the secret code is 4721. " + essay
    return torch.cat(split_prompt(gemma, context, "What is the secret code?", "The secret code is"), dim=1)


def test_the_layout_and_the_converted_tokenizer(gemma, tmp_path):
    info = gemma.info
    assert (info.n_layers, info.n_kv_heads, info.head_dim, info.evicted_layers) == (3, 1, 256, [5, 11, 17])
    assert info.layer_windows.count(512) == 15
    spec = MODELS["gemma3-270m"]
    vocabulary = GGUFVocabulary.read(assemble_chunks(spec, tmp_path / spec.gguf_file))
    text = load_essays()[5].text[:6000] + "\n\n  indented\tcode <b>tags</b> é 🙂"
    # the tokenizer as saved in the converted cache and read back: the round trip keeps every merge and added token
    assert gemma.tokenizer(text, add_special_tokens=False).input_ids == reference_tokenize(vocabulary, text)


def _engine(gemma, ids, budget: Budget | None = None) -> list[int]:
    state, _ = prefill(gemma, ids)
    if budget is not None:
        state = compress(gemma, state, make_scorer("knorm"), budget)
    return greedy_decode(gemma, state, state.logits, NEW, stop_ids=[])


def test_full_cache_and_a_budget_of_the_length_answer_as_transformers(gemma, ids):
    assert ids.shape[1] > 560  # past the sliding window
    out = gemma.model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    reference = out[0, ids.shape[1]:].tolist()
    assert "4721" in gemma.decode(reference)
    assert _engine(gemma, ids) == reference
    assert _engine(gemma, ids, Budget(tokens=ids.shape[1])) == reference


def test_model_generate_with_evicting_cache_answers_as_the_engine(gemma, ids):
    budget = Budget(tokens=128)
    cache = EvictingCache(make_scorer("knorm"), budget, config=gemma.model.config)
    out = gemma.model.generate(ids, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == _engine(gemma, ids, budget)
    assert [layer.keys.shape[2] for layer in cache.layers[5::6]] == [128 + NEW - 1] * 3

"""`EvictingCache` inside transformers' own `model.generate`, on the real SmolLM2 in fp32: the same answers as
kvpolicy's engine at the same budget (after the prefill, and with `every` while decoding), rows of a left-padded
batch answered as each is alone, generate's features kept (sampling, streamers), bad settings refused in one
line."""

from __future__ import annotations

import pytest
import torch
from transformers import TextIteratorStreamer

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import BoundedDecoding, generate
from kvpolicy.compression.evicting_cache import EvictingCache
from kvpolicy.compression.prompts import split_prompt
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.compression.scorers.learned import load_policy
from kvpolicy.errors import KVPError

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread")]

FILLER = "The river ran on past the mill and the grey houses. "
PROMPTS = [("The secret code is 4721. " + FILLER * 14, "What is the secret code?"),
           ("Mara keeps her bicycle in the blue shed. " + FILLER * 9, "Where is the bicycle?")]


def _ids(handle, context: str, question: str) -> torch.Tensor:
    return torch.cat(split_prompt(handle, context, question, ""), dim=1)


def _hf_answer(handle, ids: torch.Tensor, cache: EvictingCache, mask: torch.Tensor | None = None, **kw) -> list:
    mask = torch.ones_like(ids) if mask is None else mask
    out = handle.model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                                pad_token_id=handle.tokenizer.eos_token_id, **kw)
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("scorer", ["kvp", "knorm"])
def test_model_generate_answers_as_the_engine_does(smollm, scorer):
    policy = load_policy(model=smollm) if scorer == "kvp" else make_scorer(scorer)
    context, question = PROMPTS[0]
    ours = generate(smollm, context, question, policy, Budget(tokens=48), max_new_tokens=10)
    cache = EvictingCache(policy, 48)
    (answer,) = _hf_answer(smollm, _ids(smollm, context, question), cache, max_new_tokens=10)
    assert answer == ours.token_ids[:len(answer)] and len(answer) == len(ours.token_ids)
    assert cache.layers[0].keys.shape[2] == 48 + len(answer) - 1  # the cut prompt, then each token fed but the last
    assert cache.get_seq_length() == ours.cache_tokens_full + len(answer) - 1  # tokens fed: where the next one goes


def test_every_keeps_decoding_within_the_budget_as_bounded_decoding_does(smollm):
    policy = load_policy(model=smollm)
    context, question = PROMPTS[1]
    budget = Budget(tokens=40)
    ours = generate(smollm, context, question, policy, budget, max_new_tokens=24,
                    bounded=BoundedDecoding(policy, budget, every=4))
    cache = EvictingCache(policy, budget, every=4)
    (answer,) = _hf_answer(smollm, _ids(smollm, context, question), cache, max_new_tokens=24)
    assert answer == ours.token_ids
    assert all(layer.keys.shape[2] <= 40 + 4 for layer in cache.layers)


def test_a_left_padded_batch_answers_each_row_as_it_is_alone(smollm):
    policy = load_policy(model=smollm)
    rows = [_ids(smollm, *prompt)[0] for prompt in PROMPTS]
    width = max(len(r) for r in rows)
    pad = smollm.tokenizer.eos_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
                        for r in rows])
    assert mask[1, 0] == 0  # the second prompt is the shorter: padded
    for budget in (48, width):  # rows cut to the budget; a budget above the shorter row keeps its padding masked
        cache = EvictingCache(policy, budget, padding_mask=mask)
        batched = _hf_answer(smollm, ids, cache, mask, max_new_tokens=8, min_new_tokens=8)
        alone = [_hf_answer(smollm, r[None], EvictingCache(policy, budget), max_new_tokens=8, min_new_tokens=8)[0]
                 for r in rows]
        assert batched == alone, budget
    cache = EvictingCache(policy, 48, padding_mask=mask)
    _hf_answer(smollm, ids, cache, mask, max_new_tokens=1)
    positions = cache.true_positions(0)
    assert bool((positions[1] >= 0).all())  # the padded row kept none of its padding


def test_sampling_and_streamers_work_through_the_cache(smollm):
    policy = load_policy(model=smollm)
    ids = _ids(smollm, *PROMPTS[0])
    streamer = TextIteratorStreamer(smollm.tokenizer, skip_prompt=True)
    torch.manual_seed(0)
    out = smollm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=True,
                                top_p=0.9, past_key_values=EvictingCache(policy, 32), streamer=streamer)
    streamed = "".join(streamer)
    assert streamed.strip() and smollm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) in streamed


def test_bad_settings_are_one_line_errors(smollm):
    policy = load_policy(model=smollm)
    with pytest.raises(KVPError, match="attention-free scorer"):
        EvictingCache(make_scorer("snapkv"), 32)
    with pytest.raises(KVPError, match="kvpolicy scorer"):
        EvictingCache("kvp", 32)
    with pytest.raises(KVPError, match="every=N keeps decoding within a budget of entries"):
        EvictingCache(policy, Budget(ratio=0.5), every=8)
    with pytest.raises(KVPError, match="allocation"):
        EvictingCache(make_scorer("knorm@layer"), 32)
    with pytest.raises(KVPError, match="padded on the right"):
        EvictingCache(policy, 32, padding_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))

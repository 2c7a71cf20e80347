"""`kvp.generate` with defaults and lists: a full cache by default, scorers by name and budgets as numbers, a list of
prompts of different lengths decoded as one batch where each row answers exactly as it does alone (real SmolLM2,
fp32, greedy), wrong types refused in one line."""

from __future__ import annotations

import pytest

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import BoundedDecoding, generate
from kvpolicy.compression.scorers.learned import load_policy
from kvpolicy.errors import KVPError

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread")]

FILLER = "The river ran on past the mill and the grey houses. "
CONTEXTS = ["The secret code is 4721. " + FILLER * 12, "Mara keeps her bicycle in the blue shed. " + FILLER * 7,
            "The meeting moved to Thursday at noon. " + FILLER * 3]
QUESTIONS = ["What is the secret code?", "Where is the bicycle?", "When is the meeting?"]


def test_defaults_give_the_full_cache_and_names_and_numbers_are_taken(smollm):
    full = generate(smollm, CONTEXTS[0], QUESTIONS[0], max_new_tokens=6)
    assert full.scorer is None and full.cache_tokens_compressed == full.cache_tokens_full and full.batch_rows == 1
    assert generate(smollm, CONTEXTS[0] + QUESTIONS[0], max_new_tokens=3).token_ids  # a prompt alone
    named = generate(smollm, CONTEXTS[0], QUESTIONS[0], "kvp", 48, max_new_tokens=6)
    spelled = generate(smollm, CONTEXTS[0], QUESTIONS[0], load_policy(model=smollm), Budget(tokens=48),
                       max_new_tokens=6)
    assert named.scorer == spelled.scorer and named.token_ids == spelled.token_ids
    assert named.cache_tokens_compressed == 48


def test_a_list_of_prompts_decodes_as_one_batch_each_row_as_alone(smollm):
    """With bounded decoding, so that the batch is also cut while decoding (each row as it is alone); without it the
    README example checks a batched row against the prompt alone."""
    policy = load_policy(model=smollm)
    budget = Budget(tokens=40)
    bounded = BoundedDecoding(policy, budget, every=4)
    batch = generate(smollm, CONTEXTS, QUESTIONS, policy, budget, max_new_tokens=12, bounded=bounded)
    alone = [generate(smollm, c, q, policy, budget, max_new_tokens=12, bounded=bounded)
             for c, q in zip(CONTEXTS, QUESTIONS)]
    assert len({r.prompt_tokens for r in batch}) == 3  # the rows really differ in length
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.cache_tokens_compressed for r in batch] == [40, 40, 40] and {r.batch_rows for r in batch} == {3}
    seen = []
    generate(smollm, CONTEXTS[:2], QUESTIONS[1], policy, budget, max_new_tokens=3,
             on_token=lambda row, token: seen.append(row))  # one question for every context
    assert set(seen) == {0, 1}


def test_wrong_types_are_one_line_errors(smollm):
    with pytest.raises(KVPError, match="prompts are text"):
        generate(smollm, 42)
    with pytest.raises(KVPError, match="the model from kvp.load_model"):
        generate("smollm2-135m", "hello")
    with pytest.raises(KVPError, match="budget is a kvp.Budget or a number"):
        generate(smollm, "hello", "", "knorm", "half")
    with pytest.raises(KVPError, match="give both a scorer and a budget"):
        generate(smollm, "hello", "", "knorm")
    with pytest.raises(KVPError, match="3 contexts and 2 questions"):
        generate(smollm, CONTEXTS, QUESTIONS[:2])
    with pytest.raises(KVPError, match="empty list"):
        generate(smollm, [])

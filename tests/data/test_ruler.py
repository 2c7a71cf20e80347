"""RULER-style generator: sizing in the model's tokens, determinism, disjoint splits, task content, metrics."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from transformers import DynamicCache

from kvpolicy.data.ruler import (EXTRA_TASKS, NOISE, RULER_TASKS, TASKS, make_sample, make_samples, score_prediction,
                                 string_match_all, string_match_part)
from kvpolicy.data.splits import SPLITS
from kvpolicy.errors import KVPError
from kvpolicy.traces.record import greedy_continuation


def test_metrics_are_rulers():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("KVQED lfibe", ["kvqed", "LFIBE"]) == 1.0
    assert string_match_part("The numbers are 123 and 456.", ["789", "456"]) == 1.0
    assert string_match_part("nothing here", ["789", "456"]) == 0.0


@pytest.mark.model
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_fits_the_context_and_holds_its_answers(smollm, task):
    target = 512
    s = make_sample(task, smollm, target, seed=0, sample_id=3, split="train")
    assert s.length == smollm.encode(s.prompt).shape[1]
    # filler unit: a word, ~25 tokens of noise, ~60 of a distractor needle, a line of code
    slack = {"essay": 4, "noise": 30, "needle": 80, "code": 80}[TASKS[task].haystack]
    assert target - slack <= s.length <= target
    assert s.prompt == s.prompt_context + s.prompt_question and s.prompt.endswith(s.answer_prefix)
    assert s.prompt_context.endswith(s.context) and s.question in s.prompt_question
    assert s.answers and s.metric == "all" and s.max_new_tokens > 0
    assert s.reference.strip(" .") == ", ".join(s.answers)
    spec = TASKS[task]
    if spec.kind == "niah":
        for answer in s.answers:
            assert f"is: {answer}." in s.context
        assert len(s.answers) == spec.n_values * spec.n_queries
        if spec.haystack == "noise":
            assert NOISE in s.context
        if spec.haystack == "code":  # needles are comment lines among the standard library's lines
            assert re.search(rf"\n# One of the special magic numbers for .+ is: {s.answers[0]}\.\n", s.context)
            assert "def " in s.context or "import " in s.context
    elif spec.kind == "vt":
        first, *rest = s.answers
        assert re.search(rf"VAR {first} = \d{{5}}\.", s.context)
        for a, b in zip(s.answers, rest):
            assert f"VAR {b} = VAR {a}." in s.context
    elif spec.kind == "cwe":
        words = Counter(re.findall(r"\d+\. (\w+)", s.context))
        top = {w for w, _ in words.most_common(len(s.answers))}
        assert top == set(s.answers) and min(words[a] for a in s.answers) > max(
            c for w, c in words.items() if w not in s.answers)
    else:  # fwe: the three most frequent coded words after the "...." noise
        words = Counter(s.context.split("words. ", 1)[1].split())
        assert [w for w, _ in words.most_common(4)][1:] == list(s.answers)


def test_extra_tasks_stay_out_of_the_default_cycle():
    assert set(EXTRA_TASKS) == {"niah_code"} and not set(EXTRA_TASKS) & set(RULER_TASKS)
    assert len(RULER_TASKS) == 11  # RULER's own tasks: `--task ruler` and the trace mix cycle over these


@pytest.mark.model
def test_samples_are_deterministic_and_splits_disjoint(smollm):
    a = make_sample("niah_multikey_1", smollm, 300, seed=0, sample_id=5, split="train")
    assert a == make_sample("niah_multikey_1", smollm, 300, seed=0, sample_id=5, split="train")
    prompts = {split: {make_sample("niah_single_2", smollm, 300, 0, i, split).prompt for i in range(4)}
               for split in SPLITS}
    for i, x in enumerate(SPLITS):
        assert len(prompts[x]) == 4
        for y in SPLITS[i + 1:]:
            assert not prompts[x] & prompts[y]
    other_seed = make_sample("niah_multikey_1", smollm, 300, seed=1, sample_id=5, split="train")
    assert other_seed.answers != a.answers and other_seed.id != a.id
    batch = make_samples(smollm, 300, 3, "val", tasks=("vt", "cwe"))
    assert [s.task for s in batch] == ["vt", "cwe", "vt"] and [s.sample_id for s in batch] == [0, 1, 2]


@pytest.mark.model
def test_bad_requests_are_refused(smollm):
    with pytest.raises(KVPError, match="unknown RULER task"):
        make_sample("qa_1", smollm, 512, 0, 0)
    with pytest.raises(KVPError, match="unknown split"):
        make_sample("vt", smollm, 512, 0, 0, split="dev")
    with pytest.raises(KVPError, match="too few for RULER task"):
        make_sample("niah_multivalue", smollm, 60, 0, 0)


@pytest.mark.model
def test_smollm_finds_the_needle_with_the_full_cache(smollm):
    """SmolLM2 is weak, but single-needle retrieval at ~1.2K tokens works (greedy, chat template, answer prefix)."""
    s = make_sample("niah_single_2", smollm, 1200, seed=0, sample_id=0, split="eval")
    ids = smollm.encode(s.prompt)
    cache = DynamicCache(config=smollm.model.config)
    with torch.inference_mode():
        logits = smollm.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        tokens = greedy_continuation(smollm, cache, logits, 16)
    prediction = smollm.decode(tokens)
    assert score_prediction(s, prediction) == 1.0, prediction

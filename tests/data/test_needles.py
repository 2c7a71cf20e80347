"""Evaluation-only needle tasks: their haystacks are text no trace source reads, their phrasing is not RULER's, and
they are sized, deterministic and answerable like the RULER-style tasks."""

from __future__ import annotations

import re

import pytest

from kvpolicy.data import needles
from kvpolicy.data.dialogue import split_of
from kvpolicy.data.needles import NEEDLE_TASKS, chat_units, code_units, make_needle_sample
from kvpolicy.data.ruler import RULER_TASKS, make_sample
from kvpolicy.data.sharegpt import iter_conversations
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.tasks import resolve_tasks


def test_the_chat_haystack_is_only_eval_split_replies():
    eval_lines, other_lines = set(), set()
    taken = 0
    for conversation in iter_conversations():
        lines = {line.strip() for t in conversation.turns if t.role == "assistant" for line in t.text.splitlines()}
        if split_of(conversation.id) == needles.SPLIT and taken < needles.CHAT_CONVERSATIONS:
            eval_lines |= lines
            taken += 1
        elif split_of(conversation.id) != needles.SPLIT:
            other_lines |= lines
        if taken == needles.CHAT_CONVERSATIONS and len(other_lines) > 50_000:
            break
    units = set(chat_units())
    assert units <= eval_lines and len(units) > 10_000
    # lines shared with train/val/test replies are generic ("Sure!", code braces), not conversations
    assert len(units & other_lines) < 0.05 * len(units)


def test_the_code_haystack_is_python_source():
    units = code_units()
    assert len(units) > 10_000 and any(line.startswith("class ") for line in units)
    assert any("def forward(self" in line for line in units)


@pytest.mark.model
@pytest.mark.parametrize("task", sorted(NEEDLE_TASKS))
def test_needle_samples_fit_hold_one_needle_and_are_deterministic(smollm, task):
    target = 512
    s = make_needle_sample(task, smollm, target, seed=0, sample_id=2)
    assert target - 120 <= s.length <= target and s.length == smollm.encode(s.prompt).shape[1]
    assert s.prompt == s.prompt_context + s.prompt_question and s.prompt.endswith(s.answer_prefix)
    (answer,) = s.answers
    assert s.context.count(answer) == 1 and answer not in s.question and s.task == f"needle:{task}"
    assert "special magic" not in s.prompt  # not the training generator's phrasing
    again = make_needle_sample(task, smollm, target, seed=0, sample_id=2)
    other = make_needle_sample(task, smollm, target, seed=0, sample_id=3)
    assert again == s and other.answers != s.answers and other.context != s.context
    if task == "chat":
        assert re.fullmatch(r"\d\d-\d\d-\d\d", answer) and "locker combination" in s.question
    else:
        assert re.search(rf'= "{answer}"', s.context) and "```python" in s.context


@pytest.mark.model
def test_no_ruler_prompt_uses_the_needle_phrasings(smollm):
    for i, task in enumerate(RULER_TASKS):
        prompt = make_sample(task, smollm, 320, seed=0, sample_id=i, split="train").prompt
        assert "locker combination" not in prompt and "DEPLOY_TOKEN_" not in prompt


def test_needle_tasks_are_registered_and_unknown_ones_refused():
    names = [t.name for t in resolve_tasks(["needles", "needle:chat"])]
    assert names == ["needle:chat", "needle:code"]
    (task,) = resolve_tasks(["needle:code"])
    assert task.family == "evaluation-only needles" and task.corpus is None and "torch.nn" in task.data
    with pytest.raises(KVPError, match="unknown task 'needle:essay'.*needle:TASK"):
        resolve_tasks(["needle:essay"])
    with pytest.raises(KVPError, match="unknown evaluation-only needle task 'x'"):
        make_needle_sample("x", None, 512, 0, 0)

"""Evaluation-only needle tasks: their haystacks are text no trace source reads, their phrasing is not RULER's, and
they are sized, deterministic and answerable like the RULER-style tasks."""

from __future__ import annotations

import csv
import json
import random
import re

import pytest

from kvpolicy.data import needles, ruler, tables
from kvpolicy.data.dialogue import joined_conversations, labelled_parts
from kvpolicy.data.needles import NEEDLE_TASKS, chat_units, code_units, conversation_units, make_needle_sample
from kvpolicy.data.ruler import RULER_TASKS, make_sample
from kvpolicy.errors import KVPError
from kvpolicy.evaluation import sweep
from kvpolicy.evaluation.store import read_results
from kvpolicy.evaluation.tasks import resolve_tasks

NEW_KINDS = ("json", "csv", "conversation")  # the kinds added after chat and code


def _fenced(context: str, language: str) -> str:
    """The body of the context's one fenced block of `language`."""
    (body,) = re.findall(rf"```{language}\n(.*?)\n```", context, flags=re.S)
    return body


def test_the_chat_haystack_is_only_eval_split_replies():
    eval_lines, other_lines = set(), set()
    taken = 0
    for split, conversation in labelled_parts():
        lines = {line.strip() for t in conversation.turns if t.role == "assistant" for line in t.text.splitlines()}
        if split == needles.SPLIT and taken < needles.CHAT_CONVERSATIONS:
            eval_lines |= lines
            taken += 1
        elif split != needles.SPLIT:
            other_lines |= lines
        if taken == needles.CHAT_CONVERSATIONS and len(other_lines) > 50_000:
            break
    units = set(chat_units())
    assert units <= eval_lines and len(units) > 10_000
    # lines shared with train/val/test replies are generic ("Sure!", code braces), not conversations
    assert len(units & other_lines) < 0.05 * len(units)


def test_the_conversation_haystack_is_only_long_whole_eval_split_conversations():
    conversations = needles.long_conversations()
    eval_ids = {c.id for c in joined_conversations(needles.SPLIT)}
    assert len(conversations) > 100 and all(c.id in eval_ids for c in conversations)
    assert all(len(c.turns) >= needles.MIN_CONVERSATION_TURNS and c.turns[0].role == "user" for c in conversations)
    units, starts = conversation_units()
    assert len(starts) == len(conversations) and all(units[i].startswith(needles.USER) for i in starts)
    eval_lines, other_lines = set(), set()
    for split, conversation in labelled_parts():
        lines = {line.rstrip() for t in conversation.turns for line in t.text.splitlines()}
        (eval_lines if split == needles.SPLIT else other_lines).update(lines)
    text = {u.removeprefix(needles.USER).removeprefix(needles.ASSISTANT) for u in units}
    assert text <= eval_lines
    # lines shared with train/val/test conversations are short and generic ("Sure!", "Thank you!", code braces)
    shared = text & other_lines
    assert len(shared) < 0.1 * len(text) and max(map(len, shared)) < needles.SHARED_LINE_CHARS


def test_table_records_are_drawn_from_the_word_lists_only():
    record = tables.inventory_record(random.Random(0))
    assert record["warehouse"] in tables.CITIES and re.fullmatch(r"[A-Z]\d-\d\d-[A-Z]", record["bin"])
    assert re.fullmatch(r"[A-Z]{2}-\d\d/x", tables.draw_code(random.Random(0), "LL-DD/x"))
    needle = tables.shipment_record(random.Random(1))
    filler = tables.SHIPMENTS.filler(salt=7, size=300, needle=needle)
    assert filler[:40] == tables.SHIPMENTS.filler(salt=7, size=40, needle=needle)  # a prefix, as bisection needs
    shown = (needle["shipment_id"], needle["tracking_code"])
    assert not any(s in str(v) for r in filler for v in r.values() for s in shown)


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
    elif task == "code":
        assert re.search(rf'= "{answer}"', s.context) and "```python" in s.context


@pytest.mark.model
@pytest.mark.parametrize("target", [192, 384, 1024])
@pytest.mark.parametrize("task", NEW_KINDS)
def test_new_needle_kinds_fit_each_context(smollm, task, target):
    for sample_id in range(2):
        s = make_needle_sample(task, smollm, target, seed=1, sample_id=sample_id)
        assert target - 150 <= s.length <= target and s.length == smollm.encode(s.prompt).shape[1]
        (answer,) = s.answers
        assert s.context.count(answer) == 1 and answer not in s.question
        assert make_needle_sample(task, smollm, target, seed=1, sample_id=sample_id) == s
        assert make_needle_sample(task, smollm, target, seed=2, sample_id=sample_id).answers != s.answers


@pytest.mark.model
def test_the_json_haystack_is_an_inventory_array_with_one_record_of_the_asked_sku(smollm):
    s = make_needle_sample("json", smollm, 512, seed=0, sample_id=1)
    records = json.loads(_fenced(s.context, "json"))
    assert len(records) > 5 and all(list(r) == ["sku", "product", "warehouse", "quantity", "bin"] for r in records)
    assert all(r["warehouse"] in tables.CITIES and r["product"].split(" ", 1)[1] in tables.PRODUCTS for r in records)
    (sku,) = re.findall(r"SKU ([A-Z]{2}-\d{4})", s.question)
    (needle,) = [r for r in records if r["sku"] == sku]
    assert needle["bin"] == s.answers[0] and s.answer_prefix.endswith("stored in bin")


@pytest.mark.model
def test_the_csv_haystack_is_a_shipment_log_with_one_row_of_the_asked_shipment(smollm):
    s = make_needle_sample("csv", smollm, 512, seed=0, sample_id=1)
    rows = list(csv.DictReader(_fenced(s.context, "csv").splitlines()))
    assert len(rows) > 5 and all(list(r) == list(tables.shipment_record(random.Random(0))) for r in rows)
    assert all(r["origin"] in tables.CITIES and r["carrier"] in tables.CARRIERS and None not in r for r in rows)
    (shipment,) = re.findall(r"shipment (SH\d{6})", s.question)
    (needle,) = [r for r in rows if r["shipment_id"] == shipment]
    assert needle["tracking_code"] == s.answers[0]


@pytest.mark.model
def test_the_conversation_needle_opens_a_real_transcript_and_is_asked_at_the_end(smollm):
    s = make_needle_sample("conversation", smollm, 512, seed=0, sample_id=1)
    (answer,) = s.answers
    lines = s.context.split("\n\n", 1)[1].strip().splitlines()
    assert lines[0] == f"{needles.USER}Before we start, a note for later: my booking reference is {answer}."
    units = set(conversation_units()[0])
    assert lines[2:] and set(lines[2:]) <= units and needles.USER + lines[1] in units
    assert any(line.startswith(needles.ASSISTANT) for line in lines) and s.context.find(answer) < 200
    assert "booking reference" in s.question and re.fullmatch(r"[A-Z]{3}-\d{4}", answer)


@pytest.mark.model
def test_no_ruler_prompt_uses_the_needle_phrasings(smollm):
    for i, task in enumerate(RULER_TASKS):
        prompt = make_sample(task, smollm, 320, seed=0, sample_id=i, split="train").prompt
        assert "locker combination" not in prompt and "DEPLOY_TOKEN_" not in prompt
        assert not any(p in prompt for p in ("booking reference", "```json", "```csv", "tracking code", "SKU"))


@pytest.mark.model
def test_a_sweep_scores_the_json_needle(smollm, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "load_model", lambda *a, **k: smollm)
    out = tmp_path / "r.jsonl"
    config = sweep.SweepConfig(out=str(out), tasks=["needle:json"], context_tokens=[384], n_samples=1,
                               scorers=["knorm"], budgets=["64"], max_new_tokens=16, protocols=["query-aware"])
    assert sweep.run_sweep(config).written == 2  # knorm and the full cache
    records = read_results(out).records
    assert {r.scorer for r in records} == {"knorm", "full"} and all(r.task == "needle:json" for r in records)
    assert all(r.value in (0.0, 1.0) and r.data == NEEDLE_TASKS["json"].data for r in records)


def test_needle_tasks_are_registered_and_unknown_ones_refused():
    names = [t.name for t in resolve_tasks(["needles", "needle:chat"])]
    assert names == ["needle:chat", "needle:code", "needle:json", "needle:csv", "needle:conversation"]
    # out of distribution by construction: more evaluation-only kinds than the RULER-style needles' haystacks
    assert len(NEEDLE_TASKS) > len(ruler.HAYSTACKS)
    assert "JSON" in resolve_tasks(["needle:json"])[0].data and "CSV" in resolve_tasks(["needle:csv"])[0].data
    (task,) = resolve_tasks(["needle:code"])
    assert task.family == "evaluation-only needles" and task.corpus is None and "torch.nn" in task.data
    with pytest.raises(KVPError, match="unknown task 'needle:essay'.*needle:TASK"):
        resolve_tasks(["needle:essay"])
    with pytest.raises(KVPError, match="unknown evaluation-only needle task 'x'"):
        make_needle_sample("x", None, 512, 0, 0)

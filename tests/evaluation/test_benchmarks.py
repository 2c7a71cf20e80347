"""Benchmarks: metrics against slow references, the task registry, hub tasks on schema fixtures, prompts,
dialogue chunking and choice answering on the real model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kvpolicy.data.records import Conversation, QASample, Turn
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.metrics import lcs_length, lcs_length_reference, retrieval_score, rouge_l
from kvpolicy.evaluation.lineup import parse_budget
from kvpolicy.evaluation.names import QUESTION_AGNOSTIC
from kvpolicy.evaluation.tasks import resolve_tasks
from kvpolicy.evaluation.tasks.dialogue import ending_with_answer
from kvpolicy.evaluation.tasks.ruler import ruler_score

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hub"
LOCAL = {"ruler-4k": str(FIXTURES / "ruler.jsonl"), "boolq": str(FIXTURES / "boolq.jsonl"),
         "arc_challenge": str(FIXTURES / "arc_challenge.jsonl"), "gov_report": str(FIXTURES / "gov_report.jsonl"),
         "passage_retrieval_en": str(FIXTURES / "passage_retrieval_en.jsonl"), "oasst2": str(FIXTURES / "oasst2.jsonl")}


def test_lcs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == lcs_length_reference(a, b), (a, b)


def test_rouge_l_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("dogs bark", "cats meow") == 0.0
    # LCS "the cat the mat" = 4 of 6 predicted and 4 of 5 reference words
    f1 = 2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5)
    assert rouge_l("the cat sat on the mat", "the cat and the mat") == pytest.approx(f1)
    assert rouge_l("", "anything") == 0.0


def test_retrieval_score_is_share_of_correct_numbers():
    assert retrieval_score("Paragraph 2", ["Paragraph 2"]) == 1.0
    assert retrieval_score("Paragraph 2 or Paragraph 5", ["Paragraph 2"]) == 0.5
    assert retrieval_score("I do not know", ["Paragraph 2"]) == 0.0
    assert retrieval_score("Paragraph 5", ["Paragraph 2", "Paragraph 5"]) == 1.0  # the best reference, as LongBench


def test_ruler_score_all_vs_part():
    sample = QASample(id="x", task="niah_multivalue", context="", question="", answers=("111", "222"))
    assert ruler_score("111 and 222", sample) == 1.0
    assert ruler_score("only 111", sample) == 0.5
    qa = QASample(id="y", task="qa_1", context="", question="", answers=("Paris", "paris, France"))
    assert ruler_score("It is Paris.", qa) == 1.0


def test_budget_parsing():
    assert parse_budget("256").tokens == 256
    assert parse_budget("0.5").ratio == 0.5 and parse_budget("r0.25").ratio == 0.25
    assert parse_budget("b128").tokens == 128
    with pytest.raises(KVPError, match="cannot read budget"):
        parse_budget("lots")
    with pytest.raises(KVPError):
        parse_budget("0")


def test_task_registry_names_and_unknown_tasks():
    tasks = resolve_tasks(["ruler", "ruler:vt", "dialogue"])
    names = [t.name for t in tasks]
    assert len(names) == len(set(names)) == 12 and "ruler:niah_single_1" in names and names[-1] == "dialogue"
    assert all(t.data == "RULER-style tasks over Paul Graham essays (offline stand-in for RULER)" for t in tasks[:11])
    assert tasks[-1].data == "ShareGPT (stand-in for OASST2)"
    with pytest.raises(KVPError, match="unknown task 'squad'.*ruler:TASK.*boolq.*traces:DIR"):
        resolve_tasks(["squad"])
    with pytest.raises(KVPError, match="unknown task 'ruler:nope'"):
        resolve_tasks(["ruler:nope"])


def test_hub_tasks_load_from_fixtures_in_the_hub_schema():
    tasks = {t.name: t for t in resolve_tasks(["ruler-hub:niah_single_2", "boolq", "arc_challenge", "gov_report",
                                                "passage_retrieval_en"], LOCAL)}
    (ruler,) = tasks["ruler-hub:niah_single_2"].load(None, 5, None, 0)
    assert ruler.answers == ("7391842",) and tasks["ruler-hub:niah_single_2"].score("it is 7391842", ruler) == 1.0
    boolq = tasks["boolq"].load(None, 5, None, 0)
    assert [s.answers[0] for s in boolq] == ["yes", "no"] and tasks["boolq"].choices
    assert tasks["boolq"].protocols[0] == QUESTION_AGNOSTIC  # the paper compresses before the question
    assert (tasks["boolq"].metric, tasks["boolq"].extra_metrics) == ("acc", ())  # lm-eval's boolq reports acc only
    (arc,) = tasks["arc_challenge"].load(None, 5, None, 0)
    assert arc.answers[0] in arc.choices and tasks["arc_challenge"].choices
    assert (tasks["arc_challenge"].metric, tasks["arc_challenge"].extra_metrics) == ("acc", ("acc_norm",))
    assert tasks["gov_report"].metric == "rouge_l" and tasks["passage_retrieval_en"].metric == "retrieval_score"
    (gov,) = tasks["gov_report"].load(None, 5, None, 0)
    prompt = tasks["gov_report"].prompt(gov)
    assert gov.context in prompt.context and "summary" in prompt.question and prompt.answer_prefix == "Summary:"
    assert tasks["gov_report"].score(gov.answers[0], gov) == pytest.approx(1.0)
    (passage,) = tasks["passage_retrieval_en"].load(None, 5, None, 0)
    prompt = tasks["passage_retrieval_en"].prompt(passage)
    assert "Paragraph 2: A painter" in prompt.context and passage.question in prompt.question


def test_dialogue_is_cut_after_its_last_assistant_turn():
    conv = Conversation("c", (Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "bye")))
    assert [t.role for t in ending_with_answer(conv).turns] == ["user", "assistant"]
    assert ending_with_answer(Conversation("d", (Turn("assistant", "x"),))) is None


@pytest.mark.model
def test_dialogue_chunks_rebuild_the_chat_text(smollm):
    from kvpolicy.evaluation.perplexity import dialogue_chunks
    from kvpolicy.evaluation.tasks.dialogue import as_sample

    turns = (Turn("user", "What is two plus two?"), Turn("assistant", "Four."), Turn("user", "And three plus three?"),
             Turn("assistant", "Six."), Turn("user", "Thanks! Bye."), Turn("assistant", "Goodbye, have a nice day."))
    conv = Conversation("t", turns)
    rounds, answer = dialogue_chunks(smollm, as_sample(smollm, conv))
    assert len(rounds) == 3
    text = smollm.tokenizer.decode(torch.cat([*rounds, answer], dim=1)[0])
    assert text == smollm.chat(conv.messages(), add_generation_prompt=False).rstrip()
    assert smollm.tokenizer.decode(answer[0]) == "Goodbye, have a nice day.<|im_end|>"
    merged, _ = dialogue_chunks(smollm, as_sample(smollm, conv), min_chunk=40)  # short rounds merge: >= 40 tokens each
    assert all(r.shape[1] >= 40 for r in merged) and torch.equal(torch.cat(merged, 1), torch.cat(rounds, 1))


@pytest.mark.model
def test_oasst2_threads_become_dialogue_samples(smollm):
    (task,) = resolve_tasks(["oasst2"], LOCAL)
    samples = task.load(smollm, 5, None, 0)
    assert samples and all(s.messages[-1]["role"] == "user" and s.reference.endswith("<|im_end|>") for s in samples)


@pytest.mark.model
def test_sharegpt_dialogues_come_from_the_eval_split(smollm):
    (task,) = resolve_tasks(["dialogue"])
    samples = task.load(smollm, 2, 512, 0)
    assert len(samples) == 2 and all(s.split == "eval" and s.length <= 512 for s in samples)
    assert all(s.messages[-1]["role"] == "user" and s.reference for s in samples)


@pytest.mark.model
def test_choice_tasks_pick_the_likeliest_option(smollm):
    from kvpolicy.evaluation.qa import run_qa
    from kvpolicy.evaluation.lineup import FULL_CACHE

    (task,) = resolve_tasks(["boolq"], LOCAL)
    sample = task.load(None, 1, None, 0)[0]
    (outcome,) = run_qa(smollm, task, [sample], QUESTION_AGNOSTIC, [], [], lambda *_: True, 8)
    assert outcome.contender is FULL_CACHE and outcome.fields["prediction"] in ("yes", "no")
    assert outcome.fields["value"] == float(outcome.fields["prediction"] == "yes")
    assert "extra_metrics" not in outcome.fields  # BoolQ reports acc only

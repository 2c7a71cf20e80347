"""Run a question-answering task on one context: prefill once, rank once per scorer, cut to every budget, and
decode the cuts of one size together.

Query-aware: the prompt (context + question) is prefilled once; every scorer ranks that one cache once (its
ranking is budget-agnostic) and each budget is a cut of it, so no prefill is repeated per budget or scorer.
Question-agnostic: the context alone is prefilled and ranked once; after each cut the question is read on the
compressed cache, and several questions about one context share the context's prefill and rankings.
Cuts of equal size (every scorer at one token budget) are stacked into one batch and answered by one batched
greedy decoding: one forward per new token for all scorers instead of one per scorer. Multiple-choice tasks
decode nothing: each choice is scored by its log-likelihood after the prompt, as lm-eval-harness scores them.
With a prefill chunk (`kvp sweep --prefill-chunk C`) nothing is shared: each (scorer, budget) prefills the prompt
C tokens at a time, cutting after each chunk, since every cut depends on the ones before it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import continuation_nll, decode_answers, prefill
from kvpolicy.compression.prompts import split_prompt
from kvpolicy.compression.state import KVState, stack_states
from kvpolicy.data.records import QASample
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.lineup import (FULL_CACHE, Contender, IsMissing, chunked_cuts, cut, missing_budgets,
                                        rank_for_cuts, recording_window)
from kvpolicy.evaluation.metrics import choice_metrics
from kvpolicy.evaluation.outcome import Clock, Outcome
from kvpolicy.evaluation.result import FULL
from kvpolicy.compression.protocols import QUERY_AWARE, QUESTION_AGNOSTIC
from kvpolicy.evaluation.tasks.base import Task
from kvpolicy.models import ModelHandle

PREDICTION_CHARS = 400  # how much of an answer a record keeps
TARGET_DELIMITER = " "  # lm-eval-harness's default between a prompt and each choice ("Answer:" + " yes")
CHOICE_METRICS = ("acc", "acc_norm")  # lm-eval-harness's multiple-choice metrics


@dataclass(frozen=True)
class Prompt:
    """The text a QA task feeds: `context` (compressed in both protocols), then `question` and `answer_prefix`."""

    context: str
    question: str
    answer_prefix: str = ""


def plain_prompt(sample: QASample) -> Prompt:
    return Prompt(sample.context, sample.question, sample.answer_prefix)


@dataclass(frozen=True)
class QATask(Task):
    """A question over a context: load(handle, n, context_tokens, seed) -> QASamples; prompt(sample) -> Prompt;
    score(prediction, sample) -> float in [0, 1] of a generated answer. With `choices` nothing is generated: each
    choice is scored by its log-likelihood after the prompt and `metric` is one of CHOICE_METRICS (lm-eval's acc or
    acc_norm, see evaluation.metrics.choice_metrics). extra_metrics: further metrics each sample records beside
    `metric`. template: read the prompt through the model's chat template (False: the plain text, as lm-eval does).
    saturates: the score never falls as the answer grows (a string match: an answer found stays found), so
    decoding stops a row once it scores 1, which leaves every score as it is (the recorded prediction is then the
    answer up to that point). Question-agnostic samples with one context share its prefill."""

    prompt: Callable[[QASample], Prompt] = field(default=plain_prompt, repr=False)
    score: Callable[[str, QASample], float] = field(default=None, repr=False)
    max_new_tokens: int = 64
    choices: bool = False
    extra_metrics: tuple[str, ...] = ()
    template: bool = True
    saturates: bool = False

    chunked_protocols: ClassVar[tuple[str, ...]] = (QUERY_AWARE, QUESTION_AGNOSTIC)

    def __post_init__(self):
        metrics = (self.metric, *self.extra_metrics)
        if self.choices and not set(metrics) <= set(CHOICE_METRICS):
            raise KVPError(f"task {self.name}: a multiple-choice task reports {', '.join(CHOICE_METRICS)}, not "
                           f"{', '.join(m for m in metrics if m not in CHOICE_METRICS)}")
        if not self.choices and self.extra_metrics:
            raise KVPError(f"task {self.name}: only a multiple-choice task records extra metrics")

    def answer_tokens(self, cap: int) -> int:
        """The answer tokens generated: the task's own maximum, capped by `cap` (0: no cap)."""
        return min(self.max_new_tokens, cap) if cap else self.max_new_tokens

    def positions(self, handle: ModelHandle, samples: list[QASample], max_new_tokens: int) -> tuple[int, str]:
        need = max(qa_positions(handle, self, s, self.answer_tokens(max_new_tokens)) for s in samples)
        return need, "prompt and answer"

    def prefill_groups(self, protocol: str, samples: list[QASample]) -> list[list[QASample]]:
        """Question-agnostic samples with the same context share one prefill; query-aware ones prefill alone."""
        if protocol == QUERY_AWARE:
            return [[s] for s in samples]
        groups: dict[str, list[QASample]] = {}
        for s in samples:
            groups.setdefault(self.prompt(s).context, []).append(s)
        return list(groups.values())

    def outcomes(self, handle: ModelHandle, samples: list[QASample], protocol: str, contenders: list[Contender],
                 budgets: list[Budget], is_missing: IsMissing, every: int | None,
                 max_new_tokens: int) -> Iterator[Outcome]:
        return run_qa(handle, self, samples, protocol, contenders, budgets, is_missing,
                      self.answer_tokens(max_new_tokens), every)


def continuations(sample: QASample) -> list[str]:
    """The text scored after the prompt for each choice: lm-eval's target delimiter (a space) and the choice."""
    return [TARGET_DELIMITER + choice for choice in sample.choices]


def choose(handle: ModelHandle, task: QATask, sample: QASample, states: list[KVState],
           question_ids: torch.Tensor | None) -> list[dict]:
    """Score every choice of `sample` by its summed log-likelihood as the continuation of the prompt on each of
    `states` (read the question first when it was not in the compressed prefill). Leaves `states` untouched.
    Returns per state the record fields: value (the task's metric), extra_metrics, prediction (the likeliest
    choice), answers."""
    choice_ids = [handle.encode(text) for text in continuations(sample)]
    gold = sample.choices.index(sample.answers[0])
    fields = []
    for state in states:
        state = state.branch()
        if question_ids is not None:
            prefill(handle, question_ids, state)
        lls = [-float(continuation_nll(handle, state, ids).sum()) for ids in choice_ids]
        scores = choice_metrics(lls, sample.choices, gold)
        extra = {name: scores[name] for name in task.extra_metrics}
        fields.append({"value": scores[task.metric], "prediction": sample.choices[int(np.argmax(lls))],
                       "answers": list(sample.answers), **({"extra_metrics": extra} if extra else {})})
    return fields


def qa_positions(handle: ModelHandle, task: QATask, sample: QASample, max_new_tokens: int) -> int:
    """Positions `sample` occupies in either protocol: its whole prompt, then its answer (max_new_tokens generated
    tokens, each fed but a final stop, or the longest choice)."""
    prompt = task.prompt(sample)
    context, question = split_prompt(handle, prompt.context, prompt.question, prompt.answer_prefix, task.template)
    answer = (max(handle.encode(text).shape[1] for text in continuations(sample)) if task.choices
              else max_new_tokens)
    return context.shape[1] + question.shape[1] + answer


def answer(handle: ModelHandle, task: QATask, sample: QASample, states: list[KVState],
           question_ids: torch.Tensor | None, max_new_tokens: int) -> list[dict]:
    """Answer `sample` on each of `states` (of one prefill): score its choices (see choose), or read the question
    when it was not in the compressed prefill and decode all states as one greedy batch, padded to the longest
    (each row until its stop token, its max_new_tokens, or, for a saturating task, its score reaching 1). Leaves
    `states` untouched. Returns per state the record fields: value, prediction, answers (and extra_metrics)."""
    if task.choices:
        return choose(handle, task, sample, states, question_ids)
    batch = stack_states(states, pad=True)
    if question_ids is not None:
        prefill(handle, question_ids.expand(len(states), -1), batch)

    def answered(row: int, tokens: list[int]) -> bool:  # a saturating score cannot change once it is 1
        return task.score(handle.decode(tokens), sample) >= 1.0

    # the answers are all that is read of the batch: a row that stopped leaves it
    decoded = decode_answers(handle, batch, batch.logits, max_new_tokens,
                             answered=answered if task.saturates else None, drop_finished=True)
    predictions = [handle.decode(d.tokens) for d in decoded]
    return [{"value": float(task.score(p, sample)), "prediction": p[:PREDICTION_CHARS],
             "answers": list(sample.answers)[:20]} for p in predictions]


def run_qa(
    handle: ModelHandle,
    task: QATask,
    samples: list[QASample],
    protocol: str,
    contenders: list[Contender],
    budgets: list[Budget],
    is_missing: IsMissing,
    max_new_tokens: int,
    prefill_chunk: int | None = None,
) -> Iterator[Outcome]:
    """Outcomes of the missing (contender, budget) pairs (and of the full-cache reference) for samples sharing one
    context. Query-aware takes exactly one sample. prefill_chunk: prefill what is compressed that many tokens at a
    time, cut after each chunk, once per (contender, budget) (`chunked_cuts`)."""
    if protocol == QUERY_AWARE and len(samples) != 1:
        raise KVPError("query-aware evaluation prefills each sample's own question: pass one sample at a time")
    prompts = [task.prompt(s) for s in samples]
    chunks = [split_prompt(handle, p.context, p.question, p.answer_prefix, task.template) for p in prompts]
    if any(not torch.equal(c[0], chunks[0][0]) for c in chunks):
        raise KVPError("samples grouped for one shared prefill must have the same context")
    first = torch.cat(chunks[0], dim=1) if protocol == QUERY_AWARE else chunks[0][0]
    missing = missing_budgets(contenders, budgets, is_missing)
    to_run = [c for c in [FULL_CACHE, *contenders] if missing[c.id]]
    if not to_run:
        return
    if prefill_chunk is not None:  # the full cache cuts nothing: it runs with compress-once only
        yield from _chunked_qa(handle, task, samples, chunks, first, contenders, missing, max_new_tokens,
                               prefill_chunk, protocol)
        return
    clock = Clock()
    state, _ = prefill(handle, first, record_queries=recording_window(to_run))
    prefill_s = clock.lap() / len(samples)
    full_bytes, length = state.nbytes(), state.length
    # rank once per scorer; group the (scorer, budget) cuts by nominal size: each group is decoded as one batch,
    # cuts whose allocation shaped them otherwise (head- or layer-adaptive) padded to the group's longest
    rankings: dict[str, list[torch.Tensor] | None] = {}
    by_size: dict[int, list[tuple[Contender, Budget, float]]] = defaultdict(list)
    for contender in to_run:
        rankings[contender.id] = rank_for_cuts(handle, state, contender, missing[contender.id])
        rank_s = clock.lap() / len(missing[contender.id]) / len(samples)
        for budget in missing[contender.id]:
            size = min(budget.kept(length), length) if rankings[contender.id] is not None else length
            by_size[size].append((contender, budget, rank_s))
    for pairs in by_size.values():
        cuts = [cut(state, rankings[contender.id], budget, contender) for contender, budget, _ in pairs]
        cut_s = clock.lap() / len(pairs) / len(samples)
        for sample, (_, question_ids) in zip(samples, chunks):
            fields = answer(handle, task, sample, cuts, None if protocol == QUERY_AWARE else question_ids,
                            max_new_tokens)
            answer_s = clock.lap() / len(pairs)
            for (contender, budget, rank_s), small, answered in zip(pairs, cuts, fields):
                yield Outcome(sample.id, contender, FULL if contender is FULL_CACHE else budget.label, length,
                              round(small.attended()), full_bytes, small.nbytes(), rank_s + cut_s + answer_s, prefill_s,
                              answered)
            clock.lap()  # the time the caller spent storing the results is nobody's


def _chunked_qa(handle: ModelHandle, task: QATask, samples: list[QASample], chunks: list[tuple[torch.Tensor, ...]],
                first: torch.Tensor, contenders: list[Contender], missing: dict[str, list[Budget]],
                max_new_tokens: int, prefill_chunk: int, protocol: str) -> Iterator[Outcome]:
    """run_qa's outcomes when `first` is prefilled chunk by chunk: each (contender, budget) its own prefill."""
    length = first.shape[1]
    clock = Clock()
    for contender, budget, small, prefill_s, cut_s in chunked_cuts(handle, first, contenders, missing, prefill_chunk):
        full_bytes = small.nbytes_at(length)
        clock.lap()
        for sample, (_, question_ids) in zip(samples, chunks):
            (fields,) = answer(handle, task, sample, [small], None if protocol == QUERY_AWARE else question_ids,
                               max_new_tokens)
            yield Outcome(sample.id, contender, budget.label, length, round(small.attended()), full_bytes,
                          small.nbytes(), cut_s / len(samples) + clock.lap(), prefill_s / len(samples), fields)
            clock.lap()

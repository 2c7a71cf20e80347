"""Run a question-answering task on one context: prefill once, rank once per scorer, cut to every budget.

Query-aware: the prompt (context + question) is prefilled once; every scorer ranks that one cache once (its
ranking is budget-agnostic) and each budget is a cut of it, so no prefill is repeated per budget or scorer.
Question-agnostic: the context alone is prefilled and ranked once; after each cut the question is read on the
compressed cache, and several questions about one context share the context's prefill and rankings.
"""

from __future__ import annotations

from typing import Iterator

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import continuation_nll, evict, greedy_decode, prefill, rank
from kvpolicy.compression.prompts import split_prompt
from kvpolicy.compression.state import KVState
from kvpolicy.data.records import QASample
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.outcome import Clock, Outcome, Wanted
from kvpolicy.evaluation.scorers import FULL, FULL_ENTRY, ScorerEntry, planned_budgets, recording_window
from kvpolicy.evaluation.tasks.base import QUERY_AWARE, QATask
from kvpolicy.models import ModelHandle

PREDICTION_CHARS = 400  # how much of an answer a record keeps


def answer(handle: ModelHandle, task: QATask, sample: QASample, state: KVState, question_ids: torch.Tensor | None,
           max_new_tokens: int) -> dict:
    """Read the question when it was not in the compressed prefill, then answer: greedy decoding, or the choice of
    lowest total NLL. Advances `state`. Returns the record fields: value, prediction, answers."""
    if question_ids is not None:
        prefill(handle, question_ids, state)
    if task.choices:
        prefix = task.prompt(sample).answer_prefix
        sep = " " if prefix and not prefix.endswith(" ") else ""  # "Answer:" is followed by " yes", not "yes"
        nll = [float(continuation_nll(handle, state, handle.encode(sep + c)).sum()) for c in sample.choices]
        prediction = sample.choices[min(range(len(nll)), key=nll.__getitem__)]
    else:
        prediction = handle.decode(greedy_decode(handle, state, state.logits, max_new_tokens))
    return {"value": float(task.score(prediction, sample)), "prediction": prediction[:PREDICTION_CHARS],
            "answers": list(sample.answers)[:20]}


def run_qa(
    handle: ModelHandle,
    task: QATask,
    samples: list[QASample],
    protocol: str,
    entries: list[ScorerEntry],
    budgets: list[Budget],
    wanted: Wanted,
    max_new_tokens: int,
) -> Iterator[Outcome]:
    """Outcomes of the wanted (scorer, budget) pairs (and the full-cache reference) for samples sharing one
    context. Query-aware takes exactly one sample."""
    if protocol == QUERY_AWARE and len(samples) != 1:
        raise KVPError("query-aware evaluation prefills each sample's own question: pass one sample at a time")
    prompts = [task.prompt(s) for s in samples]
    chunks = [split_prompt(handle, p.context, p.question, p.answer_prefix) for p in prompts]
    if any(not torch.equal(c[0], chunks[0][0]) for c in chunks):
        raise KVPError("samples grouped for one shared prefill must have the same context")
    first = torch.cat(chunks[0], dim=1) if protocol == QUERY_AWARE else chunks[0][0]
    todo = planned_budgets(entries, budgets, wanted)
    active = [e for e in [FULL_ENTRY, *entries] if todo[e.id]]
    if not active:
        return
    clock = Clock()
    state, _ = prefill(handle, first, record_queries=recording_window(active))
    prefill_s = clock.lap() / len(samples)
    full_bytes, length = state.nbytes(), state.length
    for entry in active:
        cuts = todo[entry.id]
        needs_rank = entry is not FULL_ENTRY and any(b.kept(length) < length for b in cuts)
        scores = rank(handle, state, entry.scorer) if needs_rank else None
        rank_s = clock.lap() / len(cuts) / len(samples)
        for budget in cuts:
            cut = evict(state, scores, budget) if scores is not None and budget.kept(length) < length else state.branch()
            cut_s = clock.lap() / len(samples)
            for sample, (_, question_ids) in zip(samples, chunks):
                fields = answer(handle, task, sample, cut.branch(), None if protocol == QUERY_AWARE else question_ids,
                                max_new_tokens)
                yield Outcome(sample.id, entry, FULL if entry is FULL_ENTRY else budget.label, length, cut.length,
                              full_bytes, cut.nbytes(), rank_s + cut_s + clock.lap(), prefill_s, fields)
                clock.lap()  # the time the caller spent storing the result is nobody's

"""Dialogue perplexity under compression: the teacher-forced NLL of a conversation's final assistant turn.

Two protocols. prompt-once (the KVP paper): prefill the whole dialogue before the final answer, rank once per
scorer, cut to every budget, score the answer. multi-turn: the dialogue is fed one round (user + assistant turn)
at a time and the cache is compressed back to the budget after every round (compression/multi_turn.py's
`continue_dialogue`), so later turns run on what earlier compressions kept; the first round's prefill and ranking
are shared by every budget. Under prompt-once, a prefill chunk (`kvp sweep --prefill-chunk C`) prefills the dialogue
C tokens at a time per (scorer, budget), cutting after each chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import continuation_nll, prefill
from kvpolicy.compression.multi_turn import continue_dialogue
from kvpolicy.compression.state import KVState
from kvpolicy.data.dialogue import DialogueSample
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.lineup import (FULL_CACHE, Contender, IsMissing, chunked_cuts, cut, missing_budgets,
                                        rank_for_cuts, recording_window)
from kvpolicy.evaluation.outcome import Clock, Outcome
from kvpolicy.evaluation.result import FULL
from kvpolicy.evaluation.names import MULTI_TURN, PROMPT_ONCE
from kvpolicy.evaluation.tasks.base import Task
from kvpolicy.models import ModelHandle


@dataclass(frozen=True)
class DialogueTask(Task):
    """Perplexity of a dialogue's final assistant turn: load(handle, n, context_tokens, seed) -> DialogueSamples
    (prompt turns + the reference assistant turn), each its own prefill."""

    max_answer_tokens: int = 256

    chunked_protocols: ClassVar[tuple[str, ...]] = (PROMPT_ONCE,)

    def supports(self, contender: Contender, protocol: str) -> bool:
        """Not a scorer that ranks only a whole prefill (KVzip, KVzap) under multi-turn, whose later rounds rank a
        cut cache."""
        return super().supports(contender, protocol) and not (protocol == MULTI_TURN and contender.whole_prefill)

    def positions(self, handle: ModelHandle, samples: list[DialogueSample], max_new_tokens: int) -> tuple[int, str]:
        return max(dialogue_positions(handle, s, self.max_answer_tokens) for s in samples), "prompt and answer"

    def outcomes(self, handle: ModelHandle, samples: list[DialogueSample], protocol: str, contenders: list[Contender],
                 budgets: list[Budget], is_missing: IsMissing, every: int | None,
                 max_new_tokens: int) -> Iterator[Outcome]:
        (sample,) = samples
        return run_dialogue(handle, sample, protocol, contenders, budgets, is_missing, self.max_answer_tokens, every)


def dialogue_chunks(handle: ModelHandle, sample: DialogueSample, min_chunk: int = 1,
                    max_answer_tokens: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(rounds, answer): the chat-rendered prompt split after every assistant turn, each round (1, n) with n >=
    min_chunk (short rounds merge into the next, so query-based scorers always have their window), and the
    reference assistant turn's tokens (1, F), end-of-turn token included, cut to max_answer_tokens."""
    messages = list(sample.messages)
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    texts = [handle.chat(messages[:end], add_generation_prompt=False) for end in ends] + [sample.prompt]
    pieces, previous = [], ""
    for text in texts:
        if not text.startswith(previous):
            raise KVPError(f"{handle.info.name}'s chat template renders a dialogue differently turn by turn; "
                           "multi-turn evaluation needs it to extend the earlier text")
        pieces.append(text[len(previous):])
        previous = text
    rounds: list[torch.Tensor] = []
    for piece in pieces:
        ids = handle.encode(piece)
        if rounds and rounds[-1].shape[1] < min_chunk:
            rounds[-1] = torch.cat([rounds[-1], ids], dim=1)
        else:
            rounds.append(ids)
    if len(rounds) > 1 and rounds[-1].shape[1] < min_chunk:
        rounds[-2:] = [torch.cat(rounds[-2:], dim=1)]
    answer = handle.encode(sample.reference)[:, :max_answer_tokens]
    return rounds, answer


def dialogue_positions(handle: ModelHandle, sample: DialogueSample, max_answer_tokens: int) -> int:
    """Positions a dialogue occupies: every round, then the scored reference answer."""
    rounds, answer = dialogue_chunks(handle, sample, 1, max_answer_tokens)
    return sum(r.shape[1] for r in rounds) + answer.shape[1]


def _nll_fields(handle: ModelHandle, state: KVState, answer: torch.Tensor) -> dict:
    nll = continuation_nll(handle, state, answer)
    total = float(nll.sum())
    return {"nll_sum": total, "n_tokens": int(nll.numel()), "value": float(torch.exp(nll.mean()))}


def run_dialogue(
    handle: ModelHandle,
    sample: DialogueSample,
    protocol: str,
    contenders: list[Contender],
    budgets: list[Budget],
    is_missing: IsMissing,
    max_answer_tokens: int,
    prefill_chunk: int | None = None,
) -> Iterator[Outcome]:
    """Outcomes of the missing (contender, budget) pairs (and of the full-cache reference) for one dialogue.
    prefill_chunk (prompt-once only): prefill the dialogue that many tokens at a time, cut after each chunk, once
    per (contender, budget) (`chunked_cuts`)."""
    if protocol not in (MULTI_TURN, PROMPT_ONCE):
        raise KVPError(f"dialogue perplexity runs under {MULTI_TURN} or {PROMPT_ONCE}, not '{protocol}'")
    if prefill_chunk is not None and protocol != PROMPT_ONCE:
        raise KVPError(f"a chunked prefill of a dialogue runs under {PROMPT_ONCE}; {MULTI_TURN} cuts after each round")
    missing = missing_budgets(contenders, budgets, is_missing)
    if prefill_chunk is not None:
        rounds, answer = dialogue_chunks(handle, sample, 1, max_answer_tokens)
        ids = torch.cat(rounds, dim=1)
        for contender, budget, small, prefill_s, cut_s in chunked_cuts(handle, ids, contenders, missing,
                                                                       prefill_chunk):
            clock = Clock()
            fields = _nll_fields(handle, small, answer)
            yield Outcome(sample.id, contender, budget.label, ids.shape[1], round(small.attended()),
                          small.nbytes_at(ids.shape[1]), small.nbytes(),
                          cut_s + clock.lap(), prefill_s, fields)
        return
    to_run = [c for c in [FULL_CACHE, *contenders] if missing[c.id]]
    by_chunk: dict[int, list[Contender]] = {}  # contenders that split the dialogue into the same rounds
    for contender in to_run:
        by_chunk.setdefault(1 if protocol == PROMPT_ONCE else max(1, contender.query_window), []).append(contender)
    for min_chunk, members in by_chunk.items():
        rounds, answer = dialogue_chunks(handle, sample, min_chunk, max_answer_tokens)
        if protocol == PROMPT_ONCE:
            rounds = [torch.cat(rounds, dim=1)]
        yield from _run_rounds(handle, sample.id, rounds, answer, members, missing)


def _run_rounds(handle: ModelHandle, sample_id: str, rounds: list[torch.Tensor], answer: torch.Tensor,
                contenders: list[Contender], missing: dict[str, list[Budget]]) -> Iterator[Outcome]:
    """Prefill the first round once, rank it once per contender; per budget, cut, then feed (and after each round
    compress) the remaining rounds, and score the answer."""
    clock = Clock()
    state, _ = prefill(handle, rounds[0], record_queries=recording_window(contenders))
    prefill_s = clock.lap()
    total_length = sum(r.shape[1] for r in rounds)
    full_bytes = state.nbytes_at(total_length)  # the whole dialogue's, which the first round's cache scales to
    for contender in contenders:
        ranking = rank_for_cuts(handle, state, contender, missing[contender.id])
        rank_s = clock.lap() / len(missing[contender.id])
        for budget in missing[contender.id]:
            small = cut(state, ranking, budget, contender)
            # multi-turn: each later round on the compressed cache, then compress again (the full cache: none)
            small = continue_dialogue(handle, small, rounds[1:], contender.scorer, budget)
            fields = _nll_fields(handle, small, answer)
            yield Outcome(sample_id, contender, FULL if contender is FULL_CACHE else budget.label, total_length,
                          round(small.attended()), full_bytes, small.nbytes(), rank_s + clock.lap(), prefill_s, fields)
            clock.lap()

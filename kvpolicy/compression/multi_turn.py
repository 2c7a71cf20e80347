"""Multi-turn dialogue on a compressed cache: after every turn the cache is cut back to the budget and the
conversation continues on it (the KVP paper compresses once per prompt; long chats need this).

`feed_turn` is one turn: query-aware, prefill the turn, then compress; question-agnostic, compress the history,
then prefill the turn (so the first turn runs on the full cache). `converse` chats with it (a user turn, then a
generated or teacher-forced answer), and evaluation's multi-turn dialogue perplexity feeds whole rounds (user +
assistant turn) with `continue_dialogue`. Each turn feeds only the new text of the chat template (the previous turns
are already cached), so the template must render a conversation as an append-only string, as ChatML-style ones do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any
from collections.abc import Callable, Iterable, Sequence

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import BoundedDecoding, compress, continuation_nll, decode_answers, prefill
from kvpolicy.compression.protocols import QUERY_AWARE, QUESTION_AGNOSTIC, check_protocol_name
from kvpolicy.compression.scorers.base import Scorer
from kvpolicy.compression.state import KVState
from kvpolicy.errors import KVPError
from kvpolicy.models import ModelHandle
from kvpolicy.models.decoding import GREEDY, Sampling


@dataclass
class TurnResult:
    """One assistant turn: the generated (or reference) answer, its per-token NLL when teacher-forced, and the
    cache size (entries per KV head, bytes) before and after this turn's compression."""

    turn: int
    protocol: str
    text: str
    token_ids: list[int]
    nll: list[float] | None
    cache_tokens_before: int
    cache_tokens_after: int
    cache_bytes_before: int
    cache_bytes_after: int
    next_position: int
    cache_tokens_end: int = 0  # entries per KV head once the answer is fed (at most budget + every when bounded)
    cache_bytes_end: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size(state: KVState) -> tuple[int, int]:
    return round(state.attended()), state.nbytes()


def check_protocol(protocol: str, scorer: Scorer | None) -> None:
    """Refuse an unknown protocol, a scorer that re-reads the cached text (it ranks only an uncut cache, and a
    dialogue's cache is cut turn after turn), and a scorer that reads prefill queries under question-agnostic (which
    compresses after decoding, when no prefill queries are left)."""
    check_protocol_name(protocol)
    if scorer is not None and scorer.reads_text:
        raise KVPError(f"scorer '{scorer.name}' re-reads the cached text, which only an uncut cache holds, so it "
                       "cannot compress a dialogue turn after turn; compress the prompt once or use another scorer")
    if protocol == QUESTION_AGNOSTIC and scorer is not None and not scorer.attention_free:
        raise KVPError(f"scorer '{scorer.name}' needs prefill queries; question-agnostic dialogue compresses after "
                       f"decoding, so use protocol {QUERY_AWARE} or an attention-free scorer")


def feed_turn(
    handle: ModelHandle,
    state: KVState | None,
    chunk: torch.Tensor,
    scorer: Scorer | None,
    budget: Budget | None,
    protocol: str = QUERY_AWARE,
) -> tuple[KVState, tuple[int, int], tuple[int, int]]:
    """Feed one turn's tokens `chunk` (1, T) on the cache (None: a new one) and cut it back to `budget`, before the
    chunk (question-agnostic) or after it (query-aware); scorer None keeps the full cache. Returns the state and
    its (entries per head, bytes) just before and after this turn's cut ((0, 0) twice when there was none)."""
    check_protocol(protocol, scorer)
    before = after = (0, 0)
    if protocol == QUESTION_AGNOSTIC and state is not None and scorer is not None:
        before, state = _size(state), compress(handle, state, scorer, budget)
        after = _size(state)
    query_aware = protocol == QUERY_AWARE and scorer is not None
    state, _ = prefill(handle, chunk, state, record_queries=scorer.query_window if query_aware else 0)
    if query_aware:
        before, state = _size(state), compress(handle, state, scorer, budget)
        after = _size(state)
    return state, before, after


def continue_dialogue(handle: ModelHandle, state: KVState, rounds: Sequence[torch.Tensor], scorer: Scorer | None,
                      budget: Budget | None) -> KVState:
    """Feed each round (1, T) on the cache, compressing it back to `budget` after each (query-aware): later rounds
    run on what earlier cuts kept. scorer None: the full cache."""
    for chunk in rounds:
        state, _, _ = feed_turn(handle, state, chunk, scorer, budget)
    return state


def converse(
    handle: ModelHandle,
    user_turns: Iterable[str],
    scorer: Scorer,
    budget: Budget,
    protocol: str = QUERY_AWARE,
    max_new_tokens: int = 64,
    reference_answers: Sequence[str] | None = None,
    system: str | None = None,
    bounded: BoundedDecoding | None = None,
    sampling: Sampling = GREEDY,
    on_token: Callable[[int], None] | None = None,
    on_turn: Callable[[TurnResult], None] | None = None,
) -> tuple[list[TurnResult], KVState]:
    """Run a dialogue turn by turn on one cache, compressing it to `budget` at every turn.

    user_turns: any iterable, read one turn at a time (an interactive chat's input). reference_answers: when given
    (one per user turn), each answer is teacher-forced instead of generated and its per-token NLL recorded
    (perplexity on dialogue). A generated answer is decoded with `sampling`, on_token(token) sees each of its tokens
    as it is chosen, and `bounded` keeps the cache within its budget + every while it is. on_turn(result) sees each
    turn as it ends. Returns the turn results and the final state.
    """
    check_protocol(protocol, scorer)
    if reference_answers is not None:
        user_turns = list(user_turns)
        if len(reference_answers) != len(user_turns):
            raise KVPError(f"got {len(reference_answers)} reference answers for {len(user_turns)} user turns")
    messages = [{"role": "system", "content": system}] if system else []
    fed_text = ""
    state: KVState | None = None
    results = []
    for turn, user in enumerate(user_turns):
        messages.append({"role": "user", "content": user})
        prompt = handle.chat(messages)
        if not prompt.startswith(fed_text):
            raise KVPError("the chat template rewrites earlier turns, so turns cannot be appended to the cache")
        state, before, after = feed_turn(handle, state, handle.encode(prompt[len(fed_text):]), scorer, budget,
                                         protocol)
        if reference_answers is None:
            per_row = None if on_token is None else (lambda _row, token: on_token(token))
            tokens = decode_answers(handle, state, state.logits, max_new_tokens, bounded=bounded, sampling=sampling,
                                    on_token=per_row)[0].tokens
            text, nll = handle.decode(tokens), None
        else:
            text = reference_answers[turn]
            tokens = handle.encode(text)[0].tolist()
            nll = continuation_nll(handle, state, handle.encode(text), append=True).tolist()
        messages.append({"role": "assistant", "content": text})
        fed_text = prompt + text
        end = _size(state)
        results.append(TurnResult(
            turn=turn, protocol=protocol, text=text, token_ids=tokens, nll=nll,
            cache_tokens_before=before[0], cache_tokens_after=after[0],
            cache_bytes_before=before[1], cache_bytes_after=after[1], next_position=state.next_position,
            cache_tokens_end=end[0], cache_bytes_end=end[1],
        ))
        if on_turn is not None:
            on_turn(results[-1])
    return results, state

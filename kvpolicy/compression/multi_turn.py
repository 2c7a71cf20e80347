"""Multi-turn dialogue on a compressed cache: after every turn the cache is cut back to the budget and the
conversation continues on it (the KVP paper compresses once per prompt; long chats need this).

Each turn feeds only the new text of the chat template (the previous turns are already cached), so the chat
template must render a conversation as an append-only string, as ChatML-style templates do.
query-aware: prefill the user turn, compress, answer. question-agnostic: compress the history, then prefill
the user turn and answer (the first turn therefore runs on the full cache).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any
from collections.abc import Sequence

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import PROTOCOLS, BoundedDecoding, compress, continuation_nll, greedy_decode, prefill
from kvpolicy.compression.scorers.base import Scorer
from kvpolicy.compression.state import KVState
from kvpolicy.errors import KVPError
from kvpolicy.models import ModelHandle


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size(state: KVState) -> tuple[int, int]:
    return state.length, state.nbytes()


def converse(
    handle: ModelHandle,
    user_turns: Sequence[str],
    scorer: Scorer,
    budget: Budget,
    protocol: str = "query-aware",
    max_new_tokens: int = 64,
    reference_answers: Sequence[str] | None = None,
    system: str | None = None,
    bounded: BoundedDecoding | None = None,
) -> tuple[list[TurnResult], KVState]:
    """Run a dialogue turn by turn on one cache, compressing it to `budget` at every turn.

    reference_answers: when given (one per user turn), each answer is teacher-forced instead of generated and
    its per-token NLL recorded (perplexity on dialogue). Returns the turn results and the final state.
    """
    if protocol not in PROTOCOLS:
        raise KVPError(f"unknown protocol '{protocol}'; choose one of {', '.join(PROTOCOLS)}")
    if reference_answers is not None and len(reference_answers) != len(user_turns):
        raise KVPError(f"got {len(reference_answers)} reference answers for {len(user_turns)} user turns")
    if protocol == "question-agnostic" and not scorer.attention_free:
        raise KVPError(f"scorer '{scorer.name}' needs prefill queries; question-agnostic dialogue compresses after "
                       "decoding, so use protocol query-aware or an attention-free scorer")
    messages = [{"role": "system", "content": system}] if system else []
    fed_text = ""
    state: KVState | None = None
    results = []
    for turn, user in enumerate(user_turns):
        messages.append({"role": "user", "content": user})
        prompt = handle.chat(messages)
        if not prompt.startswith(fed_text):
            raise KVPError("the chat template rewrites earlier turns, so turns cannot be appended to the cache")
        chunk = handle.encode(prompt[len(fed_text):])
        before = after = (0, 0)  # (entries per head, bytes) around this turn's compression
        if protocol == "question-agnostic" and state is not None:
            before, state = _size(state), compress(handle, state, scorer, budget)
            after = _size(state)
        state, _ = prefill(handle, chunk, state, record_queries=scorer.query_window if protocol == "query-aware" else 0)
        if protocol == "query-aware":
            before, state = _size(state), compress(handle, state, scorer, budget)
            after = _size(state)
        if reference_answers is None:
            tokens = greedy_decode(handle, state, state.logits, max_new_tokens, bounded=bounded)
            text, nll = handle.decode(tokens), None
        else:
            text = reference_answers[turn]
            tokens = handle.encode(text)[0].tolist()
            nll = continuation_nll(handle, state, handle.encode(text), append=True).tolist()
        messages.append({"role": "assistant", "content": text})
        fed_text = prompt + text
        results.append(TurnResult(
            turn=turn, protocol=protocol, text=text, token_ids=tokens, nll=nll,
            cache_tokens_before=before[0], cache_tokens_after=after[0],
            cache_bytes_before=before[1], cache_bytes_after=after[1], next_position=state.next_position,
        ))
    return results, state

"""Long-generation perplexity: a long text streamed through a cache bounded at the budget (protocol bounded-stream,
run by evaluation.bounded_stream). Sized by --context: every stream is exactly that many tokens; the seed does not
apply.

longgen:essays: the Paul Graham essays of the documents' "eval" split (a split no trace reads), in the windows
data.documents cuts (one every half window), as plain text. longgen:dialogue: ShareGPT conversations of the
dialogues' "eval" split (the offline stand-in for OASST2) rendered whole with the chat template, the first --context
tokens of those that reach it, each whole (data.dialogue.joined_conversations joins again the parts ShareGPT cut
it into).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from kvpolicy.data.dialogue import MIN_USER_TURNS, joined_conversations
from kvpolicy.data.documents import iter_documents
from kvpolicy.data.sharegpt import SOURCE as SHAREGPT
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.bounded_stream import StreamSample, StreamTask
from kvpolicy.evaluation.names import BOUNDED_STREAM

FAMILY = "long-generation perplexity"
EVAL_SPLIT = "eval"


def _first(streams: Iterator[StreamSample], n: int, what: str, context_tokens: int) -> list[StreamSample]:
    """The first n streams; KVPError when there are fewer."""
    samples = list(itertools.islice(streams, n))
    if len(samples) < n:
        raise KVPError(f"{what} holds only {len(samples)} texts of {context_tokens} tokens, {n} were asked for; ask "
                       "for fewer or a shorter --context")
    return samples


def _cut(handle, text: str, context_tokens: int) -> torch.Tensor | None:
    """The first context_tokens token ids (1, context_tokens) of `text`; None when it is shorter."""
    ids = handle.encode(text)[:, :context_tokens]
    return ids if ids.shape[1] == context_tokens else None


def essay_streams(handle, context_tokens: int) -> Iterator[StreamSample]:
    """The essays' eval-split windows of context_tokens tokens (the window's text and the text after it, re-encoded
    and cut to exactly that length)."""
    for document in iter_documents(handle, EVAL_SPLIT, context_tokens):
        ids = _cut(handle, document.prompt + document.reference, context_tokens)
        if ids is not None:
            yield StreamSample(document.id, ids)


def dialogue_streams(handle, context_tokens: int) -> Iterator[StreamSample]:
    """The first context_tokens chat-rendered tokens of the eval split's multi-turn conversations that reach that
    length (opening with a user turn, after any system turn)."""
    for conversation in joined_conversations(EVAL_SPLIT):
        first = next((t.role for t in conversation.turns if t.role != "system"), None)
        if first != "user" or conversation.n_user_turns < MIN_USER_TURNS:
            continue
        ids = _cut(handle, handle.chat(conversation.messages(), add_generation_prompt=False), context_tokens)
        if ids is not None:
            yield StreamSample(f"sharegpt/{conversation.id}", ids)


def essays_task() -> StreamTask:
    def load(handle, n: int, context_tokens: int, seed: int) -> list[StreamSample]:
        return _first(essay_streams(handle, context_tokens), n, "the essays' eval split", context_tokens)

    return StreamTask(name="longgen:essays", family=FAMILY, metric="perplexity", protocols=(BOUNDED_STREAM,),
                      data="Paul Graham essays of the eval split (no trace reads it), windows of --context tokens",
                      sized=True, corpus="essays", load=load)


def dialogue_task() -> StreamTask:
    def load(handle, n: int, context_tokens: int, seed: int) -> list[StreamSample]:
        return _first(dialogue_streams(handle, context_tokens), n, "ShareGPT's eval split", context_tokens)

    return StreamTask(name="longgen:dialogue", family=FAMILY, metric="perplexity", protocols=(BOUNDED_STREAM,),
                      data=f"{SHAREGPT}: eval-split conversations (no trace reads them), chat-rendered, their first "
                           "--context tokens", sized=True, corpus="dialogue", load=load)


LONGGEN = {"essays": essays_task, "dialogue": dialogue_task}  # the members of the catalog's "longgen" row


def longgen_task(name: str) -> StreamTask:
    """longgen:NAME, NAME a key of LONGGEN."""
    return LONGGEN[name]()

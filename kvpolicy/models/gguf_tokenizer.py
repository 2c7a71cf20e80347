"""A SentencePiece tokenizer rebuilt from the vocabulary a GGUF file carries (Gemma 3).

transformers 5.2 converts Gemma's GGUF tokenizer into a Unigram model that splits words oddly and, once saved and
reloaded, into single characters ("The capital" -> T, h, e, ...): the model then answers nonsense. This module
rebuilds it as the SentencePiece BPE model it is, the way llama.cpp reads the same file: control tokens (GGUF token
type 3) are special, user-defined ones (type 4: runs of newlines, spaces, tabs, HTML tags) are matched whole in the
raw text before anything else, every other piece is formed by merging adjacent pieces, the one whose merge has the
highest score first, and a character outside the vocabulary falls back to its UTF-8 bytes (<0xNN>). The fast
tokenizer (a transformers `GemmaTokenizer`) is checked against `reference_tokenize`, the plain algorithm.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpolicy.errors import KVPError

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6  # GGUF token types (llama.cpp's LLAMA_TOKEN_TYPE_*)
SPACE = "▁"  # SentencePiece's visible space
# GGUF metadata value types: struct format of each scalar one (8: string, 9: array)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def read_metadata(path: Path) -> dict[str, Any]:
    """The key-value metadata at the head of a GGUF file (version 2 or 3, little-endian), arrays as lists: a plain
    reader of the format's header, since gguf's GGUFReader takes 10-15 s indexing a 262K-piece vocabulary here."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] not in (2, 3):
            raise KVPError(f"{path} is not a GGUF file of version 2 or 3")
        count = struct.unpack_from("<Q", data, 16)[0]
        offset, fields = 24, {}

        def string(at: int) -> tuple[str, int]:
            size = struct.unpack_from("<Q", data, at)[0]
            return data[at + 8:at + 8 + size].decode("utf-8"), at + 8 + size

        def value(kind: int, at: int) -> tuple[Any, int]:
            if kind == STRING:
                return string(at)
            if kind == ARRAY:
                inner, size = struct.unpack_from("<IQ", data, at)
                at += 12
                if inner in SCALARS:  # fixed-size items: one unpack
                    width = struct.calcsize(SCALARS[inner])
                    items = struct.unpack_from(f"<{size}{SCALARS[inner][1]}", data, at)
                    return list(items), at + size * width
                items = []
                for _ in range(size):
                    item, at = value(inner, at)
                    items.append(item)
                return items, at
            return struct.unpack_from(SCALARS[kind], data, at)[0], at + struct.calcsize(SCALARS[kind])

        for _ in range(count):
            key, offset = string(offset)
            kind = struct.unpack_from("<I", data, offset)[0]
            fields[key], offset = value(kind, offset + 4)
        return fields


@dataclass(frozen=True)
class GGUFVocabulary:
    """What a GGUF file says about its SentencePiece tokenizer: pieces (their id is their index), their scores
    (higher = merged earlier) and GGUF token types, and the special token ids."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int

    @classmethod
    def read(cls, path: Path) -> GGUFVocabulary:
        fields = read_metadata(path)
        model = fields.get("tokenizer.ggml.model")
        if model != "llama":
            raise KVPError(f"{path} does not hold a SentencePiece tokenizer (GGUF tokenizer model {model!r}, expected "
                           "'llama'); this rebuild is for Gemma's")
        if fields.get("tokenizer.ggml.add_space_prefix", False):
            raise KVPError(f"{path}: a SentencePiece tokenizer that adds a space prefix is not supported here")
        ids = [int(fields[f"tokenizer.ggml.{key}_token_id"]) for key in ("bos", "eos", "unknown", "padding")]
        return cls(fields["tokenizer.ggml.tokens"], [float(x) for x in fields["tokenizer.ggml.scores"]],
                   [int(x) for x in fields["tokenizer.ggml.token_type"]], *ids)

    def ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def mergeable(self) -> dict[str, float]:
        """The normal pieces, which merges form, with their scores (the others are never formed by a merge)."""
        return {t: s for t, s, kind in zip(self.tokens, self.scores, self.types) if kind == NORMAL}

    def whole(self) -> list[str]:
        """The pieces matched whole in the raw text (control and user-defined tokens), longest first."""
        found = [t for t, kind in zip(self.tokens, self.types) if kind in (CONTROL, USER_DEFINED)]
        return sorted(found, key=len, reverse=True)


def build_tokenizer(vocabulary: GGUFVocabulary):
    """A transformers `GemmaTokenizer` (BPE with byte fallback) equal to `reference_tokenize` on any text: the
    merges are every split of a normal piece into two pieces, ordered by the merged piece's score."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    vocab = vocabulary.ids()
    normal = vocabulary.mergeable()
    merges = generate_merges(vocab, normal, skip_tokens=[t for t in vocab if t not in normal])
    name = vocabulary.tokens.__getitem__
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, unk_token=name(vocabulary.unk_id),
                               bos_token=name(vocabulary.bos_id), eos_token=name(vocabulary.eos_id),
                               pad_token=name(vocabulary.pad_id), add_bos_token=True, add_eos_token=False)
    tokenizer.add_tokens([AddedToken(t, special=kind == CONTROL, normalized=False)
                          for t, kind in zip(vocabulary.tokens, vocabulary.types) if kind in (CONTROL, USER_DEFINED)],
                         special_tokens=False)
    return tokenizer


def reference_tokenize(vocabulary: GGUFVocabulary, text: str) -> list[int]:
    """Slow reference: llama.cpp's SentencePiece tokenization of `text` (no BOS). The raw text is split at every
    control or user-defined piece (the longest at each place); in each other fragment spaces become SPACE, it starts
    as characters, and the adjacent pair whose concatenation is a piece with the highest score is merged (the leftmost
    on ties) until none is; a character that is no piece becomes its UTF-8 byte pieces."""
    vocab = vocabulary.ids()
    mergeable = vocabulary.mergeable()
    whole = vocabulary.whole()
    pattern = re.compile("|".join(map(re.escape, whole))) if whole else None
    ids, start = [], 0
    for match in (pattern.finditer(text) if pattern else ()):
        ids += _merge_fragment(text[start:match.start()], vocab, mergeable)
        ids.append(vocab[match.group()])
        start = match.end()
    return ids + _merge_fragment(text[start:], vocab, mergeable)


def _merge_fragment(fragment: str, vocab: dict[str, int], mergeable: dict[str, float]) -> list[int]:
    pieces = list(fragment.replace(" ", SPACE))
    while len(pieces) > 1:
        candidates = [(mergeable[a + b], -i) for i, (a, b) in enumerate(zip(pieces, pieces[1:])) if a + b in mergeable]
        if not candidates:
            break
        _, leftmost = max(candidates)
        i = -leftmost
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    ids = []
    for piece in pieces:
        if piece in vocab:
            ids.append(vocab[piece])
        else:
            ids += [vocab[f"<0x{byte:02X}>"] for byte in piece.encode("utf-8")]
    return ids

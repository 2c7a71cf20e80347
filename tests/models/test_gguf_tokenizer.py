"""The SentencePiece tokenizer rebuilt from a GGUF vocabulary equals the plain algorithm (`reference_tokenize`, as
llama.cpp reads the file): on a small vocabulary written here, and on Gemma 3 270M's own 262,144 pieces."""

from __future__ import annotations

import pytest

from kvpolicy.models.gguf_tokenizer import (BYTE, CONTROL, NORMAL, USER_DEFINED, GGUFVocabulary, build_tokenizer,
                                            reference_tokenize)

TEXTS = ["The capital of France is", "Hello,  world!\n\nNew para\twith tab  and   spaces <b>bold</b>",
         "émigré 日本語 🙂 12345", "ab ab  abc\n\n\nthe theme", ""]


def _small() -> GGUFVocabulary:
    """Specials, the bytes, a few characters, merges whose scores disagree with a left-to-right order, and user-defined
    pieces (runs of spaces and newlines, a tag) matched whole."""
    pieces = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL)]
    pieces += [(f"<0x{i:02X}>", BYTE) for i in range(256)]
    pieces += [("\n", USER_DEFINED), ("\n\n", USER_DEFINED), ("  ", USER_DEFINED), ("<b>", USER_DEFINED)]
    merged = ["bc", "th", "▁t", "he", "▁the", "ab", "abc", "▁a", "the", "me", "eme"]
    pieces += [(c, NORMAL) for c in "▁abcdehilmnorstwCFHTW,!.123"] + [(m, NORMAL) for m in merged]
    scores = [0.0 if kind != NORMAL else -float(i) for i, (_, kind) in enumerate(pieces)]
    return GGUFVocabulary([p for p, _ in pieces], scores, [k for _, k in pieces], 2, 1, 3, 0)


def test_the_fast_tokenizer_equals_the_reference_on_a_small_vocabulary():
    vocabulary = _small()
    tokenizer = build_tokenizer(vocabulary)
    for text in TEXTS:
        assert tokenizer(text, add_special_tokens=False).input_ids == reference_tokenize(vocabulary, text), text
    assert reference_tokenize(vocabulary, "abc")[0] == vocabulary.tokens.index("abc")  # "bc" first, then "abc"
    assert reference_tokenize(vocabulary, "é") == [vocabulary.tokens.index("<0xC3>"), vocabulary.tokens.index("<0xA9>")]
    assert tokenizer("the").input_ids[0] == vocabulary.bos_id  # a BOS in front when special tokens are added
    assert tokenizer.decode(tokenizer("ab  the\n\n<b>é").input_ids, skip_special_tokens=True) == "ab  the\n\n<b>é"


@pytest.mark.model
def test_gemma3_tokenizer_equals_the_reference(tmp_path):
    from kvpolicy.models.loader import assemble_chunks
    from kvpolicy.models.registry import MODELS

    spec = MODELS["gemma3-270m"]
    vocabulary = GGUFVocabulary.read(assemble_chunks(spec, tmp_path / spec.gguf_file))
    tokenizer = build_tokenizer(vocabulary)
    essay = open(__file__, encoding="utf-8").read()  # code, prose, punctuation, runs of spaces and newlines
    for text in [*TEXTS, essay]:
        assert tokenizer(text, add_special_tokens=False).input_ids == reference_tokenize(vocabulary, text)
    assert tokenizer("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]

"""The SentencePiece tokenizer rebuilt from a GGUF vocabulary equals the plain algorithm (`reference_tokenize`, as
llama.cpp reads the file), on a small vocabulary written here as a GGUF file (Gemma 3 270M's own 262,144 pieces:
tests/compression/test_gemma3_model.py)."""

from __future__ import annotations

import pytest

from kvpolicy.errors import KVPError
from kvpolicy.models.gguf_tokenizer import (BYTE, CONTROL, NORMAL, USER_DEFINED, GGUFVocabulary, build_tokenizer,
                                            read_metadata, reference_tokenize)

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


def _write(vocabulary: GGUFVocabulary, path):
    """A GGUF file holding `vocabulary` as llama.cpp writes one (gguf's own writer), no tensors."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    writer.add_bos_token_id(vocabulary.bos_id)
    writer.add_eos_token_id(vocabulary.eos_id)
    writer.add_unk_token_id(vocabulary.unk_id)
    writer.add_pad_token_id(vocabulary.pad_id)
    writer.add_add_space_prefix(False)
    writer.add_context_length(256)
    writer.add_float64("test.float64", 0.5)
    writer.add_array("test.int_array", [1, -2, 3])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_metadata_reader_reads_what_gguf_reads(tmp_path):
    from gguf import GGUFReader

    path = _write(_small(), tmp_path / "small.gguf")
    ours = read_metadata(path)
    fields = GGUFReader(str(path)).fields
    theirs = {key: field.contents() for key, field in fields.items() if not key.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value) if key.endswith("scores") else ours[key] == value, key
    assert GGUFVocabulary.read(path) == _small()
    (tmp_path / "other.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(KVPError, match="not a GGUF file"):
        read_metadata(tmp_path / "other.gguf")


def test_the_fast_tokenizer_equals_the_reference_on_a_small_vocabulary():
    vocabulary = _small()
    tokenizer = build_tokenizer(vocabulary)
    for text in TEXTS:
        assert tokenizer(text, add_special_tokens=False).input_ids == reference_tokenize(vocabulary, text), text
    assert reference_tokenize(vocabulary, "abc")[0] == vocabulary.tokens.index("abc")  # "bc" first, then "abc"
    assert reference_tokenize(vocabulary, "é") == [vocabulary.tokens.index("<0xC3>"), vocabulary.tokens.index("<0xA9>")]
    assert tokenizer("the").input_ids[0] == vocabulary.bos_id  # a BOS in front when special tokens are added
    assert tokenizer.decode(tokenizer("ab  the\n\n<b>é").input_ids, skip_special_tokens=True) == "ab  the\n\n<b>é"


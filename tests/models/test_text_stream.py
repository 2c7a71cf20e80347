"""Streamed text: the printed pieces add up to the final answer, whole characters only, no part of a stop string."""

from __future__ import annotations

from kvpolicy.models.decoding import cut_at_stop
from kvpolicy.models.text_stream import REPLACEMENT, TextStream


def byte_text(tokens: list[int]) -> str:
    """A tokenizer with one token per UTF-8 byte: most characters here span several tokens."""
    return bytes(tokens).decode("utf-8", errors="replace")


def stream(text: str, stop_strings: tuple[str, ...] = ()) -> tuple[list[str], str]:
    """The pieces streamed for text's tokens, and the final text they must add up to."""
    streamer = TextStream(byte_text, stop_strings)
    final = cut_at_stop(text, stop_strings)
    pieces = [streamer.push(token) for token in text.encode()]
    return pieces + [streamer.finish(final)], final


def test_pieces_add_up_to_the_text_in_whole_characters():
    pieces, final = stream("naïve café — 東京 🙂 done")
    assert "".join(pieces) == final
    assert not any(REPLACEMENT in piece for piece in pieces)
    assert sum(bool(piece) for piece in pieces) == len(final)  # each character as soon as it is complete


def test_a_possible_start_of_a_stop_string_is_held_back_and_the_stop_never_printed():
    text = "a ST b STOP c"
    pieces, final = stream(text, ("STOP",))
    assert final == "a ST b " and "".join(pieces) == final
    assert pieces[:5] == ["a", " ", "", "", "ST "]  # "S" and "ST" wait: they may begin "STOP"
    assert pieces[-1] == ""  # everything was out before the stop completed


def test_a_multi_byte_stop_string_is_cut_too():
    pieces, final = stream("tokyo 東京 and more", ("東京",))
    assert final == "tokyo " and "".join(pieces) == final

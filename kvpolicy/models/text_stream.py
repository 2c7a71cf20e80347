"""The text of one answer as its tokens arrive, for printing while it is generated.

Printing each token's own text would break characters whose UTF-8 bytes span several tokens and tokenizers that
merge text across tokens, so each step decodes the whole answer and releases what is new. Text that later tokens
may still change is held back: an incomplete character (decoded as U+FFFD) and a tail that could begin a stop
string (the answer is cut before a stop string, so none of it may be printed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvpolicy.models.decoding import check_stop_strings, cut_at_stop

REPLACEMENT = "\ufffd"  # what a decoder shows for the bytes of a character that is not complete yet


class TextStream:
    """Feed tokens to `push` as they are chosen and print what it returns, then print `finish(final text)`: the
    printed pieces add up to the final text (a decoder that rewrites text it already returned is the exception:
    printed text cannot be taken back)."""

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self.decode = decode
        self.stop_strings = check_stop_strings(stop_strings)
        self.tokens: list[int] = []
        self.printed = ""

    def push(self, token: int) -> str:
        """The text that `token` settles (often "", e.g. for half of a character)."""
        self.tokens.append(token)
        text = cut_at_stop(self.decode(self.tokens), self.stop_strings)
        return self._release(text[: len(text) - self._unsettled(text)])

    def finish(self, text: str) -> str:
        """The rest of the answer's final `text` (all of it cut before any stop string)."""
        return self._release(text)

    def _unsettled(self, text: str) -> int:
        """How many trailing characters of `text` later tokens may still change."""
        partial = len(text) - len(text.rstrip(REPLACEMENT))
        settled = text[: len(text) - partial]
        could_stop = [n for stop in self.stop_strings for n in range(1, len(stop)) if settled.endswith(stop[:n])]
        return partial + max(could_stop, default=0)

    def _release(self, text: str) -> str:
        if not text.startswith(self.printed):
            return ""
        new, self.printed = text[len(self.printed) :], text
        return new

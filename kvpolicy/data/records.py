"""The record types every data source is normalized to."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Turn:
    """One message of a dialogue; role is "system", "user" or "assistant"."""

    role: str
    text: str


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]
    source: str = ""

    @property
    def n_user_turns(self) -> int:
        return sum(t.role == "user" for t in self.turns)

    def messages(self) -> list[dict[str, str]]:
        """Chat-template messages [{"role", "content"}]."""
        return [{"role": t.role, "content": t.text} for t in self.turns]


@dataclass(frozen=True)
class QASample:
    """A question over a context with reference answers (RULER, BoolQ, ARC, LongBench).

    `choices` is set for multiple-choice tasks (answers then holds the correct choice, as its text).
    """

    id: str
    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_prefix: str = ""
    choices: tuple[str, ...] = field(default=())
    source: str = ""

"""`kvp chat`: turns from a file or the terminal on the real SmolLM2, each reply streamed, the cache cut back to the
budget after every turn and kept within budget + every while replying; conversation files checked in one line."""

from __future__ import annotations

import io
import json
import re

import pytest

from kvpolicy.cli import main
from kvpolicy.chat_cli import read_turns

TURNS = ["The secret code is 4721. Remember it.", "What is the secret code?", "Say it once more."]


def _turn_lines(err: str) -> list[tuple[int, int, int]]:
    """(after the cut, after the reply, tokens seen) of each turn line on stderr."""
    pattern = (r"\[turn \d+: cache (\d+) entries per KV head after the turn's cut, (\d+) .* after the reply; "
               r"(\d+) tokens")
    return [tuple(map(int, m)) for m in re.findall(pattern, err)]


@pytest.mark.model
def test_a_scripted_chat_stays_within_the_budget_turn_after_turn(tmp_path, capsys, one_thread):
    conversation = tmp_path / "chat.json"
    conversation.write_text(json.dumps([{"role": "system", "content": "Be brief."},
                                        *({"role": "user", "content": t} for t in TURNS)]))
    assert main(["chat", "--budget", "32", "--every", "8", "--max-new-tokens", "12", "--file", str(conversation)]) == 0
    out, err = capsys.readouterr()
    turns = _turn_lines(err)
    assert len(turns) == 3 and len([line for line in out.splitlines() if line.strip()]) == 3  # one reply a turn
    assert all(after == 32 and end <= 32 + 8 for after, end, _ in turns)
    assert [seen for *_, seen in turns] == sorted(seen for *_, seen in turns)  # the conversation keeps growing
    assert "3 turns; the cache held at most" in err and "and 40 while replying" in err


@pytest.mark.model
def test_the_terminal_chat_ends_at_an_empty_line(monkeypatch, capsys, one_thread):
    monkeypatch.setattr("sys.stdin", io.StringIO(TURNS[0] + "\n\nnever read\n"))
    assert main(["chat", "--scorer", "knorm", "--budget", "24", "--every", "0", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("assistant> ") and len(_turn_lines(err)) == 1 and err.count("you> ") == 2


def test_conversation_files_are_read_or_refused_in_one_line(tmp_path, capsys):
    plain = tmp_path / "chat.txt"
    plain.write_text("first\n\n  second  \n")
    assert read_turns(str(plain)) == ["first", "second"]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user"}]')
    assert main(["chat", "--budget", "32", "--file", str(bad)]) == 1
    assert "each item is a string or a {'role', 'content'} message" in capsys.readouterr().err
    bad.write_text("[not json")
    assert main(["chat", "--budget", "32", "--file", str(bad)]) == 1
    assert "starts like JSON but is not" in capsys.readouterr().err
    assert main(["chat", "--budget", "32", "--file", str(tmp_path / "missing")]) == 1
    assert main(["chat", "--budget", "32", "--scorer", "snapkv", "--file", str(plain)]) == 1
    assert "cannot re-score the cache while decoding" in capsys.readouterr().err

"""Offline data: the essays haystack, ShareGPT record-by-record parsing, hub loaders on schema fixtures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kvpolicy.data.essays import haystack_text, load_essays
from kvpolicy.data.hub import HUB_SOURCES, load_hub
from kvpolicy.data.records import Conversation, QASample
from kvpolicy.data.sharegpt import iter_conversations, iter_json_array
from kvpolicy.errors import KVPError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hub"


def test_essays_are_real_and_clean():
    essays = load_essays()
    assert 40 <= len(essays) <= 49  # 49 files, near-empty ones dropped
    assert all(len(e.text) >= 1000 and "\n" not in e.text for e in essays)
    assert len(haystack_text()) > 600_000
    assert [e.name for e in essays] == sorted(e.name for e in essays)


def test_json_array_stream_survives_truncation_and_small_chunks():
    records = [{"id": i, "text": "x" * (i * 7)} for i in range(20)]
    text = json.dumps(records, indent=1)
    assert list(iter_json_array(io.StringIO(text), chunk_chars=16)) == records
    truncated = text[: text.index('"id": 13') - 5]
    assert list(iter_json_array(io.StringIO(truncated), chunk_chars=16)) == records[:13]


def test_sharegpt_conversations_normalized():
    convs = list(iter_conversations(limit=50))
    assert len(convs) == 50
    assert all(isinstance(c, Conversation) and c.turns for c in convs)
    roles = {t.role for c in convs for t in c.turns}
    assert roles <= {"user", "assistant", "system"}
    assert convs[0].turns[0].role == "user" and "Product Launch Formula" in convs[0].turns[0].text
    assert "stand-in for OASST2" in convs[0].source
    assert any(c.n_user_turns >= 2 for c in convs)


@pytest.mark.parametrize("name", sorted(HUB_SOURCES))
def test_hub_loaders_on_schema_fixtures(name):
    fixture = FIXTURES / {"ruler-4k": "ruler.jsonl"}.get(name, f"{name}.jsonl")
    records = load_hub(name, local=fixture)
    assert records
    for r in records:
        assert isinstance(r, (QASample, Conversation))
    first = records[0]
    if name == "ruler-4k":
        assert first.answers == ("7391842",) and first.answer_prefix.startswith(" The special magic")
        assert records[1].answers == ("AAAAA", "BBBBB")
    elif name == "boolq":
        assert [r.answers for r in records] == [("yes",), ("no",)] and first.choices == ("no", "yes")
        assert first.question == "is the sky blue on a clear day"  # the prompt adds lm-eval's "?"
    elif name == "arc_challenge":
        assert first.answers == ("Planetary days will become shorter.",) and len(first.choices) == 4
        assert first.choices[2] == first.answers[0] and first.question.endswith("rotation?")
    elif name == "oasst2":
        assert len(records) == 1  # the Spanish tree is dropped
        assert [t.text for t in first.turns] == ["How do I boil an egg?", "Place it in boiling water for 9 minutes.",
                                                 "And for a soft yolk?", "About 6 minutes."]
    else:
        assert first.context and first.answers


def test_hub_loader_errors():
    with pytest.raises(KVPError, match="known: ruler-4k"):
        load_hub("squad")
    with pytest.raises(KVPError, match="existing .json"):
        load_hub("boolq", local=FIXTURES / "missing.jsonl")

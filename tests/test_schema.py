"""The JSON schema check behind every file kvpolicy reads: the first bad field, named, in one line."""

from __future__ import annotations

import pytest

from kvpolicy.errors import KVPError
from kvpolicy.schema import Optional, validate

SCHEMA = {
    "name": str,
    "count": int,
    "rate": float,
    "flag": bool,
    "maybe": (int, None),
    "model": {"layers": int, "tags": [str]},
    "rows": [{"file": str}],
    "extra": Optional({"note": str}),
}
GOOD = {"name": "a", "count": 3, "rate": 2, "flag": False, "maybe": None, "model": {"layers": 2, "tags": ["x"]},
        "rows": [{"file": "f"}, {"file": "g", "more": 1}]}


def test_a_matching_document_passes():
    validate(GOOD, SCHEMA, "f.json", "fix it")
    validate(GOOD | {"extra": {"note": "n"}, "unknown": 1}, SCHEMA, "f.json", "fix it")


@pytest.mark.parametrize("edit, message", [
    ({"name": None}, "field 'name' must be a string, got None"),
    ({"count": True}, "field 'count' must be an integer, got True"),
    ({"count": 2.0}, "field 'count' must be an integer"),
    ({"rate": "1"}, "field 'rate' must be a number"),
    ({"maybe": "x"}, "field 'maybe' must be an integer or null"),
    ({"model": {"layers": 2}}, "field 'model.tags' is missing"),
    ({"model": {"layers": 2, "tags": ["x", 3]}}, r"field 'model.tags\[1\]' must be a string"),
    ({"rows": [{"file": "f"}, {}]}, r"field 'rows\[1\].file' is missing"),
    ({"rows": {"file": "f"}}, "field 'rows' must be a list"),
    ({"extra": {"note": 1}}, "field 'extra.note' must be a string"),
])
def test_the_first_bad_field_is_named(edit, message):
    with pytest.raises(KVPError, match=f"^f.json: {message}.*; fix it$"):
        validate(GOOD | edit, SCHEMA, "f.json", "fix it")


def test_a_missing_field_and_a_non_object_are_named():
    doc = dict(GOOD)
    doc.pop("flag")
    with pytest.raises(KVPError, match="^f.json: field 'flag' is missing; fix it$"):
        validate(doc, SCHEMA, "f.json", "fix it")
    with pytest.raises(KVPError, match="^f.json: expected a JSON object, got list; fix it$"):
        validate([1], SCHEMA, "f.json", "fix it")

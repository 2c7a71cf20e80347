"""The results store: keys, durability, resume after a torn write, refusal of other formats."""

from __future__ import annotations

import json

import pytest

from kvpolicy.errors import KVPError
from kvpolicy.evaluation.store import FORMAT, KEY_FIELDS, ResultStore, read_results, record_key


def fields(**over):
    base = {"model_fingerprint": "fp", "scorer_id": "s1", "budget": "b128", "task": "ruler:vt",
            "context_tokens": 1024, "protocol": "query-aware", "seed": 0, "sample": "x/0"}
    return base | over


def test_key_depends_on_every_key_field_and_nothing_else():
    base = record_key(fields())
    for name in KEY_FIELDS:
        assert record_key(fields(**{name: "other"})) != base, name
    assert record_key(fields() | {"value": 1.0, "seconds": 3}) == base
    with pytest.raises(KVPError, match="lacks key fields"):
        record_key({"task": "x"})


def test_append_skip_and_reopen(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    rec = store.append(fields(value=1.0))
    assert rec["format"] == FORMAT and rec["key"] in store
    store.append(fields(budget="b256", value=0.0))
    reopened = ResultStore(path)
    assert len(reopened) == 2 and record_key(fields()) in reopened
    assert record_key(fields(budget="b512")) not in reopened
    assert [r["value"] for r in read_results(path)] == [1.0, 0.0]


def test_torn_last_line_is_dropped_and_appending_continues_cleanly(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append(fields(value=1.0))
    with open(path, "a") as f:  # a sweep killed in the middle of writing a record
        f.write('{"format": 1, "model_fingerprint": "fp", "sco')
    assert len(read_results(path)) == 1
    store = ResultStore(path)
    store.append(fields(budget="b256", value=0.5))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    record = {"format": FORMAT, **fields(value=1.0)}
    path.write_text(json.dumps(record))
    store = ResultStore(path)
    assert len(store) == 1
    store.append(fields(budget="b256", value=0.0))
    assert len(read_results(path)) == 2


def test_other_format_is_refused_with_a_message(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"format": 0, **fields()}) + "\n")
    with pytest.raises(KVPError, match="format 0.*re-run the sweep into a new results file"):
        ResultStore(path)
    path.write_text(json.dumps(fields()) + "\n")  # no format at all
    with pytest.raises(KVPError, match="format None"):
        read_results(path)


def test_damaged_line_and_missing_file_are_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    with pytest.raises(KVPError, match="bad.jsonl:1 is not valid JSON"):
        read_results(path)
    with pytest.raises(KVPError, match="does not exist"):
        read_results(tmp_path / "missing.jsonl")

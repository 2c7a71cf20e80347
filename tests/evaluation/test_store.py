"""Result records and the results store: keys, the typed record and its JSON, durability, resume after a torn
write, refusal of other schema versions and of malformed records, repeated keys, and concurrent writers sharing
one file."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from kvpolicy.errors import KVPError
from kvpolicy.evaluation.result import KEY_FIELDS, SCHEMA, Result, record_key
from kvpolicy.evaluation.store import ResultStore, read_results


def fields(**over):
    base = {"model_fingerprint": "fp", "scorer_id": "s1", "budget": "b128", "task": "ruler:vt",
            "context_tokens": 1024, "protocol": "query-aware", "seed": 0, "sample": "x/0"}
    return base | over


def record(**over):
    """A complete accuracy record (key fields and everything the report reads), as JSON fields."""
    measured = {"model": "smollm2-135m", "scorer": "knorm", "scorer_label": "KNorm", "family": "RULER-style",
                "data": "RULER-style tasks", "metric": "accuracy", "kept": 128, "value": 1.0, "seconds": 0.25}
    return fields() | measured | over


def result(**over) -> Result:
    """record(**over) as a Result."""
    return Result(**record(**over))


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
    rec = store.append(result(value=1.0))
    assert rec.schema == SCHEMA and rec.key in store
    store.append(result(budget="b256", value=0.0))
    reopened = ResultStore(path)
    assert len(reopened) == 2 and record_key(fields()) in reopened
    assert record_key(fields(budget="b512")) not in reopened
    assert [r.value for r in read_results(path).records] == [1.0, 0.0]
    assert all(json.loads(line)["schema"] == SCHEMA for line in path.read_text().splitlines())


def test_torn_last_line_is_dropped_and_appending_continues_cleanly(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append(result(value=1.0))
    with open(path, "a") as f:  # a sweep killed in the middle of writing a record
        f.write(f'{{"schema": {SCHEMA}, "model_fingerprint": "fp", "sco')
    assert len(read_results(path).records) == 1
    store = ResultStore(path)
    store.append(result(budget="b256", value=0.5))
    with open(path, "a") as f:  # stray bytes after the last line (a hand edit)
        f.write("  ")
    store.append(result(budget="b512", value=0.5))
    store.append(result(budget="b1024", value=0.5))
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    assert len(ResultStore(path)) == 4


def test_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"schema": SCHEMA, **record(value=1.0)}))
    store = ResultStore(path)
    assert len(store) == 1
    store.append(result(budget="b256", value=0.0))
    assert len(read_results(path).records) == 2


def test_other_schema_is_refused_with_a_message(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"schema": 0, **fields()}) + "\n")
    with pytest.raises(KVPError, match="schema 0.*re-run the sweep into a new results file"):
        ResultStore(path)
    path.write_text(json.dumps(fields()) + "\n")  # no schema version at all
    with pytest.raises(KVPError, match="without a schema version"):
        read_results(path)
    path.write_text(json.dumps({"format": 1, **record()}) + "\n")  # written by a kvpolicy of schema 1
    message = (f"{path}:1 holds results of schema 1; this kvpolicy reads schema {SCHEMA}; "
               "re-run the sweep into a new results file")
    for read in (read_results, ResultStore):
        with pytest.raises(KVPError) as err:
            read(path)
        assert str(err.value) == message


def test_a_result_round_trips_through_its_json():
    full = result(budget="full", scorer="full", corpus=None, context_tokens=None, prediction="7391842",
                  answers=["7391842"], length=300, cache_bytes=1000, cache_bytes_full=1000, created="2026-01-01")
    cost = result(metric="cost", budget="b64", lost=0.2, best=0.1, per_head=[[1.5, 2.0]], value=2.0)
    for r in (full, cost):
        obj = json.loads(json.dumps(r.to_json()))
        assert obj["schema"] == SCHEMA and obj["key"] == r.key == record_key(obj)
        assert Result.from_json(obj, "here") == r
    learned = result(scorer_kind="learned", scorer_identity={"trained_on": {"source": "ruler", "context_tokens": 512}})
    assert learned.trained_on.source == "ruler" and learned.trained_on.context_tokens == 512
    assert result().trained_on is None


def test_damaged_line_and_missing_file_are_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    with pytest.raises(KVPError, match="bad.jsonl:1 is not valid JSON"):
        read_results(path)
    with pytest.raises(KVPError, match="does not exist"):
        read_results(tmp_path / "missing.jsonl")


def _line(**over) -> str:
    return json.dumps({"schema": SCHEMA, **record(**over)})


@pytest.mark.parametrize("line, problem", [
    (f'{{"schema": {SCHEMA}}}', "field 'model_fingerprint' is missing"),
    (_line(seed="x"), "field 'seed' must be an integer, got 'x'"),
    (_line(context_tokens="1024"), "field 'context_tokens' must be an integer or null"),
    (_line(metric="bleu"),
     "field 'metric' must be one of accuracy, acc, acc_norm, rouge_l, retrieval_score, perplexity, cost, got 'bleu'"),
    (_line(metric="perplexity", n_tokens=20), "field 'nll_sum' is missing"),
    (_line(metric="cost", lost=0.2, best=0.1), "field 'per_head' is missing"),
    (_line(metric="cost", budget="all", per_head=[[1.0, "x"]]), r"field 'per_head\[0\]\[1\]' must be a number"),
    (_line(scorer_identity={"trained_on": {"source": 3}}), "field 'scorer_identity.trained_on.source' must be"),
    (_line(length="long"), "field 'length' must be an integer or null"),
    (_line(nll_sum="x"), "field 'nll_sum' must be a number or null"),
    (_line(metric="perplexity", nll_sum=None, n_tokens=20), "field 'nll_sum' must be a number, got None"),
])
def test_malformed_record_names_file_line_and_field(tmp_path, line, problem):
    path = tmp_path / "r.jsonl"
    path.write_text(_line() + "\n" + line + "\n")
    with pytest.raises(KVPError, match=f"r.jsonl:2: {problem}") as err:
        read_results(path)
    assert "\n" not in str(err.value)
    with pytest.raises(KVPError, match=f"r.jsonl:2: {problem}"):
        ResultStore(path)
    path.write_text(_line() + "\n" + line)  # the last record, without its newline
    with pytest.raises(KVPError, match=f"r.jsonl:2: {problem}"):
        read_results(path)


def test_records_of_every_metric_pass_and_a_malformed_one_is_never_written(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    store.append(result(metric="perplexity", nll_sum=30.5, n_tokens=20, value=4.6))
    store.append(result(metric="cost", budget="b64", lost=0.2, best=0.1, per_head=[[1.5, 2.0]], value=2.0))
    store.append(result(metric="cost", budget="all", per_head=[[1.2, 1.0]], value=1.1))
    store.append(result(budget="full", scorer_identity={"name": "full"}, corpus=None, context_tokens=None))
    with pytest.raises(KVPError, match="field 'kept' must be an integer"):
        store.append(result(budget="b32", kept="many"))
    with pytest.raises(KVPError, match="field 'per_head' is missing"):
        store.append(result(metric="cost", budget="b32", lost=0.2, best=0.1))
    assert len(read_results(store.path).records) == len(store) == 4


def test_repeated_keys_are_read_once_and_counted(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join([_line(value=1.0), _line(budget="b256"), _line(value=0.0), _line(value=0.5)]) + "\n")
    results = read_results(path)
    assert [(r.budget, r.value) for r in results.records] == [("b128", 1.0), ("b256", 1.0)]  # the first kept
    assert results.duplicates == 2
    assert results.note == f"dropped 2 repeated records (same key) from {path}"
    assert len(ResultStore(path)) == 2
    path.write_text(_line() + "\n")
    assert read_results(path).duplicates == 0 and read_results(path).note is None


def test_summary_notes_dropped_repeats(tmp_path, capsys):
    from kvpolicy.report.summary import print_summary

    path = tmp_path / "r.jsonl"
    path.write_text("\n".join([_line(), _line(), _line(sample="x/1")]) + "\n")
    print_summary(path)
    out, err = capsys.readouterr()
    assert err == f"note: dropped 1 repeated record (same key) from {path}\n"
    assert "n = 2 samples per point" in out


BUDGETS = [f"b{i}" for i in range(40)]


def _append_all(path: str, budgets: list[str], start) -> None:
    store = ResultStore(path)
    start.wait()
    for budget in budgets:
        store.append(result(budget=budget))


def test_concurrent_writers_write_each_key_once(tmp_path):
    path = tmp_path / "r.jsonl"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    writers = [context.Process(target=_append_all, args=(str(path), budgets, start))
               for budgets in (BUDGETS, BUDGETS[::-1])]  # every record wanted by both, met in the middle
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
        assert w.exitcode == 0
    results = read_results(path)
    assert results.duplicates == 0 and sorted(r.budget for r in results.records) == sorted(BUDGETS)
    assert len(path.read_text().splitlines()) == len(BUDGETS)


def _claim_and_die_mid_write(path: str, claimed) -> None:
    store = ResultStore(path)
    with store.claim({"unit": 1}):
        with open(path, "a") as f:
            f.write(f'{{"schema": {SCHEMA}, "model_fingerprint": "fp", "sco')  # to be killed while writing a record
        claimed.set()
        time.sleep(120)


def test_a_claim_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append(result())
    context = multiprocessing.get_context("spawn")
    claimed = context.Event()
    holder = context.Process(target=_claim_and_die_mid_write, args=(str(path), claimed))
    holder.start()
    try:
        assert claimed.wait(120)
        with store.claim({"unit": 1}) as held:
            assert not held
        with store.claim({"unit": 2}) as held:
            assert held
    finally:
        holder.kill()
        holder.join()
    with store.claim({"unit": 1}, wait=True) as held:  # free at once: its holder is gone
        assert held
        assert store.append(result(budget="b256")) is not None  # after cutting the torn record
        assert store.append(result()) is None  # already there
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_the_dtype_is_part_of_the_key_and_float32_keeps_the_old_keys():
    old = fields()
    assert "model_dtype" not in old  # written before dtypes were recorded: every such run was float32
    assert record_key(old | {"model_dtype": "float32"}) == record_key(old)
    assert record_key(old | {"model_dtype": "bfloat16"}) != record_key(old)

"""The archive form of a results file (`results.jsonl.gz`): lossless packing (the same records field for field, and
the same bytes back), each scorer identity stored once, deterministic bytes, the committed studies' archives equal to
the plain files they replaced, the readers' checks on damaged archives, and `kvp results pack | unpack`."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import pytest

from kvpolicy.errors import KVPError
from kvpolicy.evaluation import cli as results_cli
from kvpolicy.evaluation.result import Result
from kvpolicy.evaluation.store import ResultStore, pack_results, read_results, unpack_results

DOCS = Path(__file__).parents[2] / "docs" / "results"
# sha256 of the plain results files that the committed archives replaced (git history before issue 34)
ORIGINALS = {"qwen2.5-0.5b-mix": "f51ed9bea249b125266885786b7cc54376f431fce95524fe1cb3260ea9359d18",
             "smollm2-135m-mix": "c0247e6500fae13eb2b00f65c2d3df0c7b23ee421422099b29721e6b9693dfe1"}
LEARNED = {"name": "kvp", "checkpoint": "ck", "sha256": "ab" * 32,
           "trained_on": {"source": "mix", "context_tokens": 2048, "prompts": 64, "steps": 600}}


def record(scorer: str, budget: str, sample: str, value: float, identity: dict | None) -> dict:
    rec = {"model": "smollm2-135m", "model_fingerprint": "fp", "scorer": scorer, "scorer_label": scorer.upper(),
           "scorer_kind": "learned" if scorer == "kvp" else "heuristic", "scorer_id": f"id-{scorer}",
           "budget": budget, "kept": int(budget[1:]), "task": "ruler:vt", "family": "RULER-style",
           "data": "RULER-style tasks", "metric": "accuracy", "protocol": "query-aware", "context_tokens": 512,
           "seed": 0, "sample": sample, "value": value, "seconds": 0.25}
    return rec | ({"scorer_identity": identity} if identity is not None else {})


@pytest.fixture
def plain(tmp_path) -> Path:
    """A results file written by ResultStore: a learned and a heuristic scorer at two budgets and three samples."""
    store = ResultStore(tmp_path / "results.jsonl")
    for sample in ("a", "b", "c"):
        for budget in ("b64", "b128"):
            store.append(Result(**record("kvp", budget, sample, 1.0, LEARNED)))
            store.append(Result(**record("knorm", budget, sample, 0.5, {"name": "knorm"})))
    store.close()
    return store.path


def lines_of(archive: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(archive.read_bytes()).splitlines()]


def test_pack_stores_each_identity_once_and_unpacks_to_the_same_bytes(plain, tmp_path):
    archive = pack_results(plain)
    assert archive == plain.with_name("results.jsonl.gz")
    header, *packed = lines_of(archive)
    assert header["scorer_identities"] == {"id-knorm": {"name": "knorm"}, "id-kvp": LEARNED}
    assert len(packed) == 12 and not any("scorer_identity" in r or "key" in r for r in packed)
    assert read_results(archive).records == read_results(plain).records
    unpack_results(archive, tmp_path / "back.jsonl")
    assert (tmp_path / "back.jsonl").read_bytes() == plain.read_bytes()


def test_packing_is_deterministic(plain, tmp_path):
    first = pack_results(plain, tmp_path / "a.jsonl.gz").read_bytes()
    assert pack_results(plain, tmp_path / "b.jsonl.gz").read_bytes() == first
    assert first[4:8] == b"\0\0\0\0"  # gzip mtime 0


def test_what_cannot_be_derived_is_kept_in_the_record(tmp_path):
    """Lossless for any valid file: a scorer id with two identities, a record without an identity or without a key,
    a key other than its fields', and a repeated record."""
    rows = [record("kvp", "b64", "a", 1.0, LEARNED), record("kvp", "b128", "a", 1.0, LEARNED | {"checkpoint": "x"}),
            record("knorm", "b64", "a", 0.5, None), record("knorm", "b128", "a", 0.5, {"name": "knorm"})]
    keyed = [Result(**row).to_json() for row in rows]
    del keyed[2]["scorer_identity"]
    keyed[2]["key"] = "not-its-key"
    del keyed[3]["key"]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in keyed + keyed[:1])
    plain = tmp_path / "r.jsonl"
    plain.write_text(text)
    archive = pack_results(plain)
    header, *packed = lines_of(archive)
    assert header["scorer_identities"] == {}  # id-kvp has two identities; id-knorm's records one and none
    assert packed[2]["key"] == "not-its-key" and packed[3]["key"] is None and "key" not in packed[0]
    assert read_results(archive).records == read_results(plain).records and read_results(archive).duplicates == 1
    unpack_results(archive, tmp_path / "back.jsonl")
    assert (tmp_path / "back.jsonl").read_text() == text


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_committed_archives_unpack_to_the_plain_files_they_replaced(name, tmp_path):
    archive = DOCS / name / "results.jsonl.gz"
    back = unpack_results(archive, tmp_path / "results.jsonl")
    assert hashlib.sha256(back.read_bytes()).hexdigest() == ORIGINALS[name]
    assert read_results(archive).records == read_results(back).records
    assert pack_results(back).read_bytes() == archive.read_bytes()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "is not a complete gzip file"),
    (lambda b: b"{}\n", "is not a complete gzip file"),
    (lambda b: gzip.compress(b"", mtime=0), "is not a kvpolicy results archive"),
    (lambda b: gzip.compress(b"\n".join(gzip.decompress(b).splitlines()[1:]) + b"\n", mtime=0),
     "is not a kvpolicy results archive"),
    (lambda b: gzip.compress(gzip.decompress(b)[:-1], mtime=0), "ends in an unfinished line"),
    (lambda b: gzip.compress(gzip.decompress(b) + b"{oops\n", mtime=0), r"r\.jsonl\.gz:14 is not valid JSON"),
    (lambda b: gzip.compress(gzip.decompress(b).replace(b'"value": 0.5', b'"value": 5.0', 1), mtime=0),
     r"r\.jsonl\.gz:3: field 'value' must be a finite number in \[0, 1\]"),
    (lambda b: gzip.compress(b"x" * (2 << 20), mtime=0), "has a line longer than"),
])
def test_a_damaged_archive_is_one_line_naming_it(plain, tmp_path, damage, message):
    archive = tmp_path / "r.jsonl.gz"
    archive.write_bytes(damage(pack_results(plain).read_bytes()))
    with pytest.raises(KVPError, match=message) as err:
        read_results(archive)
    assert str(archive) in str(err.value) and "\n" not in str(err.value)


def test_a_sweep_never_appends_to_an_archive_and_unpack_never_overwrites(plain, tmp_path):
    archive = pack_results(plain)
    with pytest.raises(KVPError, match="unpack it first"):
        ResultStore(archive)
    with pytest.raises(KVPError, match="exists; unpacking never overwrites"):
        unpack_results(archive, plain)
    with pytest.raises(KVPError, match="ends in .gz"):
        pack_results(plain, tmp_path / "r.jsonl.zip")
    with pytest.raises(KVPError, match="is packed already"):
        pack_results(archive)


def test_results_command_packs_and_unpacks(plain, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    results_cli.add_arguments(parser)
    archive, back = tmp_path / "packed.jsonl.gz", tmp_path / "back.jsonl"
    assert results_cli.run(parser.parse_args(["pack", str(plain), "--out", str(archive)])) == 0
    assert results_cli.run(parser.parse_args(["unpack", str(archive), "--out", str(back)])) == 0
    assert back.read_bytes() == plain.read_bytes()
    assert f"into {archive}" in capsys.readouterr().out


def test_kvp_results_and_report_read_an_archive(plain, tmp_path, capsys):
    from kvpolicy.cli import main

    assert main(["results", "pack", str(plain)]) == 0
    archive = plain.with_name("results.jsonl.gz")
    assert main(["results", "unpack", str(archive), "--out", str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_bytes() == plain.read_bytes()
    assert main(["report", str(archive), "--out", str(tmp_path / "report")]) == 0
    assert "12 results from" in (tmp_path / "report" / "report.md").read_text()
    assert main(["results", "unpack", str(archive), "--out", str(plain)]) == 1
    assert capsys.readouterr().err.count("\n") == 1

"""Chunked prefill in sweeps: `kvp sweep --prefill-chunk C` runs each QA and (prompt-once) dialogue prompt fed C tokens
at a time, cut after each chunk, beside compress-once; results are keyed by C in their `every` field, scorers that
rank only a whole prefill run compress-once only (with a note), and the report draws each chunk size in its own
panel beside the learned policy's compress-once line."""

from __future__ import annotations

import json

import pytest

from kvpolicy.errors import KVPError
from kvpolicy.evaluation.result import FULL
from kvpolicy.evaluation.store import ResultStore
from kvpolicy.evaluation.sweep import Sweep, SweepConfig
from kvpolicy.report.aggregate import ONCE_SUFFIX, curve_groups

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.model
def test_sweep_runs_chunked_prefills_beside_compress_once(smollm, tmp_path, capsys):
    from kvpolicy.cli import main

    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--task", "ruler:niah_single_1", "dialogue", "--context", "256", "--n", "1",
                 "--budget", "48", "--prefill-chunk", "96", "--protocol", "query-aware", "prompt-once",
                 "--scorer", "knorm", "kvp:smollm2-135m", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by = {(r["task"], r["scorer"], r.get("every")): r for r in records}
    for task in ("ruler:niah_single_1", "dialogue"):
        assert {s for t, s, e in by if t == task and e is None} == {FULL, "knorm", "kvp:smollm2-135m"}
        assert {s for t, s, e in by if t == task and e == 96} == {"knorm", "kvp:smollm2-135m"}
        for scorer in ("knorm", "kvp:smollm2-135m"):
            once, chunked = by[task, scorer, None], by[task, scorer, 96]
            assert chunked["kept"] == once["kept"] == 48 and chunked["cache_bytes"] == once["cache_bytes"]
            assert chunked["cache_bytes_full"] == once["cache_bytes_full"] and chunked["prefill_seconds"] > 0
    assert by["dialogue", "knorm", 96]["protocol"] == "prompt-once"
    groups = curve_groups(ResultStore(out).records())
    titles = {panel.title: panel for group in groups for panel in group.panels}
    chunked = titles["ruler:niah_single_1, prefilled 96 tokens at a time, cut after each"]
    assert {line.scorer for line in chunked.lines} >= {"KNorm", "KVP (bundled)", "KVP (bundled)" + ONCE_SUFFIX}
    assert chunked.reference is not None and "ruler:niah_single_1" in titles  # compress-once keeps its panel


@pytest.mark.model
def test_scorers_ranking_only_a_whole_prefill_run_compress_once_only_with_a_note(smollm, tmp_path):
    sweep = Sweep(SweepConfig(out=str(tmp_path / "r.jsonl"), tasks=["ruler:niah_single_1"], context_tokens=[256],
                              n_samples=1, budgets=["48"], scorers=["knorm", "kvzap_linear"], prefill_chunks=[96],
                              protocols=["query-aware"]))
    units = {unit.every: [c.spec for c in unit.contenders] for unit in sweep.plan(smollm)}
    assert units == {None: [FULL, "knorm", "kvzap_linear"], 96: ["knorm"]}
    assert "ruler:niah_single_1: KVzap (linear) ran compress-once only under query-aware" in sweep.notes[0]


def test_sweep_refuses_a_prefill_chunk_a_scorer_cannot_rank_with(tmp_path):
    with pytest.raises(KVPError, match="use --prefill-chunk 65 or more"):
        Sweep(SweepConfig(out=str(tmp_path / "r.jsonl"), tasks=["ruler:vt"], scorers=["snapkv"], budgets=["64"],
                          prefill_chunks=[32]))
    with pytest.raises(KVPError, match="--prefill-chunk"):
        SweepConfig(out=str(tmp_path / "r.jsonl"), prefill_chunks=[0])

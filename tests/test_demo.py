"""`kvp demo --quick`: the whole pipeline (traces, training, sweep, report) at tiny sizes, then a re-run that
reuses every finished stage."""

from __future__ import annotations

import json
import time

import pytest

from kvpolicy.demo import QUICK, DemoPaths, run_demo


@pytest.mark.model
def test_quick_demo_runs_end_to_end_and_resumes(smollm, tmp_path, capsys):
    from dataclasses import replace

    cfg = replace(QUICK, out=str(tmp_path / "demo"))
    html = run_demo(cfg)
    out = capsys.readouterr().out
    paths = DemoPaths(tmp_path / "demo")
    records = [json.loads(line) for line in paths.results.read_text().splitlines()]
    labels = {r["scorer_label"] for r in records}
    assert {"KVP", "KVP (bundled)", "Random", "StreamingLLM", "KNorm", "KeyDiff", "TOVA", "SnapKV", "full cache",
            "Oracle"} <= labels  # the policy the demo trains, and the one bundled for the model
    assert {r["protocol"] for r in records} == {"query-aware", "prompt-once", "multi-turn", "traces"}
    assert {r["metric"] for r in records} == {"accuracy", "perplexity", "cost"}
    assert {r["context_tokens"] for r in records if r["metric"] == "accuracy"} == {QUICK.context_tokens,
                                                                                   QUICK.long_context_tokens}
    assert "at a longer context than trained" in out and "a cross-corpus check" in out
    kvp = next(r for r in records if r["scorer_kind"] == "learned")
    assert len(kvp["scorer_identity"]["sha256"]) == 64  # results are keyed by the checkpoint's hash
    assert html.is_file() and "Report:" in out and str(html.resolve()) in out
    assert "Accuracy vs KV cache size" in out and "samples/min" in out

    start = time.perf_counter()
    run_demo(cfg)  # everything is reused: no new trace, training step or result
    again = capsys.readouterr().out
    assert "0 new results" in again and len(paths.results.read_text().splitlines()) == len(records)
    assert time.perf_counter() - start < 60

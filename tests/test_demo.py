"""`kvp demo --quick`: the whole pipeline (traces, training, sweeps, report) at tiny sizes, run as the demo preset of
`kvp experiment`; then a re-run that skips every stage OUT/stages.json records as finished and resumes the ones it
does not (a demo killed during its last sweep)."""

from __future__ import annotations

import json
import time

import pytest

from kvpolicy.cli import main
from kvpolicy.presets.demo import QUICK


@pytest.mark.model
def test_quick_demo_runs_end_to_end_and_resumes(smollm, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = out / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()]
    labels = {r["scorer_label"] for r in records}
    assert {"KVP", "KVP (bundled)", "Random", "StreamingLLM", "KNorm", "KeyDiff", "TOVA", "SnapKV (window 16)",
            "full cache", "Oracle"} <= labels  # the policy the demo trains, and the one bundled for the model
    assert {r["protocol"] for r in records} == {"query-aware", "prompt-once", "multi-turn", "traces"}
    assert {r["metric"] for r in records} == {"accuracy", "perplexity", "cost"}
    assert {r["context_tokens"] for r in records if r["metric"] == "accuracy"} == {QUICK.context_tokens,
                                                                                   QUICK.long_context_tokens}
    assert "at a longer context than trained" in printed and "a cross-corpus check" in printed
    kvp = next(r for r in records if r["scorer_kind"] == "learned")
    assert len(kvp["scorer_identity"]["sha256"]) == 64  # results are keyed by the checkpoint's hash
    html = out / "report" / "report.html"
    assert html.is_file() and f"Report: {html.resolve()}" in printed
    assert "Accuracy vs KV cache size" in printed.rsplit("[report] done in", 1)[1] and "samples/min" in printed
    assert printed.count("samples/min") == 1 and "next: kvp report" not in printed  # the tables once, at the end
    log = json.loads((out / "stages.json").read_text())
    stages = [s.name for s in QUICK.stages(out)]
    assert sorted(log) == sorted(stages) and all(f"[{name}] done in" in printed for name in stages)

    del log["costs"], log["report"]  # as if killed during the last sweep
    (out / "stages.json").write_text(json.dumps(log))
    start = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert all(f"[{name}] done earlier" in again for name in stages[:-2])
    assert "[costs] kvp sweep" in again and "0 new results" in again and "[report] kvp report" in again
    assert len(results.read_text().splitlines()) == len(records)  # every result the sweep had written was kept
    assert sorted(json.loads((out / "stages.json").read_text())) == sorted(stages)
    assert time.perf_counter() - start < 30

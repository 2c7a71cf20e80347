"""Eviction during long generation (protocol bounded-stream) on the real model at short streams: a budget that holds
the whole stream gives one teacher-forced forward's NLL, StreamingLLM keeps exactly the sinks and the newest tokens,
the cache never holds more than budget + N entries, query-based scorers rank with the chunk just fed (and are
refused when it is too short), ratio budgets are refused, and `kvp sweep` writes, keys by N and resumes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.scorers import ALL_QUERIES, make_scorer
from kvpolicy.compression import engine
from kvpolicy.errors import KVPError
from kvpolicy.evaluation import bounded_stream, sweep
from kvpolicy.evaluation.names import BOUNDED_STREAM, PROTOCOLS
from kvpolicy.evaluation.result import FULL, KEY_FIELDS, record_key
from kvpolicy.evaluation.bounded_stream import stream_nll, stream_steps
from kvpolicy.evaluation.sweep import Sweep, SweepConfig
from kvpolicy.evaluation.bounded_stream import StreamTask
from kvpolicy.evaluation.tasks import known_tasks, resolve_tasks

BUDGET, EVERY = 64, 32
pytestmark = pytest.mark.usefixtures("one_thread")  # many small forwards: a second thread only adds contention


@pytest.fixture(scope="module")
def essay(smollm) -> torch.Tensor:
    """The first eval-split essay window of 256 tokens, ids (1, 256)."""
    (task,) = resolve_tasks(["longgen:essays"])
    (sample,) = task.load(smollm, 1, 256, 0)
    assert sample.ids.shape == (1, 256)
    return sample.ids


def teacher_forced_nll(handle, ids: torch.Tensor) -> torch.Tensor:
    """Slow reference: NLL (T - 1,) of tokens 1.. of ids (1, T) from one forward over the whole text."""
    with torch.no_grad():
        logits = handle.model(ids.to(handle.model.device)).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:].to(logits.device), reduction="none")


def test_registry_protocol_and_old_keys():
    tasks = resolve_tasks(["longgen", "longgen:essays"])
    assert [t.name for t in tasks] == ["longgen:essays", "longgen:dialogue"]
    assert all(isinstance(t, StreamTask) and t.protocols == (BOUNDED_STREAM,) and t.sized for t in tasks)
    assert "stand-in for OASST2" in tasks[1].data and "eval split" in tasks[0].data
    assert BOUNDED_STREAM in PROTOCOLS and "longgen:TASK (TASK in essays, dialogue)" in known_tasks()
    with pytest.raises(KVPError, match="unknown task 'longgen:poems'"):
        resolve_tasks(["longgen:poems"])
    key = {name: "x" for name in KEY_FIELDS if name not in ("model_dtype", "every")}
    assert record_key(key | {"every": None}) == record_key(key) != record_key(key | {"every": 64})  # old keys hold


@pytest.mark.model
def test_a_budget_holding_the_whole_stream_is_one_teacher_forced_forward(smollm, essay):
    reference = teacher_forced_nll(smollm, essay)
    steps = list(stream_steps(smollm, essay, make_scorer("knorm"), Budget(tokens=essay.shape[1]), 64))
    assert [s.nll.numel() for s in steps] == [64, 64, 64, 63]  # the first token is prefilled alone, then chunks of N
    assert torch.allclose(torch.cat([s.nll for s in steps]), reference, atol=2e-4)
    assert steps[-1].state.length == essay.shape[1]  # nothing was cut


@pytest.mark.model
def test_streaming_llm_keeps_the_sinks_and_the_newest_tokens(smollm, essay):
    sinks = Budget(tokens=BUDGET).sinks
    lengths = []  # (fed, after the cut) per chunk
    for step in stream_steps(smollm, essay, make_scorer("streaming_llm"), Budget(tokens=BUDGET), EVERY):
        lengths.append((step.fed, step.state.length))
        if step.state.length < step.fed:
            fed = step.state.next_position
            kept = torch.tensor(list(range(sinks)) + list(range(fed - (BUDGET - sinks), fed)))
            assert all((positions == kept).all() for positions in step.state.positions)  # every layer and head
    # 255 tokens after the first in chunks of 32: the first leaves 33 entries (no cut), the last 64 + 31 (none due)
    assert lengths == [(33, 33), (BUDGET + 1, BUDGET)] + [(BUDGET + EVERY, BUDGET)] * 5 + [(BUDGET + 31,) * 2]


@pytest.mark.model
@pytest.mark.parametrize("spec", ["tova", "h2o"])
def test_query_based_scorers_rank_with_the_chunk_just_fed(smollm, essay, monkeypatch, spec):
    scorer = make_scorer(spec)
    seen = []

    def compress(handle, state, scorer, budget):
        seen.append((state.recorded[0].rows, state.recorded[0].whole_chunk))
        return real(handle, state, scorer, budget)

    real = engine.compress  # the cut of the chunked feed streams share with chunked prefills
    monkeypatch.setattr(engine, "compress", compress)
    result = stream_nll(smollm, essay, scorer, Budget(tokens=BUDGET), EVERY)
    every_row = scorer.query_window == ALL_QUERIES  # H2O: the whole chunk; TOVA: its last token
    assert seen == [(EVERY if every_row else scorer.query_window, every_row)] * 6  # every cut, each on its chunk
    assert result.peak == BUDGET + EVERY and result.n_tokens == essay.shape[1] - 1 and math.isfinite(result.nll_sum)


def test_scorers_needing_more_rows_than_a_chunk_are_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(bounded_stream, "prefill", lambda *a, **k: pytest.fail("work started before the check"))
    ids = torch.zeros(1, 256, dtype=torch.long)
    snapkv = make_scorer("snapkv")  # needs its window + 1 = 65 rows
    with pytest.raises(KVPError, match="'snapkv' ranks with the attention inputs of the last 65 tokens.*--every 65"):
        stream_nll(None, ids, snapkv, Budget(tokens=BUDGET), EVERY)
    with pytest.raises(KVPError, match="not a ratio"):
        stream_nll(None, ids, make_scorer("knorm"), Budget(ratio=0.5), EVERY)
    with pytest.raises(KVPError, match="both a scorer and a budget"):
        stream_nll(None, ids, snapkv, None, EVERY)


def test_the_sweep_refuses_ratio_budgets_and_short_chunks_before_any_work(tmp_path, monkeypatch, capsys):
    from kvpolicy.cli import main

    monkeypatch.setattr(sweep, "load_model", lambda *a, **k: pytest.fail("work started before the check"))
    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--task", "longgen:essays", "--budget", "64", "0.5", "--scorer", "knorm",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvp sweep: error: a bounded stream keeps a number of entries") and err.count("\n") == 1
    with pytest.raises(KVPError, match="'snapkv'.*--every 65"):
        Sweep(SweepConfig(out=str(out), tasks=["longgen:dialogue"], scorers=["snapkv"], budgets=["64"], every=[32]))
    with pytest.raises(KVPError, match="--every"):
        SweepConfig(out=str(out), tasks=["longgen:essays"], every=[0])
    assert not out.exists()


@pytest.mark.model
def test_sweep_writes_perplexity_per_interval_and_resumes(smollm, tmp_path, capsys):
    from kvpolicy.cli import main

    out = tmp_path / "r.jsonl"
    command = ["sweep", "--task", "longgen:essays", "--context", "400", "--n", "1", "--budget", "64", "--every", "32",
               "--scorer", "knorm", "kvp:smollm2-135m", "tova", "--out", str(out)]
    assert main(command) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by = {r["scorer"]: r for r in records}
    assert sorted(by) == sorted([FULL, "knorm", "kvp:smollm2-135m", "tova"])
    assert all(r["protocol"] == BOUNDED_STREAM and r["metric"] == "perplexity" and r["length"] == 400
               and r["n_tokens"] == 399 and r["value"] == pytest.approx(math.exp(r["nll_sum"] / 399)) for r in records)
    assert "every" not in by[FULL] and by[FULL]["kept"] == 400  # the reference cuts nothing: no interval
    assert all(by[s]["every"] == 32 and by[s]["kept"] == 64 for s in ("knorm", "kvp:smollm2-135m", "tova"))
    (task,) = resolve_tasks(["longgen:essays"])
    (sample,) = task.load(smollm, 1, 400, 0)
    assert by[FULL]["nll_sum"] == pytest.approx(float(teacher_forced_nll(smollm, sample.ids).sum()), rel=1e-5)
    assert all(by[s]["value"] > by[FULL]["value"] for s in ("knorm", "kvp:smollm2-135m", "tova"))
    assert by["knorm"]["cache_bytes"] * 400 == by[FULL]["cache_bytes"] * 64
    capsys.readouterr()
    assert main(command) == 0  # resumed: nothing new
    assert "sweep: 0 new results, 4 already done" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 4
    again = sweep.run_sweep(SweepConfig(out=str(out), tasks=["longgen:essays"], context_tokens=[400], n_samples=1,
                                        budgets=["64"], scorers=["knorm"], every=[32, 48]))
    assert (again.written, again.skipped) == (1, 2)  # knorm at N = 48 is a new result; the reference is shared
    latest = json.loads(out.read_text().splitlines()[-1])
    assert (latest["scorer"], latest["every"]) == ("knorm", 48) and latest["key"] != by["knorm"]["key"]

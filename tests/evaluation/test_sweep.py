"""The sweep on the real model at short context: rank once / cut many agrees with the engine's own generate(),
nothing is prefilled twice, results resume, concurrent sweeps share the work, dialogue protocols and trace costs
behave, bad input, unwritable outputs and samples longer than the model are refused before any work."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import generate
from kvpolicy.errors import KVPError
from kvpolicy.evaluation import costs, lineup, perplexity, qa, sweep
from kvpolicy.evaluation.lineup import make_contenders
from kvpolicy.evaluation.result import FULL
from kvpolicy.evaluation.store import read_results
from kvpolicy.evaluation.sweep import Sweep, SweepConfig, WorkUnit, run_sweep
from kvpolicy.evaluation.names import MULTI_TURN, PROMPT_ONCE, QUERY_AWARE, QUESTION_AGNOSTIC, TRACES
from kvpolicy.evaluation.tasks import resolve_tasks
from kvpolicy.experiment import PRESETS


class Counter:
    """Wraps a real engine function and counts its calls (and fresh prefills: those without a state)."""

    def __init__(self, fn):
        self.fn, self.calls, self.fresh = fn, 0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.fresh += len(args) < 3 and kwargs.get("state") is None
        return self.fn(*args, **kwargs)


def test_bad_input_lists_the_known_names(tmp_path):
    out = str(tmp_path / "r.jsonl")
    with pytest.raises(KVPError, match="unknown scorer 'magic'; known scorers: random, streaming_llm"):
        Sweep(SweepConfig(out=out, scorers=["magic"]))
    with pytest.raises(KVPError, match="unknown model 'gpt5'; known models: smollm2-135m"):
        Sweep(SweepConfig(out=out, models=["gpt5"]))
    with pytest.raises(KVPError, match="unknown task 'mmlu'; known tasks: ruler"):
        Sweep(SweepConfig(out=out, tasks=["mmlu"]))
    with pytest.raises(KVPError, match="unknown protocol.*known protocols: query-aware"):
        SweepConfig(out=out, protocols=["sideways"])
    with pytest.raises(KVPError, match="budget"):
        Sweep(SweepConfig(out=out, budgets=["-3"]))


SMALL_SWEEP = ["--task", "ruler:niah_single_1", "--context", "256", "--n", "2", "--scorer", "knorm", "random",
               "--budget", "64", "--max-new-tokens", "4"]


def test_unwritable_outputs_fail_before_any_work(tmp_path, monkeypatch, capsys):
    from kvpolicy.cli import main

    for name in ("load_model", "resolve_tasks"):
        monkeypatch.setattr(sweep, name, lambda *a, **k: pytest.fail("work started before the output check"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(KVPError, match=f"cannot write results file: {blocker}: a part of the path is not a dir"):
        Sweep(SweepConfig(out=str(blocker / "r.jsonl")))
    assert main(["sweep", "--out", str(blocker / "r.jsonl"), *SMALL_SWEEP]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvp sweep: error: cannot write results file: ") and err.count("\n") == 1
    assert str(blocker) in err
    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--out", str(out), "--report", str(blocker / "report"), *SMALL_SWEEP]) == 1
    assert "cannot write report directory" in capsys.readouterr().err
    assert blocker.read_text() == "" and list(tmp_path.iterdir()) == [blocker]  # nothing written


@pytest.mark.model
def test_concurrent_sweeps_share_the_work_and_write_each_result_once(tmp_path):
    out = tmp_path / "r.jsonl"
    command = [sys.executable, "-m", "kvpolicy.cli", "sweep", "--out", str(out), *SMALL_SWEEP]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    sweeps = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    finished = [s.communicate(timeout=600) for s in sweeps]
    for s, (stdout, stderr) in zip(sweeps, finished):
        assert s.returncode == 0, stderr
        assert "n = 2 samples per point" in stdout and "repeated" not in stderr  # each summary sees every sample
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 2 * 3  # 2 samples x (full cache + 2 scorers at 1 budget)
    counts = [[int(n) for n in re.search(r"sweep: (\d+) new results, (\d+) already done", o).groups()]
              for o, _ in finished]
    assert sum(new for new, _ in counts) == 6 and all(new + done == 6 for new, done in counts)


@pytest.mark.model
@pytest.mark.parametrize("protocol", [QUERY_AWARE, QUESTION_AGNOSTIC])
def test_rank_once_cut_many_matches_generate(smollm, monkeypatch, protocol):
    (task,) = resolve_tasks(["ruler:niah_single_1"])
    sample = task.load(smollm, 1, 320, 0)[0]
    contenders = make_contenders(["knorm", "tova"])
    budgets = [Budget(tokens=48), Budget(tokens=96)]
    prefill, rank = Counter(qa.prefill), Counter(lineup.rank)
    monkeypatch.setattr(qa, "prefill", prefill)
    monkeypatch.setattr(lineup, "rank", rank)
    batches = []
    decode = qa.decode_answers
    monkeypatch.setattr(qa, "decode_answers",
                        lambda h, state, *a, **k: batches.append(len(state.logits)) or decode(h, state, *a, **k))
    outcomes = list(qa.run_qa(smollm, task, [sample], protocol, contenders, budgets, lambda *_: True, 4))
    assert len(outcomes) == 1 + 2 * 2  # the full cache + 2 scorers x 2 budgets
    assert prefill.fresh == 1 and rank.calls == 2  # one prefill per sample, one ranking per scorer
    assert sorted(batches) == [1, 2, 2]  # one decoding per cache size: both scorers' cuts at a budget together
    for o in outcomes:
        scorer = None if o.budget == FULL else o.contender.scorer
        budget = None if o.budget == FULL else next(b for b in budgets if b.label == o.budget)
        ref = generate(smollm, sample.context, sample.question, scorer, budget, protocol, 4, sample.answer_prefix)
        # a string-match answer stops once it scores 1 (a prefix of generate's), else it is generate's
        prediction = o.fields["prediction"]
        assert ref.text.startswith(prediction) and (prediction == ref.text or o.fields["value"] == 1.0)
        assert o.kept == ref.cache_tokens_compressed and o.cache_bytes == ref.cache_bytes_compressed
        assert o.fields["value"] == task.score(ref.text, sample)


@pytest.mark.model
def test_stopping_answered_rows_leaves_every_score_as_it_is(smollm):
    """A saturating task's rows stop once they score 1 and leave the batch; every value equals the one decoding
    every row to its stop token or max_new_tokens gives, and only rows that scored 1 are cut short."""
    (task,) = resolve_tasks(["ruler:niah_single_1"])
    assert task.saturates
    contenders = make_contenders(["knorm", "keydiff", "streaming_llm", "tova"])
    budgets = [Budget(tokens=32), Budget(tokens=96)]
    cut_short = 0
    for sample in task.load(smollm, 2, 320, 0):
        fast, slow = ({(o.contender.label, o.budget): o.fields for o in qa.run_qa(
            smollm, t, [sample], QUERY_AWARE, contenders, budgets, lambda *_: True, 24)}
            for t in (task, dataclasses.replace(task, saturates=False)))
        assert fast.keys() == slow.keys() and len(fast) == 1 + 4 * 2
        for key, fields in fast.items():
            assert fields["value"] == slow[key]["value"], key
            assert slow[key]["prediction"].startswith(fields["prediction"])
            assert fields["prediction"] == slow[key]["prediction"] or fields["value"] == 1.0
            cut_short += fields["prediction"] != slow[key]["prediction"]
    assert cut_short  # some rows did stop early


@pytest.mark.model
def test_sweep_resumes_and_skips_done_work(smollm, tmp_path):
    out = tmp_path / "results.jsonl"
    config = SweepConfig(out=str(out), scorers=["knorm", "streaming_llm"], budgets=["48", "0.5"],
                         tasks=["ruler:niah_single_1"], context_tokens=[320], n_samples=1, max_new_tokens=6)
    first = run_sweep(config)
    assert first.written == 1 + 2 * 2 and first.skipped == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by = {(r["scorer"], r["budget"]): r for r in records}
    assert by[("knorm", "b48")]["kept"] == 48 and by[("knorm", "r0.50")]["kept"] == by[(FULL, FULL)]["length"] // 2
    assert by[("knorm", "b48")]["cache_bytes"] * by[(FULL, FULL)]["length"] == pytest.approx(
        by[(FULL, FULL)]["cache_bytes"] * 48, rel=0.01)
    assert all(r["model_fingerprint"] == smollm.info.fingerprint and r["protocol"] == QUERY_AWARE for r in records)
    again = run_sweep(config)
    assert again.written == 0 and again.skipped == 5
    lines = out.read_text().splitlines(keepends=True)  # a sweep killed while writing its last record
    out.write_text("".join(lines[:-1]) + lines[-1][:20])
    resumed = run_sweep(config)
    assert resumed.written == 1 and len(out.read_text().splitlines()) == 5


@pytest.mark.model
def test_samples_longer_than_the_model_are_refused_before_any_work(smollm, tmp_path, monkeypatch):
    (task,) = resolve_tasks(["ruler:niah_single_1"])
    need = qa.qa_positions(smollm, task, task.load(smollm, 1, 320, 0)[0], 6)
    config = SweepConfig(out=str(tmp_path / "r.jsonl"), scorers=["knorm"], budgets=["48"],
                         tasks=["ruler:niah_single_1"], context_tokens=[320], n_samples=1, max_new_tokens=6)
    sized = {}
    monkeypatch.setattr(sweep, "load_model", lambda *a, **k: sized["handle"])
    sized["handle"] = dataclasses.replace(smollm, info=dataclasses.replace(smollm.info, max_positions=need))
    assert run_sweep(config).written == 2  # prompt and answer fit exactly: the engine accepts every token
    monkeypatch.setattr(qa, "run_qa", lambda *a, **k: pytest.fail("work started before the length check"))
    sized["handle"] = dataclasses.replace(smollm, info=dataclasses.replace(smollm.info, max_positions=need - 1))
    with pytest.raises(KVPError, match=rf"ruler:niah_single_1 at --context 320 needs {need} positions \(prompt and "
                                       rf"answer\) but smollm2-135m has {need - 1}; use a --context at least 1 "):
        run_sweep(dataclasses.replace(config, out=str(tmp_path / "other.jsonl")))
    assert not (tmp_path / "other.jsonl").exists() or not (tmp_path / "other.jsonl").read_text()


@pytest.mark.model
@pytest.mark.parametrize("task, what", [("dialogue", "prompt and answer"), ("longgen:essays", "the whole stream")])
def test_dialogues_and_streams_longer_than_the_model_are_refused(smollm, tmp_path, task, what):
    config = SweepConfig(out=str(tmp_path / "r.jsonl"), scorers=["knorm"], budgets=["64"], tasks=[task],
                         context_tokens=[384], n_samples=1)
    assert Sweep(config).plan(smollm)
    short = dataclasses.replace(smollm, info=dataclasses.replace(smollm.info, max_positions=200))
    with pytest.raises(KVPError, match=rf"{task} at --context 384 needs \d+ positions \({what}\) but "
                                       rf"smollm2-135m has 200; use a --context at least \d+ tokens shorter"):
        Sweep(config).plan(short)


@pytest.mark.model
def test_the_smollm2_preset_fits_its_longest_context(smollm, tmp_path):
    """SmolLM2's 8,192 positions hold its length-transfer prompts at 8,176 tokens with their 16 answer tokens
    (the preset's 30 samples are checked when its sweep plans; two of each task here)."""
    config = SweepConfig(out=str(tmp_path / "r.jsonl"), scorers=["knorm"], budgets=["0.5"],
                         tasks=["ruler:niah_single_2", "needles"], max_new_tokens=16, n_samples=2)
    longest = max(PRESETS["smollm2"].long_contexts)
    assert longest > 8000 and Sweep(dataclasses.replace(config, context_tokens=[longest])).plan(smollm)
    with pytest.raises(KVPError, match="ruler:niah_single_2 at --context 8192 needs 8"):
        Sweep(dataclasses.replace(config, context_tokens=[8192], n_samples=1)).plan(smollm)


@pytest.mark.model
def test_dialogue_protocols(smollm, monkeypatch, tmp_path):
    (task,) = resolve_tasks(["dialogue"])
    writer = Sweep(SweepConfig(out=str(tmp_path / "r.jsonl"), scorers=["knorm", "snapkv"], tasks=["dialogue"]))
    sample = task.load(smollm, 1, 384, 0)[0]
    assert len(perplexity.dialogue_chunks(smollm, sample)[0]) > 1  # a real multi-turn dialogue
    contenders = make_contenders(["knorm", "snapkv"])
    big, small = Budget(tokens=4096), Budget(tokens=64)
    results = {}
    for protocol in (PROMPT_ONCE, MULTI_TURN):
        prefill = Counter(perplexity.prefill)
        monkeypatch.setattr(perplexity, "prefill", prefill)
        outs = list(perplexity.run_dialogue(smollm, sample, protocol, contenders, [big, small], lambda *_: True, 64))
        for o in outs:  # the records a sweep writes pass the store's checks
            writer.store.append(writer.result(smollm, WorkUnit(task, protocol, 384, [sample], contenders, 0), o))
        results[protocol] = {(o.contender.spec, o.budget): o for o in outs}
        # the (first round's) prefill is shared by every budget, and by every scorer that splits the rounds alike
        assert prefill.fresh == (1 if protocol == PROMPT_ONCE else 2)  # knorm + full cache | snapkv (65-row rounds)
        full = results[protocol][(FULL, FULL)]
        for spec in ("knorm", "snapkv"):
            same = results[protocol][(spec, big.label)]  # a budget above the length is no compression at all
            assert same.fields["nll_sum"] == pytest.approx(full.fields["nll_sum"], rel=1e-5)
            cut = results[protocol][(spec, small.label)]
            assert cut.kept == 64 and math.isfinite(cut.fields["nll_sum"]) and cut.fields["n_tokens"] == 64
    assert results[PROMPT_ONCE][(FULL, FULL)].fields["nll_sum"] == pytest.approx(
        results[MULTI_TURN][(FULL, FULL)].fields["nll_sum"], rel=1e-4)  # chunked prefill = one prefill
    once, multi = (results[protocol][("knorm", "b64")].fields["nll_sum"] for protocol in (PROMPT_ONCE, MULTI_TURN))
    assert once != multi
    assert len(read_results(writer.store.path).records) == 2 * (1 + 2 * 2)  # per protocol: full + 2 scorers x 2


@pytest.fixture(scope="module")
def held_out_traces(smollm, tmp_path_factory):
    from kvpolicy.traces.pipeline import TraceRunConfig, record_traces
    from kvpolicy.traces.future import FutureConfig

    out = tmp_path_factory.mktemp("traces") / "test"
    record_traces(smollm, TraceRunConfig(source="ruler", split="test", n=2, context_tokens=192,
                                         future=FutureConfig("greedy", 8), tasks=("niah_single_1",)), out,
                  show_progress=False)
    return out


@pytest.mark.model
def test_trace_costs_oracle_is_one_and_random_is_worse(smollm, held_out_traces):
    (task,) = resolve_tasks([f"traces:{held_out_traces}"])
    named = make_contenders(["oracle", "random", "knorm", "tova", "h2o", "kvzip"])
    contenders = [c for c in named if task.supports(c, TRACES)]
    # h2o needs queries the traces lack, kvzip the token ids
    assert [c.spec for c in contenders] == ["oracle", "random", "knorm", "tova"]
    outs = list(costs.trace_costs(task.reader, 0, contenders, [Budget(tokens=32), Budget(ratio=0.5)],
                                  lambda *_: True))
    by = {(o.contender.spec, o.budget): o.fields for o in outs}
    for budget in ("b32", "r0.50", "all"):
        assert by[("oracle", budget)]["value"] == pytest.approx(1.0)
        assert by[("random", budget)]["value"] > 1.0
        assert torch.tensor(by[("knorm", budget)]["per_head"]).shape == (smollm.info.n_layers, smollm.info.n_kv_heads)
    reader = task.reader
    trace = reader.read_layers(0)
    keys = trace.keys[5][None].float()
    knorm = -keys.norm(dim=-1)[0]  # KNorm keeps low key norms: the per-head cost must follow from that ranking
    expected = costs.cost_fields(knorm[None].expand(1, -1, -1), trace.utility[5][None].float(), 32)
    assert by[("knorm", "b32")]["per_head"][5] == pytest.approx(expected["per_head"][0], abs=1e-3)


@pytest.mark.model
def test_trace_sweep_and_report(smollm, held_out_traces, tmp_path):
    from kvpolicy.report.render import write_report

    out = tmp_path / "r.jsonl"
    result = run_sweep(SweepConfig(out=str(out), scorers=["oracle", "knorm", "keydiff"], budgets=["32", "64"],
                                   tasks=[f"traces:{held_out_traces}"], n_samples=2))
    assert result.written == 2 * 3 * 3  # samples x scorers x (2 budgets + whole ranking)
    paths = write_report(out, tmp_path / "report")
    md = paths.markdown.read_text()
    assert "held-out traces: RULER-style tasks over Paul Graham essays (test split, 2 prompts" in md
    assert "best heuristic" in md and len(paths.figures) == 2


@pytest.mark.model
def test_traces_of_a_mix_are_reported_per_corpus(smollm, tmp_path):
    from kvpolicy.cli import main

    traces = tmp_path / "mix"
    assert main(["traces", "--source", "mix", "--split", "test", "--n", "3", "--context", "256", "--future-tokens",
                 "4", "--baselines", "none", "--out", str(traces)]) == 0
    out = tmp_path / "r.jsonl"
    run_sweep(SweepConfig(out=str(out), scorers=["knorm"], budgets=["64"], tasks=[f"traces:{traces}"],
                          full_cache=False))
    records = read_results(out).records
    assert {r.corpus for r in records} == {"ruler", "dialogue", "essays"}
    assert all(r.data.endswith(f"its {r.corpus} prompts") for r in records)

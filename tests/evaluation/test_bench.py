"""`kvp bench`: every section run once through the CLI on the real SmolLM2 at tiny sizes (the printed sections, the
--json figures and their ratios against the raw numbers), and the ranking section's evaluation, where training's
validation, the ranking section and the evaluation's trace costs give one policy one cost."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.scorers import SCORERS, make_scorer
from kvpolicy.errors import KVPError
from kvpolicy.evaluation import costs
from kvpolicy.evaluation.bench import long_context, throughput
from kvpolicy.evaluation.bench.config import parse_shape, SECTIONS, BenchConfig, plan_sections
from kvpolicy.evaluation.bench.ranking_quality import evaluate, measure_ranking, print_ranking, scorer_method
from kvpolicy.evaluation.lineup import make_contenders
from kvpolicy.evaluation.result import WHOLE_RANKING
from kvpolicy.policy.network import PolicyConfig
from kvpolicy.traces.store import TraceReader
from kvpolicy.training.synthetic import SyntheticTraces, write_synthetic_traces
from kvpolicy.training.trainer import TrainConfig, Trainer

SHAPE = dict(n_layers=2, n_kv_heads=2, head_dim=16)
CONTEXT, BUDGET, KEEP = 128, 48, 0.25
JITTER = 4 * 2**20  # bytes a fresh process's peak resident memory varies by from run to run


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One tiny `kvp bench` of every default section: (printed text, --json figures)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["bench", "--contexts", str(CONTEXT), "--keep", str(KEEP), "--budgets", str(BUDGET),
                     "--decode-tokens", "2", "--answer-tokens", "3", "--repeats", "1", "--trace-n", "2",
                     "--trace-context", "160", "--trace-future", "3", "--train-steps", "1", "--allocation", "head",
                     "model", "--prefill-chunk", "64", "--json", str(out)])
    assert code == 0
    return printed.getvalue(), json.loads(out.read_text())


@pytest.mark.model
def test_bench_prints_every_section_with_its_header(bench):
    text, figures = bench
    assert text.startswith("kvp bench: smollm2-135m on cpu (float32), torch ")
    assert "load average" in text.splitlines()[0] and "load average at the end" in text
    for section in "abcde":
        assert f"\n{section}) {SECTIONS[section]}\n" in text
    assert text.index("\ne) ") < text.index("\na) ")  # without --policy, e trains the policy a and d time
    assert "trained in section e; timing does not depend on its quality" in text
    assert "the FULL cache, which exists during the prefill before the cut" in text
    machine = figures["machine"]
    assert machine["device"] == "cpu" and machine["dtype"] == "float32" and machine["cpu_count"] >= 1
    assert len(machine["load_average_start"]) == len(machine["load_average_end"]) == 3
    assert set(figures["sections"]) == set("abcde")


@pytest.mark.model
def test_scoring_shares_are_times_over_the_prefill(bench):
    a = bench[1]["sections"]["a"][str(CONTEXT)]
    assert a["budget"] == CONTEXT * KEEP
    # KVzap's thresholded form keeps 128 entries: left out (with the reason) at the small budget of this test
    assert set(a["scorers"]) == {"kvp", *SCORERS} - {"kvzap_linear_threshold", "kvzap_mlp_threshold"}
    for row in a["scorers"].values():
        assert row["share_of_prefill"] == pytest.approx(row["score_evict_s"] / a["prefill_s"])
    assert a["scorers"]["h2o"]["recorded_queries"] == "all" and a["scorers"]["kvp"]["recorded_queries"] == "none"
    tova = a["scorers"]["tova"]
    assert tova["recording_share_of_prefill"] == pytest.approx(a["prefill_recording_s"]["1"] / a["prefill_s"] - 1)
    kvzip = a["scorers"]["kvzip"]  # its scoring re-reads the whole prompt on the cache: a prefill or more
    assert kvzip["recorded_queries"] == "none" and kvzip["share_of_prefill"] > 0.5
    chunked = a["kvp_chunked"]  # KVP through a prefill in two chunks of 64: one cut between them, one at the end
    assert chunked["chunk"] == 64 and chunked["cuts"] == 2
    assert chunked["share_of_prefill"] == pytest.approx(chunked["score_evict_s"] / chunked["prefill_s"])


@pytest.mark.model
def test_memory_bytes_are_exact_and_shares_consistent(bench):
    b = bench[1]["sections"]["b"]
    rows = b["rows"]
    per_entry = 30 * 3 * 64 * 2 * 4  # SmolLM2 layers x KV heads x head_dim x (key, value) x fp32 bytes
    assert b["context"] == CONTEXT and set(rows) == {"1 token", "full", str(BUDGET), f"{BUDGET} model"}
    assert rows["full"]["cache_bytes"] == CONTEXT * per_entry
    for mode in ("", " model"):  # the budget moved between heads holds the same memory (each mode: allocation tests)
        assert rows[f"{BUDGET}{mode}"]["cache_bytes"] == BUDGET * per_entry
    assert rows["1 token"]["cache_bytes"] == per_entry
    for row in rows.values():
        assert row["cache_share"] == pytest.approx(row["cache_bytes"] / rows["full"]["cache_bytes"])
        assert row["peak_share"] == pytest.approx(row["peak_bytes"] / rows["full"]["peak_bytes"])
    # each row ran in its own process: its peak is the model (540 MB of fp32 weights) and runtime, not the bench's;
    # at this 128-token context the full cache (5.9 MB) is within a fresh process's peak jitter (about 1 MB seen
    # under one torch thread), so the 1-token peak may exceed the full one by that much, no more
    assert 540e6 < rows["1 token"]["peak_bytes"] < 2e9
    assert rows["1 token"]["peak_bytes"] <= rows["full"]["peak_bytes"] + JITTER


@pytest.mark.model
def test_decode_speedup_is_the_ratio_of_medians(bench):
    c = bench[1]["sections"]["c"][str(CONTEXT)]
    assert c["steps"] == 2 and c["budget"] == CONTEXT * KEEP
    for side in ("full", "compressed"):
        assert 0 < c[side]["fastest_ms"] <= c[side]["median_ms"]
    assert c["speedup"] == pytest.approx(c["full"]["median_ms"] / c["compressed"]["median_ms"])


@pytest.mark.model
def test_decode_steps_take_turns_and_leave_the_states_as_they_were(smollm):
    """Section c times the full and the compressed cache step by step in turn, each on its own branch, on the
    second of two identical passes: every state gets its steps, each step extends that state's own branch, and
    the states are left as they were."""
    from kvpolicy.compression.engine import compress, prefill
    from kvpolicy.compression.scorers import make_scorer
    from kvpolicy.evaluation.bench.decode import step_ms
    from kvpolicy.evaluation.bench.timing import essay_ids

    full, _ = prefill(smollm, essay_ids(smollm, CONTEXT))
    small = compress(smollm, full, make_scorer("knorm"), Budget(tokens=BUDGET))
    calls = []
    original = smollm.model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["past_key_values"].get_seq_length())
        return original(*args, **kwargs)

    smollm.model.forward = counting
    try:
        times = step_ms(smollm, [full, small], 3)
    finally:
        del smollm.model.forward
    assert [len(t) for t in times] == [3, 3] and all(ms > 0 for t in times for ms in t)
    assert calls == [CONTEXT, BUDGET, CONTEXT + 1, BUDGET + 1, CONTEXT + 2, BUDGET + 2] * 2  # in turn, twice
    assert (full.length, small.length) == (CONTEXT, BUDGET)


@pytest.mark.model
def test_answers_match_kvpress_and_ratios_are_time_over_time(bench):
    d = bench[1]["sections"]["d"]
    assert d["compression_ratio"] == 1 - KEEP and d["protocol"] == "question-agnostic"
    assert set(d["pairs"]) == {"knorm", "kvp"}
    for row in d["pairs"].values():
        assert row["ratio"] == pytest.approx(row["kvpolicy_s"] / row["kvpress_s"])
        assert row["same_answer"] and row["kvpolicy_answer"] == row["kvpress_answer"] != ""


@pytest.mark.model
def test_trace_and_training_throughput(bench):
    e = bench[1]["sections"]["e"]
    traces, training = e["traces"], e["training"]
    assert traces["samples"] == 2
    assert traces["tokens_per_s"] == pytest.approx(traces["prompt_tokens"] / traces["seconds"])
    assert 2 * 64 * 2 < traces["bytes_per_token_head"]  # at least the fp16 key and value of every entry
    assert training["steps"] == 1 and training["seconds"] == pytest.approx(1 / training["steps_per_s"])
    assert training["tokens_per_s"] == pytest.approx(training["steps_per_s"] * training["batch"] * training["tokens"])
    assert training["shape"] == [30, 3, 64] and "synthetic" not in training  # SmolLM2's own traces
    assert e["training_at_shape"] == []


def test_training_throughput_at_another_cache_shape(tmp_path, one_thread):
    """`--train-shape`: training timed on synthetic traces of that shape (uncompiled here, to stay quick)."""
    at_shape = throughput.measure_training(throughput.synthetic_at_shape((3, 2, 32)), 1, tmp_path / "kvp", "cpu",
                                           compile=False)
    assert at_shape["shape"] == [3, 2, 32] and at_shape["steps"] == 1
    assert at_shape["steps_per_s"] == pytest.approx(1 / at_shape["seconds"])


def test_train_shape_is_checked():
    assert parse_shape("28x4x128") == (28, 4, 128)
    for bad in ("28x4", "28x0x128", "axbxc"):
        with pytest.raises(KVPError, match="LAYERSxKV_HEADSxHEAD_DIM"):
            parse_shape(bad)


def test_section_plan():
    assert plan_sections(None, False, False) == ["e", "a", "b", "c", "d"]
    assert plan_sections(None, True, True) == ["a", "b", "c", "d", "e", "ranking"]
    assert plan_sections(["c", "b"], False, False) == ["b", "c"]  # no section needs the policy
    assert plan_sections(["d"], False, False) == ["e", "d"]
    with pytest.raises(KVPError, match="--traces DIR and --val DIR"):
        plan_sections(["ranking"], False, True)


def test_ranking_without_traces_is_one_error_line(capsys):
    assert main(["bench", "--sections", "ranking"]) == 1
    assert "kvp bench: error: the ranking section needs held-out traces" in capsys.readouterr().err


@pytest.fixture
def synthetic_policy(tmp_path):
    """Synthetic training and validation traces, and a policy trained briefly on them (with its training result)."""
    train = TraceReader(write_synthetic_traces(tmp_path / "train", SyntheticTraces(8, length=64, **SHAPE, seed=0)))
    val = TraceReader(write_synthetic_traces(tmp_path / "val", SyntheticTraces(3, length=64, **SHAPE, seed=1)))
    config = TrainConfig(steps=6, batch=4, tokens=16, samples=2, warmup=2, ema_start=2, val_every=6,
                         checkpoint_every=6, val_samples=3, compile=False, bf16=False)
    result = Trainer(train, tmp_path / "ckpt", val=val, policy=PolicyConfig(**SHAPE, hidden=8, max_position=64),
                     config=config, progress=False).run()
    return train, val, tmp_path / "ckpt", result


@pytest.mark.usefixtures("one_thread")
def test_ranking_evaluation_ranks_methods_consistently():
    """The oracle scores exactly 1, per-budget shares fall with the budget, and a method that sees the true utility
    through noise sits between the oracle and random."""
    source = SyntheticTraces(3, length=96, **SHAPE)
    noisy = lambda trace, sample: trace.utility.float() + 0.02 * torch.randn(trace.utility.shape)  # noqa: E731
    (random,) = make_contenders(["random"])
    results = evaluate(source, {"Noisy": noisy, "Random": scorer_method(source, random)}, budgets=[24, 48, 200])
    assert results["Oracle"]["normalized_cost"] == pytest.approx(1.0)
    assert 1.0 < results["Noisy"]["normalized_cost"] < results["Random"]["normalized_cost"]
    for r in results.values():
        shares = list(r["evicted_share"].values())
        assert shares[0] >= shares[1] >= shares[2] == 0.0  # 200 >= length: nothing evicted
        assert len(r["per_layer"]) == SHAPE["n_layers"]


@pytest.mark.usefixtures("one_thread")
def test_one_policy_has_one_cost_in_validation_ranking_section_and_trace_costs(synthetic_policy, tmp_path, capsys):
    """The deployed policy's validation cost (trainer), its cost in the ranking section and in the evaluation's
    trace costs are one number, and so are the section's and the trace costs' per-budget shares."""
    train, val, ckpt, result = synthetic_policy
    validation = -result.best_val_reward

    (kvp,) = make_contenders([f"kvp:{ckpt}"])
    benchmark = evaluate(val, {"KVP": scorer_method(val, kvp)}, budgets=[24, 40])["KVP"]
    outcomes = [o for i in range(len(val))
                for o in costs.trace_costs(val, i, [kvp], [Budget(tokens=24), Budget(tokens=40)], lambda *_: True)]
    by_budget = {label: [o.fields for o in outcomes if o.budget == label] for label in ("b24", "b40", WHOLE_RANKING)}
    trace_cost = sum(f["value"] for f in by_budget[WHOLE_RANKING]) / len(val)

    assert 1.0 < validation < 10.0
    assert benchmark["normalized_cost"] == pytest.approx(validation, rel=1e-4)
    assert trace_cost == pytest.approx(validation, rel=1e-4)
    for budget in (24, 40):
        lost = sum(f["lost"] for f in by_budget[f"b{budget}"]) / len(val)
        assert benchmark["evicted_share"][budget] == pytest.approx(lost, rel=1e-4)

    report = measure_ranking(str(train.directory), str(val.directory), None, ckpt, [24, 40], tmp_path)
    assert report["ranking"]["KVP"]["normalized_cost"] == pytest.approx(validation, rel=1e-4)
    assert report["parameters"] == result.n_parameters and report["training"]["steps"] == 6
    print_ranking(report)
    printed = capsys.readouterr().out
    assert "KVP" in printed and "vs best attention-free" in printed and "policy: " in printed


@pytest.mark.model
def test_the_scoring_section_leaves_out_a_scorer_the_model_cannot_run_and_says_why(smollm, tmp_path, monkeypatch,
                                                                                   trained_policy):
    from kvpolicy.evaluation.bench.scoring import bench_scorers
    from kvpolicy.policy import kvzap

    monkeypatch.setattr(kvzap, "SHIPPED_DIR", tmp_path)  # as for a model without KVzap weights
    scorers, refused = bench_scorers(smollm, make_scorer("knorm"), [64], 0.25)
    kvzap_rows = {"kvzap_linear", "kvzap_mlp", "kvzap_linear_threshold", "kvzap_mlp_threshold"}
    assert set(refused) == kvzap_rows and "train-kvzap" in refused["kvzap_mlp"]
    # the stand-in for KVP (KNorm) compares across heads, so its per-layer and model-wide budgets are timed too
    assert set(scorers) == {"kvp", "kvp@layer", "kvp@model", *SCORERS} - set(refused)
    monkeypatch.undo()  # the shipped weights: KVzap runs, its thresholded form not at a budget below its window
    scorers, refused = bench_scorers(smollm, make_scorer("knorm"), [256, 2048], 0.25)
    assert {"kvzap_linear", "kvzap_mlp"} <= set(scorers)
    assert "more than a budget of 64" in refused.get("kvzap_mlp_threshold", "more than a budget of 64")
    _, refused = bench_scorers(smollm, make_scorer(f"kvp:{trained_policy}"), [256], 0.25)  # not calibrated
    assert "kvp calibrate" in refused["kvp@model"] and "kvp calibrate" in refused["kvp@layer"]


@pytest.mark.model
def test_peak_memory_section_runs_each_prefill_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert main(["bench", "--sections", "f", "--peak-contexts", "512", "9000", "--peak-budget", "64",
                 "--prefill-chunk", "128", "--peak-reference", "128", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"\nf) {SECTIONS['f']}\n" in text and "9000 tokens left out: smollm2-135m has 8192 positions" in text
    f = json.loads(out.read_text())["sections"]["f"]
    rows = {(r["context"], r["run"]): r for r in f["rows"]}
    assert list(rows) == [(128, "full"), (512, "full"), (512, "once"), (512, "chunked")]
    full, once, chunked = rows[512, "full"], rows[512, "once"], rows[512, "chunked"]
    assert full["full_bytes"] == once["full_bytes"] == chunked["full_bytes"] == full["cache_bytes"]
    assert once["cache_bytes"] == chunked["cache_bytes"] == full["cache_bytes"] * 64 // 512
    assert chunked["peak_bytes"] <= full["peak_bytes"] + JITTER and rows[128, "full"]["peak_vs_reference"] == 1


@pytest.mark.model
def test_needle_prompts_place_the_needle_at_its_depth(smollm):
    for depth in (0.0, 0.5, 1.0):
        prompt = long_context.needle_prompt(smollm, 400, depth, "amber-falcon-42")
        at = prompt.index(long_context.NEEDLE.format("amber-falcon-42")) / len(prompt)
        assert abs(at - depth) < 0.1
    with pytest.raises(KVPError, match="fraction of the prompt"):
        long_context.needle_prompt(smollm, 400, 1.5, "x")


@pytest.mark.model
def test_long_context_section_answers_a_needle_through_a_chunked_prefill(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["bench", "--sections", "g", "--long-context", "600", "--needle-depths", "0.5", "--peak-budget", "64",
                 "--prefill-chunk", "128", "--peak-reference", "300", "--long-runs", "chunked", "compress-once",
                 "--json", str(out)]) == 0
    assert f"\ng) {SECTIONS['g']}\n" in capsys.readouterr().out
    g = json.loads(out.read_text())["sections"]["g"]
    full, chunked, once = g["rows"]
    assert full["run"] == "full" and full["chunk"] is None and full["cache_tokens_peak"] == full["prompt_tokens"] > 300
    assert chunked["chunk"] == 128 and chunked["prompt_tokens"] > 600 and chunked["cache_tokens_peak"] <= 64 + 128
    assert chunked["cache_bytes"] * chunked["prompt_tokens"] == chunked["cache_bytes_full"] * 64
    assert once["run"] == "compress-once" and once["chunk"] is None and once["depth"] == chunked["depth"]
    assert once["cache_tokens_peak"] == once["prompt_tokens"] and once["cache_bytes"] == chunked["cache_bytes"]
    assert g["scorer"] == "kvp:smollm2-135m" and all(isinstance(r["found"], bool) for r in g["rows"])


@pytest.mark.model
def test_generate_path_section_times_model_generate_against_the_engine_and_a_batch(tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(["bench", "--sections", "h", "--contexts", "128", "--answer-tokens", "8", "--repeats", "1",
                 "--batch-rows", "2", "--json", str(out)]) == 0
    assert f"\nh) {SECTIONS['h']}\n" in capsys.readouterr().out
    h = json.loads(out.read_text())["sections"]["h"]
    one, batch = h["one_prompt"], h["batch"]
    assert one["same_answer"] and one["ratio"] == pytest.approx(one["evicting_cache_s"] / one["engine_s"])
    assert batch["rows_as_alone"] and batch["prompt_tokens"][0] - batch["prompt_tokens"][1] == 16  # really padded
    decoded = 2 * (8 - 1)
    assert batch["batched_decode_tokens_per_s"] == pytest.approx(decoded / batch["batched_decoding_s"])
    assert 0 < batch["batched_decoding_s"] < batch["batched_s"] and 0 < batch["single_decoding_s"] < batch["single_s"]
    assert batch["speedup"] == pytest.approx(batch["batched_decode_tokens_per_s"] / batch["single_decode_tokens_per_s"])


def test_long_runs_are_named_ones_refused_before_any_work():
    with pytest.raises(KVPError, match="--long-runs takes full, compress-once, chunked"):
        BenchConfig(long_runs=("twice",))
    with pytest.raises(KVPError, match="--long-runs takes"):
        BenchConfig(long_runs=())
    assert BenchConfig().long_runs == ("chunked",)

"""The report: aggregation maths, bootstrap intervals and comparisons, figures and pages from a synthetic results
file (no model needed); repeated, malformed and unwritable files."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import replace

import matplotlib.axes
import numpy as np
import pytest
from PIL import Image

from kvpolicy.errors import KVPError
from kvpolicy.intervals import bootstrap_ci, bootstrap_ratio_ci
from kvpolicy.evaluation.result import SCHEMA, Result
from kvpolicy.evaluation.store import ResultStore
from kvpolicy.report.aggregate import (
    ALL_SCORERS,
    ONCE_SUFFIX,
    curve_groups,
    distinct_labels,
    head_maps,
    learning_curves,
    throughput,
    trained_corpora,
    training_notes,
)
from kvpolicy.report import figures
from kvpolicy.report.figures import curves_figure
from kvpolicy.report.render import write_report
from kvpolicy.report.tables import comparison_table, decision_table, group_table, seed_table, verdict_table

RULER_DATA = "RULER-style tasks over Paul Graham essays (offline stand-in for RULER)"
DIALOGUE_DATA = "ShareGPT (stand-in for OASST2)"
SCORERS = [("knorm", "KNorm", "heuristic"), ("tova", "TOVA", "heuristic"), ("kvp:ck", "KVP", "learned")]
BUDGETS = [("b64", 64), ("b128", 128), ("b256", 256)]
CORPUS = {"RULER-style": "ruler", "dialogue": "dialogue", "held-out traces": "ruler"}
TRAINED_ON = {"source": "ruler", "context_tokens": 512}


def _base(scorer, label, kind, budget, kept, task, family, metric, protocol, data, sample):
    identity = {"name": scorer} | ({"trained_on": TRAINED_ON} if kind == "learned" else {})
    return {
        "model": "smollm2-135m", "model_fingerprint": "abc123", "scorer": scorer, "scorer_label": label,
        "scorer_kind": kind, "scorer_id": f"id-{scorer}", "budget": budget, "kept": kept, "task": task,
        "family": family, "metric": metric, "protocol": protocol, "data": data, "context_tokens": 512, "seed": 0,
        "sample": sample, "corpus": CORPUS[family], "scorer_identity": identity, "seconds": 0.5,
    }


def result(fields: dict) -> Result:
    """A Result from _base fields (value 0.0 unless given)."""
    return Result(**({"value": 0.0} | fields))


def synthetic_records(store: ResultStore, n: int = 3) -> None:
    rng = np.random.default_rng(0)
    for task in ("niah_single_1", "vt"):
        for s in range(n):
            for scorer, label, kind in SCORERS + [("full", "full cache", "reference")]:
                budgets = [("full", 500)] if scorer == "full" else BUDGETS
                for budget, kept in budgets:
                    value = float(rng.random() < kept / 300)
                    store.append(result(_base(scorer, label, kind, budget, kept, task, "RULER-style", "accuracy",
                                              "query-aware", RULER_DATA, f"{task}-{s}") | {"value": value}))
    for s in range(n):
        for scorer, label, kind in SCORERS:
            for budget, kept in BUDGETS:
                nll = float(rng.uniform(1, 3)) * 20
                store.append(result(_base(scorer, label, kind, budget, kept, "dialogue", "dialogue", "perplexity",
                                          "multi-turn", DIALOGUE_DATA, f"d-{s}") | {"nll_sum": nll, "n_tokens": 20,
                                                                                    "value": math.exp(nll / 20)}))
    for s in range(n):
        for scorer, label, kind in SCORERS + [("oracle", "Oracle", "oracle")]:
            for budget, kept in BUDGETS + [("all", 0)]:
                per_head = rng.uniform(1, 3, size=(4, 3)) if scorer != "oracle" else np.ones((4, 3))
                pooled = {} if budget == "all" else {"lost": 0.1 * float(per_head.mean()), "best": 0.1}
                store.append(result(_base(scorer, label, kind, budget, kept, "traces", "held-out traces", "cost",
                                          "traces", "held-out RULER-style traces", f"t-{s}")
                                    | {"value": float(per_head.mean()), "per_head": per_head.tolist()} | pooled))


@pytest.fixture
def results(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    synthetic_records(store)
    return store


def test_accuracy_is_mean_over_samples_and_average_over_tasks(results):
    records = results.records()
    groups = {g.metric: g for g in curve_groups(records)}
    acc = groups["accuracy"]
    assert [p.title for p in acc.panels] == ["niah_single_1", "vt", "average over 2 tasks"]
    for panel in acc.panels[:2]:
        for line in panel.lines:
            for p in line.points:
                vals = [r.value for r in records if r.task == panel.title and r.scorer_label == line.scorer
                        and r.budget == p.budget]
                assert p.y == pytest.approx(100 * np.mean(vals)) and p.n == len(vals) == 3
        assert panel.reference is not None and panel.reference.x == 500
    avg = acc.panels[2]
    for line in avg.lines:
        for p in line.points:
            per_task = [next(q for other in pan.lines if other.scorer == line.scorer
                             for q in other.points if q.budget == p.budget).y for pan in acc.panels[:2]]
            assert p.y == pytest.approx(np.mean(per_task))


def test_chunked_prefills_get_their_own_panels_and_averages(results):
    """Results of prompts prefilled chunk by chunk (every = C) are a setting of their own: a panel per task beside
    compress-once, with the learned policy's compress-once line, and an average over tasks of their own."""
    for record in [r for r in results.records() if r.family == "RULER-style" and r.scorer != "full"]:
        results.append(replace(record, every=1024, value=1.0 - record.value))
    acc = next(g for g in curve_groups(results.records()) if g.metric == "accuracy")
    assert [p.title for p in acc.panels] == [
        "niah_single_1", "niah_single_1, prefilled 1024 tokens at a time, cut after each", "vt",
        "vt, prefilled 1024 tokens at a time, cut after each", "average over 2 tasks",
        "average over 2 tasks, prefilled 1024 tokens at a time"]
    chunked = acc.panels[1]
    assert [line.scorer for line in chunked.lines] == ["KNorm", "KVP", "KVP" + ONCE_SUFFIX, "TOVA"]
    assert chunked.reference is not None  # the full cache, which cuts nothing, drawn in both settings
    once = next(line for line in acc.panels[0].lines if line.scorer == "KVP")
    assert next(line for line in chunked.lines if line.scorer == "KVP" + ONCE_SUFFIX).points == once.points
    assert {c.other for c in chunked.comparisons if c.learned == "KVP"} >= {"KVP" + ONCE_SUFFIX}
    averages = {p.title: p for p in acc.panels[4:]}
    chunked_kvp = next(line for line in averages["average over 2 tasks, prefilled 1024 tokens at a time"].lines
                       if line.scorer == "KVP")
    assert chunked_kvp.points[0].y == pytest.approx(100 - next(
        line for line in averages["average over 2 tasks"].lines if line.scorer == "KVP").points[0].y)


def test_perplexity_pools_tokens_before_exponentiating(results):
    records = results.records()
    ppl = next(g for g in curve_groups(records) if g.metric == "perplexity")
    line = ppl.panels[0].lines[0]
    rs = [r for r in records if r.metric == "perplexity" and r.scorer_label == line.scorer and r.budget == "b64"]
    expected = math.exp(sum(r.nll_sum for r in rs) / sum(r.n_tokens for r in rs))
    assert next(p for p in line.points if p.budget == "b64").y == pytest.approx(expected)
    assert ppl.y_label == "perplexity of the final assistant turn"


def test_best_heuristic_map_excludes_oracle_and_learned(results):
    (head_map,) = head_maps(results.records())
    assert head_map.heuristics == ["KNorm", "TOVA"]
    best, names = head_map.best_heuristic()
    expected = np.where(head_map.cost["KNorm"] <= head_map.cost["TOVA"], 0, 1)
    np.testing.assert_array_equal(best, expected)
    assert best.shape == (4, 3)


def test_learned_policy_results_say_whether_they_are_on_the_training_corpus(results):
    captions = {g.family: g.caption() for g in curve_groups(results.records())}
    assert "KVP trained on ruler traces at 512 tokens: same corpus, held-out prompts" in captions["RULER-style"]
    assert "KVP trained on ruler traces at 512 tokens: a cross-corpus check" in captions["dialogue"]
    longer = result(_base("kvp:ck", "KVP", "learned", "64", 64, "vt", "RULER-style", "accuracy", "query-aware",
                          RULER_DATA, "s") | {"context_tokens": 2048})
    assert training_notes([longer]) == [
        "KVP trained on ruler traces at 512 tokens: same corpus, held-out prompts, at a longer context than trained"]
    heuristic = result(_base("tova", "TOVA", "heuristic", "64", 64, "vt", "RULER-style", "accuracy", "query-aware",
                             RULER_DATA, "s"))
    assert training_notes([heuristic]) == []
    mixed = result(_base("kvp:smollm2-135m", "KVP (bundled)", "learned", "64", 64, "vt", "RULER-style", "accuracy",
                         "query-aware", RULER_DATA, "s")
                   | {"scorer_identity": {"name": "kvp", "trained_on": {"source": "mix", "context_tokens": 2048}}})
    assert training_notes([mixed]) == [
        "KVP (bundled) trained on mix traces at 2048 tokens: its training traces include ruler prompts: held-out "
        "prompts"]
    code = result(_base("kvp:q", "KVP (mix+code)", "learned", "64", 64, "vt", "held-out traces", "cost",
                        "question-agnostic", "code traces", "s") | {"corpus": "code", "scorer_identity": {
                            "name": "kvp", "trained_on": {"source": "mix+code", "context_tokens": 2048}}})
    assert training_notes([code]) == [
        "KVP (mix+code) trained on mix+code traces at 2048 tokens: its training traces include code prompts: held-out "
        "prompts"]
    assert trained_corpora("mix+code") == {"ruler", "dialogue", "essays", "code"}
    assert trained_corpora("dialogue") == trained_corpora("long-dialogue") == {"dialogue"}


def test_throughput_charges_the_prefill_once_per_sample(results):
    timed = [result(_base(scorer, label, "heuristic", budget, 64, "vt", "RULER-style", "accuracy", "query-aware",
                          RULER_DATA, "s0") | {"seconds": seconds, "prefill_seconds": 3.0})
             for scorer, label, seconds in (("knorm", "KNorm", 0.5), ("tova", "TOVA", 1.0)) for budget in ("64", "128")]
    speed = {t.scorer: t for t in throughput(timed)}
    assert speed["KNorm"].seconds_per_sample == 4.0 and speed["KNorm"].results == 2
    assert speed["TOVA"].seconds_per_sample == 5.0
    assert speed[ALL_SCORERS].seconds_per_sample == 6.0 and speed[ALL_SCORERS].results == 4
    assert speed[ALL_SCORERS].samples_per_minute == 10.0


def test_throughput_keeps_each_rerank_interval_apart(results):
    timed = [result(_base("knorm", "KNorm", "heuristic", "b256", 256, "longgen:dialogue", "dialogue", "perplexity",
                          "bounded-stream", "dialogues", "s0")
                    | {"every": every, "seconds": seconds, "prefill_seconds": 0.0})
             for every, seconds in ((64, 8.0), (256, 2.0))]
    speed = {t.every: t for t in throughput(timed) if t.scorer == "KNorm"}
    assert speed[64].seconds_per_sample == 8.0 and speed[256].seconds_per_sample == 2.0


def test_report_writes_html_markdown_and_figures(results, tmp_path):
    stale = tmp_path / "report" / "figures" / "07-from-an-earlier-report.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    (tmp_path / "report" / "figures.json").write_text(json.dumps({"figures": [stale.name]}))  # what that report drew
    paths = write_report(results.path, tmp_path / "report")
    assert not stale.exists() and sorted((tmp_path / "report" / "figures").iterdir()) == sorted(paths.figures)
    html = paths.html.read_text()
    md = paths.markdown.read_text()
    assert len(paths.figures) == 4  # accuracy, perplexity, cost curves, head map
    assert html.count("data:image/png;base64,") == 4 and "src='figures" not in html  # self-contained
    for fig in paths.figures:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{fig.name}" in md
    for text in (html, md):
        assert RULER_DATA in text and DIALOGUE_DATA in text
        assert "model: smollm2-135m" in text and "protocol: multi-turn" in text and "n = 3 samples" in text
    # a table behind every figure: one per curve figure + two for the head map; KVP's comparisons beside each
    assert len(re.findall(r"^\| task \| scorer", md, flags=re.M)) == 3
    assert len(re.findall(r"^\| task \| budget \| learned policy \| other method", md, flags=re.M)) == 3
    assert len(re.findall(r"^\| task \| budget \| learned policy \| value", md, flags=re.M)) == 3
    assert len(re.findall(r"^\| learned policy \| other method \| ", md, flags=re.M)) == 3  # each group's decision
    assert html.count("<th>learned policy</th>") == 9  # the decision, the verdict and the comparison of each group
    assert "heads where it is the best heuristic" in md
    assert "'separated' means the two methods' own 95% intervals do not overlap" in md
    assert "95% percentile bootstrap intervals over samples (2,000 resamples" in html


def test_empty_results_file_is_refused_with_a_message(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(KVPError, match="holds no results yet"):
        write_report(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_cli(results, tmp_path, capsys):
    from kvpolicy.cli import main

    assert main(["report", str(results.path), "--out", str(tmp_path / "r")]) == 0
    assert "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 1


def test_report_notes_dropped_repeats(results, tmp_path, capsys):
    from kvpolicy.cli import main

    lines = results.path.read_text().splitlines(keepends=True)
    results.path.write_text("".join(lines + lines[:3]))  # two sweeps that once both wrote the first records
    paths = write_report(results.path, tmp_path / "report")
    note = f"dropped 3 repeated records (same key) from {results.path}"
    assert paths.note == note
    assert f"Note: {note}." in paths.markdown.read_text() and note in paths.html.read_text()
    assert "n = 3 samples" in paths.markdown.read_text() and "n = 4" not in paths.markdown.read_text()
    assert main(["report", str(results.path), "--out", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().err == f"note: {note}\n"


def test_unwritable_report_directory_fails_before_reading(results, tmp_path, monkeypatch, capsys):
    from kvpolicy.cli import main
    from kvpolicy.report import render

    monkeypatch.setattr(render, "read_results", lambda path: pytest.fail("read the results before the check"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(KVPError, match=f"cannot write report directory: {blocker}: a part of the path is not a dir"):
        write_report(results.path, blocker / "report")
    assert main(["report", str(results.path), "--out", str(blocker / "report")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker) in err
    assert main(["report", str(results.path), "--out", str(results.path)]) == 1  # a file, not a directory
    assert "is a regular file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("record, problem", [
    ({"schema": SCHEMA}, "field 'model_fingerprint' is missing"),
    ({"seed": "x"}, "field 'seed' must be an integer, got 'x'"),
    ({"metric": "perplexity"}, "field 'nll_sum' is missing"),
])
def test_malformed_results_are_one_line_naming_file_line_and_field(results, tmp_path, capsys, record, problem):
    from kvpolicy.cli import main

    good = results.path.read_text().splitlines(keepends=True)
    bad = record if record.get("schema") else json.loads(good[0]) | record
    results.path.write_text("".join(good[:4]) + json.dumps(bad) + "\n")
    assert main(["report", str(results.path), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kvp report: error: {results.path}:5: {problem}; ") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_learning_curve_from_policies_trained_on_more_prompts_and_steps(tmp_path):
    """Policies trained on 8/16/32 mix prompts (600 steps) and at 150 steps (32 prompts), evaluated on held-out
    traces: one curve per data set and trace source, costs averaged over samples, the baselines as references;
    per-corpus policies (other sources, one recipe each) are not points of it."""
    store = ResultStore(tmp_path / "curve.jsonl")
    runs = {("mix", 8, 600): 1.6, ("mix", 16, 600): 1.4, ("mix", 32, 600): 1.3, ("mix", 32, 150): 1.5,
            ("ruler", 32, 1000): 1.7, ("dialogue", 32, 1000): 1.9}
    for s in range(3):
        for (source, prompts, steps), cost in runs.items():
            identity = {"name": "kvp", "trained_on": {"source": source, "context_tokens": 2048, "prompts": prompts,
                                                      "steps": steps}}
            fields = _base(f"kvp:{source}{prompts}s{steps}", f"KVP ({source} p{prompts}s{steps})", "learned", "all",
                           0, "traces", "held-out traces", "cost", "traces", "held-out mix traces: its essays prompts",
                           f"t-{s}")
            store.append(result(fields | {"scorer_identity": identity, "scorer_id": f"id-{source}-{prompts}-{steps}",
                                          "value": cost + 0.01 * s, "per_head": [[cost]]}))
        fields = _base("knorm", "KNorm", "heuristic", "all", 0, "traces", "held-out traces", "cost", "traces",
                       "held-out mix traces: its essays prompts", f"t-{s}")
        store.append(result(fields | {"value": 2.0, "per_head": [[2.0]]}))
    [curve] = learning_curves(store.records())
    assert [(p.x, round(p.cost, 3), p.n) for p in curve.by_prompts] == [(8, 1.61, 3), (16, 1.41, 3), (32, 1.31, 3)]
    assert [(p.x, round(p.cost, 3)) for p in curve.by_steps] == [(150, 1.51), (600, 1.31)]
    assert curve.references == {"KNorm": 2.0} and "its essays prompts" in curve.caption()
    assert curve.source == "mix" and "policies trained on mix traces" in curve.caption()
    assert curve.by_prompts[0].ci == bootstrap_ci([1.6, 1.61, 1.62])
    paths = write_report(tmp_path / "curve.jsonl", tmp_path / "report")
    md = paths.markdown.read_text()
    assert "Learning curve" in md and re.search(r"^\| prompts \| 8 \| 1\.610 ± 0\.006 \[1\.600, 1\.620\] \| 3 \|$", md,
                                                flags=re.M)


def test_every_task_point_carries_its_bootstrap_interval(results):
    records = results.records()
    groups = {g.metric: g for g in curve_groups(records)}
    acc = groups["accuracy"]
    for panel in acc.panels[:2]:
        assert panel.reference is not None and panel.reference.ci is not None
        for line in panel.lines:
            for p in line.points:
                vals = [100 * r.value for r in records if r.task == panel.title and r.scorer_label == line.scorer
                        and r.budget == p.budget]
                assert p.ci == pytest.approx(bootstrap_ci(vals)) and p.stderr is not None
    assert all(p.ci is None for line in acc.panels[2].lines for p in line.points)  # the average over tasks
    for metric, num, den, transform in (("perplexity", "nll_sum", "n_tokens", np.exp), ("cost", "lost", "best", None)):
        for line in groups[metric].panels[0].lines:
            for p in line.points:
                rs = [r for r in records if r.metric == metric and r.scorer_label == line.scorer
                      and r.budget == p.budget]
                ratio = [getattr(r, num) for r in rs], [getattr(r, den) for r in rs]
                assert p.ci == bootstrap_ratio_ci(*ratio, transform) and p.stderr is None


def test_group_tables_show_each_value_with_its_interval(results):
    groups = {g.metric: g for g in curve_groups(results.records())}
    acc = group_table(groups["accuracy"])
    assert "standard error of the mean" in acc.title
    assert "[lo, hi]: 95% bootstrap CI over samples (2,000 resamples)" in acc.title
    for row in acc.rows:
        cell = r"\d+\.\d" if row[0].startswith("average") else r"\d+\.\d ± \d+\.\d \[\d+\.\d, \d+\.\d\]"
        assert all(re.fullmatch(cell, c) for c in row[2:-1]), row
    for metric, digits in (("perplexity", 2), ("cost", 3)):
        table = group_table(groups[metric])
        number = rf"\d+\.\d{{{digits}}}"
        assert "95% bootstrap CI over samples (2,000 resamples)" in table.title and "standard error" not in table.title
        for row in table.rows:
            assert all(re.fullmatch(rf"{number} \[{number}, {number}\]", c) for c in row[2:5]), row


def _scored(label: str, kind: str, values: list[float], seed: int = 0, budget: str = "64") -> list[Result]:
    """One accuracy result per value on the samples s0, s1, ... of task vt."""
    return [result(_base(label.lower(), label, kind, budget, 64, "vt", "RULER-style", "accuracy", "query-aware",
                         RULER_DATA, f"s{i}") | {"value": v, "seed": seed}) for i, v in enumerate(values)]


def test_comparison_separates_clearly_different_methods_and_not_equal_ones():
    rng = np.random.default_rng(0)
    good = [float(v) for v in rng.random(30) < 0.9]
    poor = [float(v) for v in rng.random(30) < 0.1]
    records = (_scored("KVP", "learned", good + [1.0])  # a sample no other method has: left out of the pairs
               + _scored("KVP (bundled)", "learned", good) + _scored("TOVA", "heuristic", good)
               + _scored("KNorm", "heuristic", poor) + _scored("full", "reference", [1.0] * 30, budget="full"))
    (group,) = curve_groups(records)
    (panel,) = group.panels
    pairs = [(c.learned, c.other) for c in panel.comparisons]
    assert pairs == [("KVP", "KNorm"), ("KVP", "KVP (bundled)"), ("KVP", "TOVA"), ("KVP (bundled)", "KNorm"),
                     ("KVP (bundled)", "TOVA")]  # two learned policies once; never the full cache
    knorm = panel.comparisons[0]
    assert knorm.n == 30 and knorm.difference == pytest.approx(100 * (np.mean(good) - np.mean(poor)))
    table = comparison_table(group)
    assert "higher is better, so a positive difference favours the learned policy" in table.title
    rows = {(row[2], row[3]): row for row in table.rows}
    assert rows[("KVP", "KNorm")][4].startswith("+") and rows[("KVP", "KNorm")][4].endswith(" †")
    assert rows[("KVP", "KNorm")][5:] == ["5.0e-05", "separated", "30"]  # no random swap is as extreme: 1 / 20,001
    assert rows[("KVP", "TOVA")][1:] == ["64 (~64 tok)", "KVP", "TOVA", "+0.0 [0.0, 0.0]", "1.000", "intervals overlap",
                                         "30"]
    assert "†: the difference survives a Holm correction over the 5 comparisons of this table at 5%" in table.title
    assert "over the 5 comparisons of the table of every learned policy − other method of this figure" in (
        verdict_table(group).title)


def test_a_policy_retrained_under_the_same_label_is_never_pooled_with_the_first(tmp_path):
    def instance(sha: str, values: list[float]) -> list[Result]:
        return [replace(r, scorer_id=f"id-{sha}", scorer_identity={**r.scorer_identity, "sha256": sha})
                for r in _scored("KVP (kvp-r)", "learned", values, budget="b64")]

    first, second = instance("3fd7e6" + "0" * 58, [1.0] * 4), instance("ea3804" + "1" * 58, [0.0, 1.0, 0.0, 0.0])
    tova = _scored("TOVA", "heuristic", [1.0, 0.0, 0.0, 0.0], budget="b64")
    labelled = distinct_labels(first + second + tova)
    labels = ["KVP (kvp-r) @3fd7e6"] * 4 + ["KVP (kvp-r) @ea3804"] * 4 + ["TOVA"] * 4
    assert [r.scorer_label for r in labelled] == labels
    assert distinct_labels(first + tova) == first + tova  # one instance: labels untouched
    other_model = [replace(r, model_fingerprint="def456") for r in second]
    assert distinct_labels(first + other_model) == first + other_model  # one instance per model
    (group,) = curve_groups(labelled)
    means = {line.scorer: line.points[0].y for line in group.panels[0].lines}
    assert means == {"KVP (kvp-r) @3fd7e6": 100.0, "KVP (kvp-r) @ea3804": 25.0, "TOVA": 25.0}
    store = ResultStore(tmp_path / "results.jsonl")
    for r in first + second + tova:
        store.append(r)
    report = write_report(store.path, tmp_path / "report").markdown.read_text()
    assert "KVP (kvp-r) @3fd7e6" in report and "KVP (kvp-r) @ea3804" in report


def test_verdict_names_the_strongest_method_of_each_kind_at_each_budget(results):
    rng = np.random.default_rng(1)
    good, fair, poor = ([float(v) for v in rng.random(30) < p] for p in (0.9, 0.5, 0.1))
    records = (_scored("KVP", "learned", good) + _scored("KNorm", "heuristic", poor)
               + _scored("StreamingLLM", "heuristic", fair) + _scored("TOVA", "heuristic", fair)
               + _scored("SnapKV", "heuristic", poor) + _scored("full", "reference", [1.0] * 30, budget="full"))
    (group,) = curve_groups(records)
    assert {line.scorer: line.kind for line in group.panels[0].lines} == {
        "KVP": "learned", "KNorm": "attention-free", "StreamingLLM": "attention-free", "TOVA": "reads attention",
        "SnapKV": "reads attention"}
    (row,) = verdict_table(group).rows
    free = 100 * np.mean(fair)
    assert row[:3] == ["vt", "64 (~64 tok)", "KVP"] and row[4].startswith(f"StreamingLLM {free:.1f} [")
    assert row[5].startswith(f"+{100 * (np.mean(good) - np.mean(fair)):.1f} [") and row[6] == "separated"
    assert row[7].startswith(f"TOVA {free:.1f} [") and row[10].startswith("100.0")
    assert verdict_table(curve_groups(_scored("KNorm", "heuristic", poor))[0]) is None  # no learned policy
    accuracy = next(g for g in curve_groups(results.records()) if g.metric == "accuracy")
    assert accuracy.panels[-1].title.startswith("average") and not any(
        row[0].startswith("average") for row in verdict_table(accuracy).rows)  # it has nothing to compare


def test_report_marks_a_clear_difference_that_survives_holm_and_not_a_null_one(tmp_path):
    rng = np.random.default_rng(2)
    good, poor = ([float(v) for v in rng.random(30) < p] for p in (0.9, 0.1))
    store = ResultStore(tmp_path / "results.jsonl")
    scored = [_scored(label, kind, values, budget="b64")
              for label, kind, values in (("KVP", "learned", good), ("KNorm", "heuristic", poor),
                                          ("TOVA", "heuristic", good))]
    for r in [r for rs in scored for r in rs] + _scored("full", "reference", [1.0] * 30, budget="full"):
        store.append(r)
    paths = write_report(store.path, tmp_path / "report")
    markdown, page = paths.markdown.read_text(), paths.html.read_text()
    knorm = next(line for line in markdown.splitlines() if line.startswith("| vt | 64 tok | KVP | KNorm |"))
    tova = next(line for line in markdown.splitlines() if line.startswith("| vt | 64 tok | KVP | TOVA |"))
    assert "] † |" in knorm and "†" not in tova
    assert "over the 2 comparisons of this table at 5%" in markdown and "†" in page and "Holm" in page
    (verdict,) = verdict_table(curve_groups(store.records())[0]).rows
    assert verdict[5].endswith(" †")  # against KNorm, the only attention-free method
    assert not verdict[8].endswith("†")  # against TOVA: the same answers


def test_holm_counts_every_comparison_of_the_table():
    """KVP right on 6 of 8 samples where KNorm is wrong, level elsewhere: p = 2 / 2^6 < 5% alone, but not below
    5% / 4 once three methods level with KVP join the table."""
    kvp, knorm = [1.0] * 6 + [0.0] * 2, [0.0] * 8
    (alone,) = curve_groups(_scored("KVP", "learned", kvp) + _scored("KNorm", "heuristic", knorm))
    (comparison,) = alone.panels[0].comparisons
    assert comparison.p == pytest.approx(2 / 64) and comparison.holm
    crowd = [r for name in ("TOVA", "SnapKV", "KeyDiff") for r in _scored(name, "heuristic", kvp)]
    (group,) = curve_groups(_scored("KVP", "learned", kvp) + _scored("KNorm", "heuristic", knorm) + crowd)
    found = {c.other: c for c in group.panels[0].comparisons}
    assert found["KNorm"].p == pytest.approx(2 / 64) and not any(c.holm for c in found.values())
    assert {c.p for name, c in found.items() if name != "KNorm"} == {1.0}


def test_comparison_pairs_by_seed_and_sample_and_needs_two_pairs():
    records = _scored("KVP", "learned", [1.0, 0.0]) + _scored("KNorm", "heuristic", [1.0]) + _scored(
        "KNorm", "heuristic", [0.0, 1.0], seed=1)  # s1 of seed 1 is another prompt than s1 of seed 0
    (group,) = curve_groups(records)
    assert group.panels[0].comparisons == [] and comparison_table(group) is None


def test_lower_is_better_metrics_say_so_in_the_comparison_title(results):
    groups = {g.metric: g for g in curve_groups(results.records())}
    for metric in ("perplexity", "cost"):
        table = comparison_table(groups[metric])
        assert "lower is better, so a negative difference favours the learned policy" in table.title
        assert {row[2] for row in table.rows} == {"KVP"} and {row[3] for row in table.rows} == (
            {"KNorm", "TOVA"} if metric == "perplexity" else {"KNorm", "Oracle", "TOVA"})
        assert all(row[6] in ("separated", "intervals overlap") and row[7] == "3" for row in table.rows)


def test_every_line_of_a_budget_figure_has_error_bars_from_its_interval(results, monkeypatch):
    drawn, bands = [], []
    errorbar, axhspan = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.axhspan
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda ax, x, y, yerr=None, **kw: drawn.append((kw["label"], y, yerr)) or errorbar(
                            ax, x, y, yerr=yerr, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "axhspan",
                        lambda ax, lo, hi, **kw: bands.append((lo, hi)) or axhspan(ax, lo, hi, **kw))
    acc = next(g for g in curve_groups(results.records()) if g.metric == "accuracy")
    assert curves_figure(acc)[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [line for panel in acc.panels for line in panel.lines]
    assert len(drawn) == len(lines)
    for line, (label, y, yerr) in zip(lines, drawn):
        assert label == line.scorer
        if line.points[0].ci is None:  # the average over tasks
            assert yerr is None
            continue
        np.testing.assert_allclose(np.asarray(y) - yerr[0], [p.ci[0] for p in line.points])
        np.testing.assert_allclose(np.asarray(y) + yerr[1], [p.ci[1] for p in line.points])
    assert bands == [panel.reference.ci for panel in acc.panels[:2]]  # the full cache's band


def test_figures_are_small_palette_pngs_and_the_same_results_give_the_same_bytes(results, monkeypatch):
    """Report figures are committed (docs/results/*/figures): a palette PNG is a fraction of matplotlib's RGBA file
    and differs from it only in antialiasing shades; the same results give the same bytes, so a rebuilt report
    leaves git's copy as it is."""
    acc = next(g for g in curve_groups(results.records()) if g.metric == "accuracy")
    png = curves_figure(acc)
    assert png == curves_figure(acc)
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.mode) == ("PNG", "P") and len(png) < 60_000
    monkeypatch.setattr(figures, "palette_png", lambda rgba: rgba)
    rgba = curves_figure(acc)
    assert Image.open(io.BytesIO(rgba)).mode == "RGBA" and len(png) < len(rgba) / 2
    original = np.asarray(Image.open(io.BytesIO(rgba)).convert("RGB"), dtype=int)
    reduced = np.asarray(image.convert("RGB"), dtype=int)
    error = np.abs(original - reduced).max(axis=2)
    assert error.mean() < 3 and (error > 32).mean() < 0.005


def test_bounded_streams_get_a_panel_per_rerank_interval_each_with_the_full_cache():
    records = []
    for s in range(2):
        base = dict(task="longgen:essays", family="dialogue", metric="perplexity", protocol="bounded-stream",
                    data="essays", sample=f"e-{s}")
        full = _base("full", "full cache", "reference", "full", 400, **base)
        records.append(result(full | {"nll_sum": 40.0, "n_tokens": 20, "value": math.exp(2.0)}))
        for every, nll in ((32, 50.0), (64, 60.0)):
            fields = _base("knorm", "KNorm", "heuristic", "64", 64, **base) | {"every": every}
            records.append(result(fields | {"nll_sum": nll, "n_tokens": 20, "value": math.exp(nll / 20)}))
    (group,) = curve_groups(records)
    assert [p.title for p in group.panels] == ["longgen:essays, re-ranked every 32 tokens",
                                               "longgen:essays, re-ranked every 64 tokens"]
    for panel, nll in zip(group.panels, (50.0, 60.0)):
        assert panel.reference is not None and panel.reference.y == pytest.approx(math.exp(2.0))
        (line,) = panel.lines
        assert line.points[0].y == pytest.approx(math.exp(nll / 20)) and line.points[0].n == 2
    assert group.y_label == "perplexity of every token of the stream"


def test_the_decision_table_counts_wins_ties_and_losses_over_the_tasks():
    """KVP far ahead of KNorm on one task and far behind on another, level with TOVA on both: 1 win and 1 loss
    against KNorm, 2 ties against TOVA, each cell with the tasks' mean difference and the fewest pairs."""
    rng = np.random.default_rng(3)
    good, poor = ([float(v) for v in rng.random(30) < p] for p in (0.9, 0.1))
    values = {"KVP": {"vt": good, "cwe": poor}, "KNorm": {"vt": poor, "cwe": good}, "TOVA": {"vt": good, "cwe": poor}}
    kinds = {"KVP": "learned", "KNorm": "heuristic", "TOVA": "heuristic"}
    records = [result(_base(label.lower(), label, kinds[label], "b64", 64, task, "RULER-style", "accuracy",
                            "query-aware", RULER_DATA, f"s{i}") | {"value": v})
               for label, tasks in values.items() for task, vs in tasks.items() for i, v in enumerate(vs)]
    (group,) = curve_groups(records)
    table = decision_table(group)
    rows = {(row[0], row[1]): row[2] for row in table.rows}
    assert rows[("KVP", "KNorm")] == "1W 0T 1L · mean +0.0 · n≥30"
    assert rows[("KVP", "TOVA")] == "0W 2T 0L · mean +0.0 · n≥30"
    assert table.header == ["learned policy", "other method", "64 tok"]
    assert "over the 4 comparisons of the comparison table" in table.title
    assert decision_table(curve_groups([r for r in records if r.scorer_label != "KVP"])[0]) is None


def test_seeds_of_one_recipe_give_their_mean_and_spread():
    """Three KVP-mix seeds and two KVzap MLP fits (KVzap's seed is per model) form two families; a policy trained on
    other data, a second label with a seed already taken and KVzap's seedless linear model join none."""
    mix = {"source": "mix", "context_tokens": 2048}
    kvp = {"KVP a": (0, mix, 0.2), "KVP b": (1, mix, 0.6), "KVP c": (2, mix, 0.4), "KVP r": (3, TRAINED_ON, 0.0)}
    identities = {label: {"name": "kvp", "sha256": label, "seed": seed, "trained_on": on}
                  for label, (seed, on, _) in kvp.items()}
    values = {label: v for label, (_, _, v) in kvp.items()}
    for label, seed, v in (("KVzap (MLP)", 0, 0.5), ("KVzap (MLP) kvzap-s1", 1, 0.7), ("KVzap (linear)", None, 0.1)):
        name = "kvzap_linear" if "linear" in label else "kvzap_mlp"
        identities[label] = {"name": name, "trained": {"smollm2-135m": {"sha256": label, "seed": seed},
                                                       "qwen2.5-0.5b": {"sha256": "q", "seed": 7}}}
        values[label] = v
    records = [result(_base(label.lower(), label, "learned", budget, kept, task, "RULER-style", "accuracy",
                            "query-aware", RULER_DATA, f"s{i}") | {"scorer_identity": identity,
                                                                    "value": values[label] + 0.01 * (task == "vt")})
               for label, identity in identities.items() for budget, kept in BUDGETS[:2] for task in ("vt", "cwe")
               for i in range(3) if not (label == "KVP c" and budget == "b128" and task == "cwe")]
    (group,) = curve_groups(records)
    assert group.seed_families == {"KVP (mix), 3 seeds": ["KVP a", "KVP b", "KVP c"],
                                   "KVzap (MLP), 2 seeds": ["KVzap (MLP)", "KVzap (MLP) kvzap-s1"]}
    table = seed_table(group)
    rows = {(row[0], row[1]): row[2:] for row in table.rows}
    assert rows[("vt", "KVP (mix), 3 seeds")] == ["41.0 (21.0–61.0)", "41.0 (21.0–61.0)", "3"]
    assert rows[("cwe", "KVP (mix), 3 seeds")] == ["40.0 (20.0–60.0)", "–", "3"]  # a seed lacks the point
    assert rows[("cwe", "KVzap (MLP), 2 seeds")] == ["60.0 (50.0–70.0)", "60.0 (50.0–70.0)", "3"]
    assert table.header == ["task", "method", "64 tok", "128 tok", "n"]
    assert "KVzap (MLP), 2 seeds: KVzap (MLP), KVzap (MLP) kvzap-s1" in table.title
    twins = [r for r in records if r.scorer_label in ("KVP a", "KVP b")]
    twins += [replace(r, scorer_label="KVP b2", scorer_id="b2") for r in twins if r.scorer_label == "KVP b"]
    (twin_group,) = curve_groups(twins)
    assert twin_group.seed_families == {} and seed_table(twin_group) is None  # KVP b and b2 share seed 1

"""The scorer catalog (compression/catalog.py): one row per scorer, from which every list, label, default line-up,
help text and error is derived. The rows keep the names, labels and defaults results and reports key on, each says
what its class does, and a scorer added as one row (its class here) is found everywhere a scorer is listed."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import kvpress
import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.compression import catalog, scorers
from kvpolicy.compression.catalog import BENCH, CATALOG, STREAM, SWEEP, ScorerEntry, default_lineup, label
from kvpolicy.compression.scorers import SCORERS, LayerView, Scorer, make_scorer
from kvpolicy.compression.scorers import kvzap as kvzap_scorers
from kvpolicy.errors import KVPError


def test_names_labels_and_defaults_stay_those_results_key_on():
    assert catalog.scorer_names() == ("random", "streaming_llm", "knorm", "keydiff", "lagkv", "tova", "snapkv",
                                      "snapkv_w16", "h2o", "expected_attention", "adakv_expected_attention",
                                      "adakv_snapkv", "adakv_snapkv_w16", "pyramidkv", "pyramidkv_w16", "kvzip",
                                      "kvzip_plus", "kvzap_linear", "kvzap_mlp", "kvzap_linear_threshold",
                                      "kvzap_mlp_threshold", "oracle")
    assert {n: label(n) for n in CATALOG} == {
        "random": "Random", "streaming_llm": "StreamingLLM", "knorm": "KNorm", "keydiff": "KeyDiff", "lagkv": "LagKV",
        "tova": "TOVA", "snapkv": "SnapKV (window 64)", "snapkv_w16": "SnapKV (window 16)", "h2o": "H2O",
        "expected_attention": "ExpectedAttention", "adakv_expected_attention": "AdaKV (ExpectedAttention)",
        "adakv_snapkv": "AdaKV (SnapKV, window 64)", "adakv_snapkv_w16": "AdaKV (SnapKV, window 16)",
        "pyramidkv": "PyramidKV (window 64)", "pyramidkv_w16": "PyramidKV (window 16)", "kvzip": "KVzip",
        "kvzip_plus": "KVzip+", "kvzap_linear": "KVzap (linear)", "kvzap_mlp": "KVzap (MLP)",
        "kvzap_linear_threshold": "KVzap (linear, thresholded)", "kvzap_mlp_threshold": "KVzap (MLP, thresholded)",
        "oracle": "Oracle"}
    assert catalog.reads_attention() == ("tova", "snapkv", "snapkv_w16", "h2o", "expected_attention",
                                         "adakv_expected_attention", "adakv_snapkv", "adakv_snapkv_w16", "pyramidkv",
                                         "pyramidkv_w16", "kvzip", "kvzip_plus", "kvzap_linear", "kvzap_mlp",
                                         "kvzap_linear_threshold", "kvzap_mlp_threshold")
    assert catalog.attention_free() == ("random", "streaming_llm", "knorm", "keydiff", "lagkv")
    assert default_lineup(SWEEP) == ("random", "streaming_llm", "knorm", "keydiff", "tova", "snapkv_w16")
    assert default_lineup(STREAM) == ("streaming_llm", "knorm", "keydiff", "tova", "h2o")
    from kvpolicy.evaluation.bench.ranking_quality import baselines
    from kvpolicy.presets.study import BASELINES, STREAM_BASELINES

    assert baselines() == ("random", "streaming_llm", "knorm", "keydiff", "lagkv", "tova", "snapkv", "snapkv_w16")
    assert BASELINES == ("random", "streaming_llm", "knorm", "keydiff", "tova", "snapkv_w16", "lagkv", "snapkv")
    assert STREAM_BASELINES == default_lineup(STREAM)


def test_the_bench_compares_only_query_based_scorers_traces_can_store():
    from kvpolicy.traces.config import BASELINES  # what traces/baselines.py computes (a stage below compression)

    assert set(BASELINES) <= set(catalog.reads_attention())
    assert {n for n in default_lineup(BENCH) if CATALOG[n].reads_attention} <= set(BASELINES)


@pytest.mark.parametrize("name", list(CATALOG))
def test_each_row_says_what_its_class_does(name):
    entry, cls = CATALOG[name], SCORERS[name]
    assert cls.name == name and getattr(scorers, entry.class_name) is cls
    assert (cls.query_window != 0 or cls.reads_text) == entry.reads_attention
    if entry.press is not None:  # the kvpress press it wraps
        assert isinstance(cls().make_press(), getattr(kvpress, entry.press))
    else:
        assert not hasattr(cls, "make_press")


def test_a_bad_row_is_refused():
    with pytest.raises(ValueError, match="module:Class"):
        ScorerEntry("x", "X", "no_colon")
    with pytest.raises(ValueError, match="unknown line-ups"):
        ScorerEntry("x", "X", "m:C", defaults=("nightly",))


@dataclass
class DummyScorer(Scorer):
    """A scorer added as one catalog row: newest first, ranked from the latest query (so it reads attention)."""

    name = "dummy"
    query_window = 1

    def score(self, view: LayerView) -> torch.Tensor:
        return view.positions.float()


@pytest.fixture
def dummy(monkeypatch):
    monkeypatch.setitem(CATALOG, "dummy", ScorerEntry("dummy", "Dummy", f"{__name__}:DummyScorer",
                                                      reads_attention=True, defaults=(SWEEP, BENCH)))


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_one_row_adds_a_scorer_everywhere(dummy, capsys, tmp_path):
    # the registry and make_scorer
    assert "dummy" in SCORERS and isinstance(make_scorer("dummy"), DummyScorer) and scorers.DummyScorer is DummyScorer
    with pytest.raises(KVPError, match="known scorers: .*kvzip_plus, kvzap_linear, kvzap_mlp, .*, oracle, dummy"):
        make_scorer("nope")
    # the command line: `kvp generate --scorer` and `kvp sweep --scorer` offer it, the sweep compares it by default
    assert "eviction scorer: random, streaming_llm" in _help(capsys, "generate")
    assert "dummy, kvp (the policy bundled" in _help(capsys, "generate")
    assert "oracle dummy (oracle: traces only)" in _help(capsys, "sweep")
    from kvpolicy.cli import build_parser

    args = build_parser().parse_args(["sweep", "--out", str(tmp_path / "r.jsonl")])
    assert args.scorer[-1] == "dummy"
    assert build_parser().parse_args(["generate", "x", "--budget", "8", "--scorer", "dummy"]).scorer == "dummy"
    # the sweep's contenders: by default, labelled as the row says
    from kvpolicy.evaluation.lineup import make_contenders
    from kvpolicy.evaluation.sweep import SweepConfig

    assert SweepConfig(out=str(tmp_path / "r.jsonl")).scorers == [*default_lineup(SWEEP)] == [*args.scorer]
    contender = make_contenders(["knorm", "dummy"])[1]
    assert (contender.label, contender.kind, contender.query_window) == ("Dummy", "heuristic", 1)
    # the report: a result of it counts as reading attention
    from kvpolicy.report.aggregate import READS_KIND, scorer_class

    assert scorer_class(SimpleNamespace(scorer_kind="heuristic", scorer_identity=contender.identity)) == READS_KIND
    # `kvp bench`'s ranking section compares it (after the attention-free baselines)
    from kvpolicy.evaluation.bench.ranking_quality import baselines

    assert baselines()[-4:] == ("tova", "snapkv", "snapkv_w16", "dummy")
    # the errors naming the attention-free scorers leave it out; the line-ups the presets compare have it
    assert "dummy" not in catalog.attention_free()
    assert default_lineup(SWEEP, BENCH)[-1] == "dummy" and default_lineup(SWEEP)[-1] == "dummy"


def test_a_row_with_a_setting_takes_it_from_the_spec(monkeypatch):
    entry, value = catalog.parse_spec("kvzap_mlp:runs/m/kvzap-s1/")
    assert entry is CATALOG["kvzap_mlp"] and value == "runs/m/kvzap-s1/"
    assert catalog.parse_spec("kvzap_mlp") == (CATALOG["kvzap_mlp"], None)
    assert label("kvzap_mlp:runs/m/kvzap-s1/") == "KVzap (MLP) kvzap-s1" and label("kvzap_mlp") == "KVzap (MLP)"
    scorer = make_scorer("kvzap_linear:runs/m/kvzap-s2")
    trained = {"m": {"sha256": "ab" * 32, "seed": None}}  # what the directory's config would say (none exists here)
    monkeypatch.setattr(kvzap_scorers, "kvzap_weights", lambda kind, weights: trained if weights else {})
    assert scorer.weights == "runs/m/kvzap-s2" and scorer.identity()["weights"] == "runs/m/kvzap-s2"
    assert scorer.identity()["trained"] == trained
    for spec in ("knorm:x", "kvzap_mlp:", "nothing:x"):  # a row without a setting, no value, no row
        assert catalog.parse_spec(spec) == (None, None)
        with pytest.raises(KVPError, match=r"unknown scorer .*kvzap_mlp:WEIGHTS"):
            make_scorer(spec)

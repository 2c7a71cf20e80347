"""Faults of `kvp report` (issue 33): it removes only the figures an earlier report recorded, never through a link;
labels from a results file are literal text in report.md; a value out of range is refused when the results are
read, in one line naming FILE:LINE and the field."""

from __future__ import annotations

import json
import math
import re

import pytest

from kvpolicy.cli import main
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.result import Result
from kvpolicy.evaluation.store import ResultStore
from kvpolicy.report.render import FIGURE_MANIFEST, write_report

PNG = b"\x89PNG\r\n\x1a\n a user's own picture"


def record(**over) -> dict:
    """An accuracy record as `kvp sweep` writes one (key fields and everything the report reads)."""
    base = {"model_fingerprint": "fp", "scorer_id": "s-knorm", "budget": "b64", "task": "ruler:vt",
            "context_tokens": 512, "protocol": "query-aware", "seed": 0, "sample": "s0", "model": "smollm2-135m",
            "scorer": "knorm", "scorer_label": "KNorm", "family": "RULER-style", "data": "RULER-style tasks",
            "metric": "accuracy", "kept": 64, "length": 512, "value": 1.0, "seconds": 0.25, "budget_tokens": 64}
    return base | over


def write_results(path, protocols=("query-aware",), **over):
    """Two scorers, two budgets, two samples per protocol (one figure per protocol)."""
    store = ResultStore(path)
    for protocol in protocols:
        for scorer, label in (("knorm", "KNorm"), ("tova", "TOVA")):
            for budget in (64, 128):
                for sample in ("s0", "s1"):
                    fields = {"scorer": scorer, "scorer_id": f"s-{scorer}", "scorer_label": label,
                              "budget": f"b{budget}", "budget_tokens": budget, "kept": budget, "sample": sample,
                              "protocol": protocol, "value": float(sample == "s0")}
                    store.append(Result(**record(**(fields | over))))
    store.close()
    return path


@pytest.fixture
def results(tmp_path):
    return write_results(tmp_path / "results.jsonl", protocols=("query-aware", "question-agnostic"))


# ---------------------------------------------------------------- figures/: only what a report wrote, never a link
def test_a_rebuild_keeps_a_users_own_png_and_removes_only_figures_it_recorded(results, tmp_path):
    out = tmp_path / "report"
    first = write_report(results, out)
    assert len(first.figures) == 2
    mine = out / "figures" / "cat.png"
    mine.write_bytes(PNG)
    manifest = json.loads((out / FIGURE_MANIFEST).read_text())
    assert sorted(manifest["figures"]) == sorted(f.name for f in first.figures)
    fewer = write_results(tmp_path / "fewer.jsonl")  # one protocol: one figure
    second = write_report(fewer, out)
    assert len(second.figures) == 1
    assert mine.read_bytes() == PNG  # never written by a report: kept
    dropped = set(first.figures) - set(second.figures)
    assert dropped and not any(f.exists() for f in dropped)  # drawn by the earlier report, not by this one: removed
    assert sorted((out / "figures").iterdir()) == sorted([mine, *second.figures])
    assert json.loads((out / FIGURE_MANIFEST).read_text())["figures"] == [f.name for f in second.figures]


def test_a_report_into_a_folder_without_a_manifest_deletes_nothing(results, tmp_path):
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "07-from-somewhere.png").write_bytes(PNG)
    write_report(results, out)
    assert (out / "figures" / "07-from-somewhere.png").read_bytes() == PNG


def test_a_symlinked_figures_folder_is_refused_before_anything_is_written(results, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cat.png", "01-old.png"):
        (photos / name).write_bytes(PNG)
    out = tmp_path / "report"
    out.mkdir()
    (out / "figures").symlink_to(photos)
    (out / FIGURE_MANIFEST).write_text(json.dumps({"figures": ["01-old.png"]}))  # even when a manifest names one
    assert main(["report", str(results), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'figures'} is a symbolic link" in err
    assert sorted(p.name for p in photos.iterdir()) == ["01-old.png", "cat.png"]
    assert all(p.read_bytes() == PNG for p in photos.iterdir())
    assert not (out / "report.md").exists() and not (out / "report.html").exists()


@pytest.mark.parametrize("which", ["drawn again", "recorded, not drawn again"])
def test_a_figure_that_is_a_symlink_is_refused_and_its_target_kept(results, tmp_path, capsys, which):
    out = tmp_path / "report"
    first = write_report(results, out)
    target = tmp_path / "photo.png"
    target.write_bytes(PNG)
    link = first.figures[0] if which == "drawn again" else first.figures[1]
    link.unlink()
    link.symlink_to(target)
    fewer = write_results(tmp_path / "fewer.jsonl")  # draws figures[0] again, drops figures[1]
    files = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.is_symlink()}  # noqa: E731
    before = files()
    assert main(["report", str(fewer), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{link} is a symbolic link" in err
    assert target.read_bytes() == PNG and link.is_symlink()
    assert files() == before  # nothing written


@pytest.mark.parametrize("text, problem", [
    ("{\"figures\": [", "is not valid JSON"),
    ("[]", "expected a JSON object"),
    ("{\"figures\": [\"../../results.jsonl\"]}", "not a figure's file name"),
    ("{\"figures\": [3]}", "field 'figures[0]' must be a string"),
])
def test_a_damaged_figure_manifest_is_one_line_and_deletes_nothing(results, tmp_path, text, problem):
    out = tmp_path / "report"
    out.mkdir()
    (out / FIGURE_MANIFEST).write_text(text)
    with pytest.raises(KVPError, match=re.escape(problem)) as err:
        write_report(results, out)
    assert str(out / FIGURE_MANIFEST) in str(err.value) and "\n" not in str(err.value)
    assert results.exists() and not (out / "report.md").exists()


# ---------------------------------------------------------------- report.md: labels are literal text
def test_labels_with_html_and_pipes_stay_literal_text_in_the_markdown(tmp_path):
    path = tmp_path / "results.jsonl"
    store = ResultStore(path)
    for scorer, label in (("knorm", "<script>alert(1)</script>"), ("tova", "TO|VA `x` \\ a & b\nc")):
        for sample in ("s0", "s1"):
            store.append(Result(**record(scorer=scorer, scorer_id=f"s-{scorer}", scorer_label=label, sample=sample,
                                         task="vt|<b>", data="data <i>|</i>")))
    store.close()
    md = write_report(path, tmp_path / "report").markdown.read_text()
    assert "<script" not in md and "<b>" not in md and "<i>" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "TO\\|VA \\`x\\` \\\\ a &amp; b<br>c" in md
    cells = re.compile(r"(?<!\\)(?:\\\\)*\|")  # a pipe that no backslash escapes
    tables = re.findall(r"(?m)^(\|.*\|)\n(\|(?:---\|)+)\n((?:\|.*\|\n?)*)", md)
    assert tables
    for header, rule, body in tables:
        columns = len(cells.findall(header))
        assert rule.count("|") == columns
        for row in body.splitlines():
            assert len(cells.findall(row)) == columns, row


# ---------------------------------------------------------------- values out of range are refused on reading
@pytest.mark.parametrize("over, field", [
    ({"value": -3.0}, "value"),
    ({"value": 1e308}, "value"),
    ({"value": math.nan}, "value"),
    ({"value": math.inf}, "value"),
    ({"kept": -5}, "kept"),
    ({"budget": "bogus"}, "budget"),
    ({"seconds": -1.0}, "seconds"),
    ({"seconds": math.nan}, "seconds"),
    ({"length": -1}, "length"),
    ({"budget_tokens": 0}, "budget_tokens"),
    ({"budget_ratio": 1.5, "budget": "r1.50", "budget_tokens": None}, "budget_ratio"),
    ({"extra_metrics": {"acc_norm": 2.0}}, "extra_metrics.acc_norm"),
    ({"metric": "perplexity", "nll_sum": 40.0, "n_tokens": 20, "value": 1e308}, "value"),
    ({"metric": "perplexity", "nll_sum": -40.0, "n_tokens": 20, "value": math.exp(-2.0)}, "nll_sum"),
    ({"metric": "perplexity", "nll_sum": 40.0, "n_tokens": 0, "value": 7.4}, "n_tokens"),
    ({"metric": "cost", "lost": 0.2, "best": -0.1, "per_head": [[1.0]], "value": 2.0}, "best"),
    ({"metric": "cost", "budget": "all", "per_head": [[1.0, math.nan]], "value": 1.0}, "per_head[0][1]"),
])
def test_a_value_out_of_range_is_refused_naming_file_line_and_field(results, tmp_path, capsys, over, field):
    good = results.read_text().splitlines(keepends=True)
    bad = record(**over)
    bad = {name: value for name, value in bad.items() if value is not None}
    results.write_text("".join(good[:3]) + json.dumps({"schema": 3, **bad}) + "\n")
    assert main(["report", str(results), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kvp report: error: {results}:4: field '{field}' ") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()
    with pytest.raises(KVPError, match=re.escape(f"field '{field}'")):  # and never written in the first place
        ResultStore(tmp_path / "new.jsonl").append(Result(**{name: value for name, value in bad.items()
                                                             if name not in ("schema", "key")}))


def test_values_the_sweep_writes_at_their_extremes_pass(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    extremes = [
        {"value": 0.0, "kept": 0, "seconds": 0.0, "prefill_seconds": 0.0},
        {"metric": "acc", "value": 1.0, "extra_metrics": {"acc_norm": 0.0}, "budget": "r0.94", "budget_tokens": None,
         "budget_ratio": 0.9375},
        {"metric": "perplexity", "nll_sum": 23199.66, "n_tokens": 6143, "value": math.exp(23199.66 / 6143)},
        {"metric": "perplexity", "nll_sum": 0.0, "n_tokens": 1, "value": 1.0, "budget": "full", "kept": 512,
         "budget_tokens": None},
        {"metric": "cost", "lost": 0.0, "best": 0.0, "per_head": [[1.0, 721089.9375]], "value": 0.0},
        {"metric": "cost", "budget": "all", "per_head": [[1.0]], "value": 1.0, "kept": 512, "budget_tokens": None},
    ]
    for i, over in enumerate(extremes):
        assert store.append(Result(**record(sample=f"s{i}", **over))) is not None
    assert len(ResultStore(tmp_path / "r.jsonl")) == len(extremes)

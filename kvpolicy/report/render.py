"""Write the report: a self-contained HTML page (figures inlined as base64 PNG) and a Markdown summary (figures
as PNG files in `figures/` beside it), with the table of numbers behind every figure and, beside each curve table,
the learned policies' paired comparisons with the other methods.

`figures/` may hold files of the user's: a report removes only the figures an earlier report recorded in
FIGURE_MANIFEST and does not draw again, and it never writes or deletes through a symbolic link there."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path

from kvpolicy.compression.budget import Budget
from kvpolicy.errors import KVPError
from kvpolicy.intervals import LEVEL, RESAMPLES
from kvpolicy.evaluation.result import Result
from kvpolicy.evaluation.store import Results, read_results
from kvpolicy.io import (
    atomic_path,
    check_writable,
    describe_os_error,
    read_json_file,
    refuse_link,
    special_kind,
    write_json,
)
from kvpolicy.report.aggregate import curve_groups, distinct_labels, head_maps, learning_curves, throughput
from kvpolicy.report.figures import curves_figure, head_map_figure, learning_curve_figure
from kvpolicy.report.tables import (
    HOLM_MARK,
    Table,
    comparison_table,
    decision_table,
    group_table,
    head_map_tables,
    learning_curve_table,
    markdown_text,
    seed_table,
    throughput_table,
    verdict_table,
)
from kvpolicy.schema import validate
from kvpolicy.significance import ALPHA, PERMUTATIONS

NOTES = (
    "Models are the offline GGUF builds (4–5-bit quantized upstream, dequantized to fp32 here): real pretrained "
    "models, slightly below their fp16 originals. Data marked 'stand-in' substitutes for the paper's hub data, "
    f"which is not reachable offline. Budgets keep the first {Budget.sinks} (sink) and last {Budget.recent} tokens "
    "of every head; 'query-aware' compresses after context and question (the KVP paper), 'question-agnostic' "
    "compresses the context before the question is read (kvpress). TOVA and SnapKV see the question's attention "
    "(privileged information); KVP and the other heuristics see only the cache. Zero-shot metrics carry the "
    "names and definitions of lm-eval-harness (acc, acc_norm) and LongBench (rouge_l, retrieval_score); ± is the "
    f"standard error of the mean over samples (lm-eval's stderr). [lo, hi] and the error bars are {LEVEL:.0%} "
    f"percentile bootstrap intervals over samples ({RESAMPLES:,} resamples with replacement, seeded, so the same "
    "results give the same intervals); perplexity and cost are pooled over the samples of each resample "
    "(Σ nll / Σ tokens, Σ lost / Σ oracle's lost). Beside each table, the learned policies are compared with every "
    "other method at each budget: the difference learned − other on the samples both were evaluated on, with its "
    f"{LEVEL:.0%} paired bootstrap interval (both resampled together, so what a sample's difficulty adds to both "
    f"cancels); 'separated' means the two methods' own {LEVEL:.0%} intervals do not overlap, 'intervals overlap' "
    "that they do (the paired interval can still exclude 0 then). Each difference has the two-sided p-value of a "
    "paired permutation test (the two methods' values swapped within any subset of the pairs: every one of the 2^n "
    f"swap patterns while there are at most {PERMUTATIONS:,}, else {PERMUTATIONS:,} seeded ones), and "
    f"{HOLM_MARK} marks a difference that survives Holm's step-down correction at {ALPHA:.0%} over all the "
    "comparisons of its comparison table (the family; the verdict table shows a selection of them with the same "
    "marks)."
)


FIGURES = "figures"  # the folder of report.md's figures, in the report directory
FIGURE_MANIFEST = "figures.json"  # in the report directory: the figures the last report wrote ({"figures": [names]})
_FIGURE_NAME = re.compile(r"[0-9]{2,}-[a-z0-9-]*\.png")  # what Section.slug makes, as a file name
_MANIFEST_FIX = "delete it (a report then removes none of the figures an earlier one left) or fix it"


@dataclass
class Section:
    title: str
    caption: str
    png: bytes
    tables: list[Table]
    slug: str


@dataclass
class ReportPaths:
    """What was written; note: what the reader left out of the results (also stated in the report), if anything."""

    html: Path
    markdown: Path
    figures: list[Path]
    note: str | None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def build_sections(results: list[Result]) -> list[Section]:
    sections = []
    for i, group in enumerate(curve_groups(results), start=1):
        title = group.title()
        slug = f"{i:02d}-" + _slug(f"{group.metric}-{group.family}-{group.protocol}-{group.context_tokens or ''}")
        tables = [t for t in (decision_table(group), seed_table(group), group_table(group), verdict_table(group),
                              comparison_table(group)) if t is not None]
        sections.append(Section(title, group.caption(), curves_figure(group), tables, slug))
    for k, curve in enumerate(learning_curves(results), start=len(sections) + 1):
        sections.append(Section("Learning curve", curve.caption(), learning_curve_figure(curve),
                                [learning_curve_table(curve)], f"{k:02d}-curve-{_slug(curve.data)}"))
    learned_labels = {r.scorer_label for r in results if r.scorer_kind == "learned"}
    for j, head_map in enumerate(head_maps(results), start=len(sections) + 1):
        learned = next((s for s in sorted(head_map.cost) if s in learned_labels), None)
        sections.append(
            Section(
                "Which heuristic wins on which head",
                head_map.caption(),
                head_map_figure(head_map, learned),
                head_map_tables(head_map),
                f"{j:02d}-heads-{_slug(head_map.model)}",
            )
        )
    return sections


def _setup_table(results: list[Result]) -> Table:
    seen: dict[tuple, int] = {}
    for r in results:
        key = (r.model, r.model_fingerprint, r.scorer_label, r.scorer_id)
        seen[key] = seen.get(key, 0) + 1
    return Table(
        title="what was evaluated",
        header=["model", "fingerprint", "scorer", "scorer id", "records"],
        rows=[[m, f, s, i, str(n)] for (m, f, s, i), n in sorted(seen.items())],
    )


def _markdown(sections: list[Section], setup: list[Table], results: Results) -> str:
    """The Markdown summary; every text that comes from the results (labels, task and data names, the file's path)
    goes through markdown_text, so it is literal text there."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    source = f"{len(results.records)} results from {markdown_text(str(results.path))}, written {stamp}."
    out = ["# kvpolicy evaluation report", "", source, ""]
    if results.note:
        out += [f"Note: {markdown_text(results.note)}.", ""]
    out += [NOTES, ""]
    for s in sections:
        title = markdown_text(s.title)
        alt = title.replace("[", "\\[").replace("]", "\\]")
        out += [f"## {title}", "", f"*{markdown_text(s.caption)}*", "", f"![{alt}]({FIGURES}/{s.slug}.png)", ""]
        for t in s.tables:
            out += [f"**{markdown_text(t.title)}**", "", t.markdown(), ""]
    for t in setup:
        out += [f"## {markdown_text(t.title[0].upper() + t.title[1:])}", "", t.markdown(), ""]
    return "\n".join(out)


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;"
    "text-align:right}td:first-child,td:nth-child(2),th{text-align:left}img{max-width:100%}"
    ".caption{color:#555;font-style:italic}details{margin-bottom:1em}"
)


def _html(sections: list[Section], setup: list[Table], results: Results) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kvpolicy evaluation report</title>",
        f"<style>{CSS}</style></head><body><h1>kvpolicy evaluation report</h1>",
        f"<p>{len(results.records)} results from <code>{html.escape(str(results.path))}</code>, written {stamp}.</p>",
    ]
    if results.note:
        parts.append(f"<p><strong>Note:</strong> {html.escape(results.note)}.</p>")
    parts.append(f"<p>{html.escape(NOTES)}</p>")
    for s in sections:
        data = base64.b64encode(s.png).decode()
        parts += [f"<h2>{html.escape(s.title)}</h2>", f"<p class='caption'>{html.escape(s.caption)}</p>",
                  f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,{data}'>"]
        for t in s.tables:
            parts += [f"<details><summary>{html.escape(t.title)}</summary>{t.html()}</details>"]
    for t in setup:
        parts += [f"<h2>{html.escape(t.title[0].upper() + t.title[1:])}</h2>", t.html()]
    parts.append("</body></html>")
    return "\n".join(parts)


def _recorded_figures(out: Path) -> list[str]:
    """The figures the last report into `out` wrote, as its FIGURE_MANIFEST names them ([] without one)."""
    path = out / FIGURE_MANIFEST
    if not path.exists() and not path.is_symlink():
        return []
    refuse_link(path, "figure manifest")
    recorded = read_json_file(path, "figure manifest", _MANIFEST_FIX)
    validate(recorded, {"figures": [str]}, f"figure manifest {path}", _MANIFEST_FIX)
    for name in recorded["figures"]:
        if not _FIGURE_NAME.fullmatch(name):
            raise KVPError(f"figure manifest {path} names {name!r:.60}, not a figure's file name; {_MANIFEST_FIX}")
    return recorded["figures"]


def _check_figures(out: Path, names: Iterable[str]) -> None:
    """Refuse a figures folder, or a figure of `names` in it (one to be written or removed), that is a symbolic link
    or not a directory / regular file: before anything is written or deleted."""
    folder = out / FIGURES
    refuse_link(folder, "report figures folder")
    if folder.exists() and not folder.is_dir():
        raise KVPError(f"report figures folder {folder} is {special_kind(folder) or 'a file'}, not a directory; "
                       "move it away or choose another --out")
    for name in names:
        refuse_link(folder / name, "report figure")
        if (kind := special_kind(folder / name)) is not None:
            raise KVPError(f"report figure {folder / name} is {kind}, not a regular file; move it away or choose "
                           "another --out")


def write_report(results: str | Path, out: str | Path) -> ReportPaths:
    """Read a results file and write report.html, report.md and figures/*.png into `out` (refused before any
    reading when `out` cannot be written). A figure that an earlier report recorded in FIGURE_MANIFEST and this one
    does not draw is removed; any other file in `out/figures` is the user's and stays. A link there (the folder, or
    a figure written or removed) is refused before anything is written."""
    out = Path(out)
    check_writable(out, "report directory", directory=True)
    recorded = _recorded_figures(out)
    _check_figures(out, recorded)
    loaded = read_results(results)
    records = distinct_labels(loaded.records)
    if not records:
        raise KVPError(f"results file {results} holds no results yet; run `kvp sweep --out {results} ...` first")
    sections = build_sections(records)
    setup = [_setup_table(records), throughput_table(throughput(records))]
    names = [f"{s.slug}.png" for s in sections]
    _check_figures(out, names)
    stale = [name for name in recorded if name not in names]
    manifest = out / FIGURE_MANIFEST
    write_json(manifest, {"figures": names + stale})  # recorded before written: a killed report leaves none unlisted
    figures = []
    for s, name in zip(sections, names):
        with atomic_path(out / FIGURES / name) as tmp:
            tmp.write_bytes(s.png)
        figures.append(out / FIGURES / name)
    for name in stale:
        refuse_link(out / FIGURES / name, "report figure")
        try:
            (out / FIGURES / name).unlink(missing_ok=True)
        except OSError as err:
            raise KVPError(f"cannot remove the earlier report's figure: {describe_os_error(err)}; remove it "
                           "yourself or fix its permissions, then re-run") from None
    write_json(manifest, {"figures": names})
    paths = ReportPaths(html=out / "report.html", markdown=out / "report.md", figures=figures, note=loaded.note)
    with atomic_path(paths.html) as tmp:
        tmp.write_text(_html(sections, setup, loaded))
    with atomic_path(paths.markdown) as tmp:
        tmp.write_text(_markdown(sections, setup, loaded))
    return paths

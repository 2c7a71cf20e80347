"""The numbers behind every figure as tables, rendered to Markdown, HTML or plain text."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import numpy as np

from kvpolicy.intervals import LEVEL, RESAMPLES, Interval
from kvpolicy.significance import ALPHA, PERMUTATIONS
from kvpolicy.evaluation.result import SCORES
from kvpolicy.report.aggregate import (
    FREE_KIND,
    LEARNED_KIND,
    READS_KIND,
    Comparison,
    Group,
    HeadMap,
    LearningCurve,
    Line,
    Panel,
    Point,
    Throughput,
)

_UNITS = {**dict.fromkeys(SCORES, "% points"), "perplexity": "perplexity", "cost": "normalized cost"}
INTERVALS = f"[lo, hi]: {LEVEL:.0%} bootstrap CI over samples ({RESAMPLES:,} resamples)"
# the characters of text from a results file (labels, task and data names) that Markdown or HTML would read as
# markup, each escaped in one pass
_MARKDOWN = str.maketrans({"\\": "\\\\", "`": "\\`", "|": "\\|", "&": "&amp;", "<": "&lt;", ">": "&gt;"})
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
HOLM_MARK = "†"  # after a difference that survives its group's Holm correction


def markdown_text(text: str) -> str:
    """`text` as literal GitHub-flavoured Markdown, in a table cell or in running text: HTML's special characters
    as entities (no tag, no <script>), backslash, backtick and pipe backslash-escaped (no code span, no cell
    boundary), line breaks as <br>. Brackets and emphasis marks are left alone: they cannot break a table."""
    return _LINE_BREAK.sub("<br>", text.translate(_MARKDOWN))


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        """A GitHub-flavoured Markdown table, every cell escaped (markdown_text): as many cells in a row as columns."""
        rows = [self.header, *self.rows]
        lines = [f"| {' | '.join(markdown_text(cell) for cell in row)} |" for row in rows]
        return "\n".join([lines[0], "|" + "---|" * len(self.header), *lines[1:]])

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def text(self) -> str:
        cells = [self.header] + self.rows
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.header))]
        fmt = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
        return "\n".join([fmt(self.header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in self.rows])


def _digits(metric: str) -> int:
    return 1 if metric in SCORES else 3 if metric == "cost" else 2


def _interval(ci: Interval | None, digits: int) -> str:
    """' [lo, hi]', or nothing without an interval."""
    return f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci is not None else ""


def _difference(metric: str, comparison: Comparison) -> str:
    """'+12.0 [3.0, 21.0]', marked '†' when it survives the group's Holm correction."""
    digits = _digits(metric)
    mark = f" {HOLM_MARK}" if comparison.holm else ""
    return f"{comparison.difference:+.{digits}f}{_interval(comparison.ci, digits)}{mark}"


def _p_value(p: float) -> str:
    """Three decimals, or two significant digits below 0.001 ('5.0e-05')."""
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _fmt(metric: str, point: Point) -> str:
    """The point's value, its standard error when it has one, and its interval ('45.0 ± 2.1 [41.0, 49.2]')."""
    digits = _digits(metric)
    stderr = f" ± {point.stderr:.{digits}f}" if point.stderr is not None else ""
    return f"{point.y:.{digits}f}{stderr}{_interval(point.ci, digits)}"


def _budget_columns(panels: list[Panel]) -> list[tuple[str, float]]:
    """Budgets in order of cache size: (label, mean kept entries per head)."""
    xs: dict[str, list[float]] = {}
    for panel in panels:
        for line in panel.lines:
            for p in line.points:
                xs.setdefault(p.budget, []).append(p.x)
    return sorted(((b, float(np.mean(v))) for b, v in xs.items()), key=lambda bx: bx[1])


def _budget_header(label: str, kept: float) -> str:
    """'64 tok' for a token budget, 'r0.50 (~512 tok)' for a ratio (mean entries kept per head)."""
    if label.startswith("b") and label[1:].isdigit():
        return f"{label[1:]} tok"
    return f"{label} (~{kept:.0f} tok)"


def group_table(group: Group) -> Table:
    """Rows (task, scorer), one column per budget, plus the full-cache value and the sample count; a score is
    shown with the standard error of its mean over samples (lm-eval's stderr), every value of a task with its
    bootstrap interval."""
    budgets = _budget_columns(group.panels)
    header = ["task", "scorer"] + [_budget_header(b, x) for b, x in budgets] + ["full cache", "n"]
    rows = []
    for panel in group.panels:
        full = _fmt(group.metric, panel.reference) if panel.reference else "–"
        for line in panel.lines:
            at = {p.budget: p for p in line.points}
            cells = [_fmt(group.metric, at[b]) if b in at else "–" for b, _ in budgets]
            n = min(p.n for p in line.points)
            rows.append([panel.title, line.scorer] + cells + [full, str(n)])
    stderr = " · ± standard error of the mean over samples" if group.metric in SCORES else ""
    return Table(title=f"{group.caption()}{stderr} · {INTERVALS}", header=header, rows=rows)


def holm_note(group: Group, family: str) -> str:
    """What the mark after a difference means: which `family` of how many comparisons it survives Holm over."""
    m = sum(len(panel.comparisons) for panel in group.panels)
    return (f"{HOLM_MARK}: the difference survives a Holm correction over the {m} comparisons of {family} at "
            f"{ALPHA:.0%} (two-sided paired permutation test: the two methods' values swapped within pairs, exact "
            f"up to {PERMUTATIONS:,} swap patterns, else {PERMUTATIONS:,} seeded ones)")


def comparison_table(group: Group) -> Table | None:
    """Each learned policy against each other method, per task and budget: the paired difference learned − other
    with its bootstrap interval, marked when it survives Holm's correction over the table's rows, its permutation
    p-value, and whether the two methods' own intervals overlap ('separated': they do not). None when the group
    compares nothing."""
    rows = [[panel.title, _budget_header(c.budget, c.x), c.learned, c.other, _difference(group.metric, c),
             _p_value(c.p), "intervals overlap" if c.overlap else "separated", str(c.n)]
            for panel in group.panels for c in panel.comparisons]
    if not rows:
        return None
    better, favourable = ("higher", "a positive") if group.metric in SCORES else ("lower", "a negative")
    return Table(
        title=f"learned policy − other method, paired by sample ({_UNITS.get(group.metric, group.metric)}; "
              f"{better} is better, so {favourable} difference favours the learned policy) — {group.caption()} · "
              f"{INTERVALS}, resampling the pairs · {holm_note(group, 'this table')} · p: uncorrected · "
              f"separated: the two methods' own {LEVEL:.0%} intervals do not overlap",
        header=["task", "budget", "learned policy", "other method", f"difference [{LEVEL:.0%} CI]", "p", "intervals",
                "n pairs"],
        rows=rows,
    )


def _strongest(panel: Panel, kind: str, budget: str, higher_is_better: bool) -> tuple[Line, Point] | None:
    """The method of `kind` with the best value at `budget` in the panel (the first by label on a tie), or None."""
    sign = 1.0 if higher_is_better else -1.0
    at = [(line, p) for line in panel.lines if line.kind == kind for p in line.points if p.budget == budget]
    return max(at, key=lambda lp: sign * lp[1].y) if at else None


def _against(metric: str, comparison: Comparison | None, other: tuple[Line, Point] | None) -> list[str]:
    """Cells naming the other method and its value, the paired difference and whether the intervals overlap."""
    if other is None or comparison is None:
        return ["–", "–", "–"]
    digits = _digits(metric)
    line, point = other
    return [f"{line.scorer} {point.y:.{digits}f}{_interval(point.ci, digits)}", _difference(metric, comparison),
            "intervals overlap" if comparison.overlap else "separated"]


def verdict_table(group: Group) -> Table | None:
    """Each learned policy at each budget against the strongest attention-free method and the strongest method that
    reads attention at that budget (best value there): its value, theirs, the paired difference and whether the
    intervals overlap. None when the group has no learned policy with comparisons."""
    higher = group.metric in SCORES
    digits = _digits(group.metric)
    rows = []
    for panel in (p for p in group.panels if p.comparisons):  # e.g. not the average over tasks: nothing compared
        found = {(c.learned, c.other, c.budget): c for c in panel.comparisons}
        full = _fmt(group.metric, panel.reference) if panel.reference else "–"
        for line in (ln for ln in panel.lines if ln.kind == LEARNED_KIND):
            for point in line.points:
                cells = []
                for kind in (FREE_KIND, READS_KIND):
                    other = _strongest(panel, kind, point.budget, higher)
                    comparison = found.get((line.scorer, other[0].scorer, point.budget)) if other else None
                    cells += _against(group.metric, comparison, other)
                rows.append([panel.title, _budget_header(point.budget, point.x), line.scorer,
                             f"{point.y:.{digits}f}{_interval(point.ci, digits)}", *cells, full])
    if not rows:
        return None
    return Table(
        title=f"each learned policy against the strongest attention-free method and the strongest method reading "
              f"attention at each budget (its best value there) — {group.caption()} · {INTERVALS} · difference: "
              f"learned − other, paired by sample · "
              f"{holm_note(group, 'the table of every learned policy − other method of this figure')} (a family "
              f"fixed before the strongest methods are picked) · separated: the two methods' own {LEVEL:.0%} "
              "intervals do not overlap",
        header=["task", "budget", "learned policy", "value", "strongest attention-free", "difference", "intervals",
                "strongest reading attention", "difference", "intervals", "full cache"],
        rows=rows,
    )


def decision_table(group: Group) -> Table | None:
    """The screen to decide from: each learned policy against each other method, per budget, as wins / ties / losses
    over the group's tasks. A win (a loss) is a task whose paired difference survives Holm's correction over the
    group's comparison table and favours the learned policy (the other method); every other task is a tie. Beside
    the counts, the mean of the tasks' differences and the fewest pairs any of them rests on. None when the group
    compares nothing."""
    sign = 1.0 if group.metric in SCORES else -1.0  # favourable differences are positive scores, lower perplexities
    cells: dict[tuple[str, str], dict[str, list[Comparison]]] = {}
    for panel in group.panels:
        for c in panel.comparisons:
            cells.setdefault((c.learned, c.other), {}).setdefault(c.budget, []).append(c)
    if not cells:
        return None
    budgets = _budget_columns(group.panels)
    digits = _digits(group.metric)

    def cell(found: list[Comparison]) -> str:
        wins = sum(c.holm and sign * c.difference > 0 for c in found)
        losses = sum(c.holm and sign * c.difference < 0 for c in found)
        mean = sum(c.difference for c in found) / len(found)
        return (f"{wins}W {len(found) - wins - losses}T {losses}L · mean {mean:+.{digits}f} · "
                f"n≥{min(c.n for c in found)}")

    rows = [[learned, other, *(cell(by_budget[b]) if b in by_budget else "–" for b, _ in budgets)]
            for (learned, other), by_budget in sorted(cells.items())]
    return Table(
        title=f"decision: each learned policy against each other method, wins / ties / losses over the tasks "
              f"(W, L: the task's paired difference is marked {HOLM_MARK} in the comparison table and favours the "
              f"learned policy, or the other method; T: it is not marked) · "
              f"{holm_note(group, 'the comparison table')} · mean: the tasks' mean difference learned − other "
              f"({_UNITS.get(group.metric, group.metric)}) · n: the fewest pairs of a task — {group.caption()}",
        header=["learned policy", "other method", *(_budget_header(b, x) for b, x in budgets)],
        rows=rows,
    )


def seed_table(group: Group) -> Table | None:
    """Each method trained with several seeds (the group's seed families), per task and budget: the mean over the
    seeds of each seed's value, and the lowest and the highest seed's (what training adds to the sampling noise the
    other tables show). A cell needs every seed's point. None when the group has no seed family."""
    budgets = _budget_columns(group.panels)
    digits = _digits(group.metric)
    rows = []
    for family, members in group.seed_families.items():
        for panel in group.panels:
            at = {line.scorer: {p.budget: p for p in line.points} for line in panel.lines if line.scorer in members}
            if len(at) < len(members):
                continue
            cells = []
            for b, _ in budgets:
                points = [at[m][b] for m in members if b in at[m]]
                ys = [p.y for p in points]
                cells.append(f"{np.mean(ys):.{digits}f} ({min(ys):.{digits}f}–{max(ys):.{digits}f})"
                             if len(points) == len(members) else "–")
            n = min(p.n for points in at.values() for p in points.values())
            rows.append([panel.title, family, *cells, str(n)])
    if not rows:
        return None
    seeds = "; ".join(f"{family}: {', '.join(members)}" for family, members in group.seed_families.items())
    return Table(
        title=f"across training seeds: the mean of the seeds' values (the lowest – the highest seed's) · {seeds} — "
              f"{group.caption()}",
        header=["task", "method", *(_budget_header(b, x) for b, x in budgets), "n"],
        rows=rows,
    )


def head_map_tables(head_map: HeadMap) -> list[Table]:
    """Mean whole-ranking cost per scorer (over heads), and the per-head costs with the winning heuristic."""
    overall = Table(
        title=f"whole-ranking normalized cost, mean over heads — {head_map.caption()}",
        header=["scorer", "mean cost", "median cost", "heads where it is the best heuristic"],
        rows=[],
    )
    best, names = head_map.best_heuristic()
    for scorer, cost in sorted(head_map.cost.items(), key=lambda kv: float(kv[1].mean())):
        wins = str(int((best == names.index(scorer)).sum())) if scorer in names else "–"
        overall.rows.append([scorer, f"{cost.mean():.3f}", f"{np.median(cost):.3f}", wins])
    scorers = sorted(head_map.cost)
    per_head = Table(
        title=f"per-head whole-ranking cost — {head_map.caption()}",
        header=["layer", "head", "best heuristic"] + scorers,
        rows=[],
    )
    for (layer, head), idx in np.ndenumerate(best):
        per_head.rows.append(
            [str(layer), str(head), names[idx]] + [f"{head_map.cost[s][layer, head]:.3f}" for s in scorers]
        )
    return [overall, per_head]


def throughput_table(rows: list[Throughput]) -> Table:
    """Samples per minute per scorer (shared prefill + that scorer's ranking, cuts and share of the batched
    answers at all budgets) and for all scorers of a sample together."""
    return Table(
        title="evaluation throughput (one sample = its prefill + the scorer's ranking, cuts and answers at every "
              "budget; answers of one budget are decoded in one batch, each scorer is charged its share)",
        header=["benchmark", "context", "protocol", "scorer", "samples", "results", "s/sample", "samples/min"],
        rows=[[t.family, str(t.context_tokens or "–"), t.protocol + (f", every {t.every}" if t.every else ""), t.scorer,
               str(t.samples), str(t.results),
               f"{t.seconds_per_sample:.1f}", f"{t.samples_per_minute:.1f}"] for t in rows],
    )


def learning_curve_table(curve: LearningCurve) -> Table:
    """The points of a learning curve (cost ± standard error [interval]), then the baselines' costs on the same
    samples."""
    rows = [[axis, str(p.x), f"{p.cost:.3f}" + (f" ± {p.stderr:.3f}" if p.stderr is not None else "")
             + _interval(p.ci, 3), str(p.n)]
            for axis, points in (("prompts", curve.by_prompts), ("steps", curve.by_steps)) for p in points]
    rows += [["baseline", label, f"{cost:.3f}", ""] for label, cost in curve.references.items()]
    return Table(title=f"learning curve — {curve.caption()} · ± standard error · {INTERVALS}",
                 header=["axis", "value", "cost", "n"], rows=rows)

"""Turn results into the tables behind every figure: one `Panel` per plotted quantity.

Records of one model, benchmark family, protocol, context length and data source form a `Group` (one figure);
inside it, one `Panel` per task (plus an average panel for a score such as accuracy), one `Line` per scorer, one
point per budget; a score's point carries the standard error of its mean over samples (lm-eval's stderr), and every
point of a task its 95% percentile bootstrap interval over samples (kvpolicy.intervals). Each task's panel
also compares every learned policy with every other method at each budget (`Comparison`): the paired difference on
the samples both were evaluated on, with its bootstrap interval and its paired permutation p-value
(kvpolicy.significance); the comparisons of all panels of a group (the rows of its comparison table) are one family
for Holm's correction. A method trained with several seeds (KVP-mix, KVzap's MLP) forms a seed family
(`seed_families`): the report gives its mean over seeds and their spread. A result holding several metrics (acc and
acc_norm) is counted in the group of each. Cache size on the x axis is the mean number of KV entries kept per head at
that budget (the same for every scorer at a token budget; ratio budgets give the mean over samples).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from kvpolicy.compression.catalog import label as catalog_label, reads_attention
from kvpolicy.intervals import (
    Interval,
    Transform,
    bootstrap_ci,
    bootstrap_ratio_ci,
    paired_ratio_difference_ci,
    pooled_ratio,
)
from kvpolicy.significance import ALPHA, holm_survivors, paired_permutation_p
from kvpolicy.evaluation.metrics import mean_stderr
from kvpolicy.evaluation.names import BOUNDED_STREAM
from kvpolicy.evaluation.lineup import LEARNED_LABEL
from kvpolicy.evaluation.result import FULL, SCORES, WHOLE_RANKING, Result
from kvpolicy.traces.sources import corpora_of

METRICS = {
    "accuracy": "accuracy (%)",
    "acc": "acc: the likeliest choice is right (%)",
    "acc_norm": "acc_norm: likeliest per character (%)",
    "rouge_l": "ROUGE-L F1 (%)",
    "retrieval_score": "retrieval_score (%)",
    "perplexity": "perplexity of the final assistant turn",
    "cost": "normalized cost −R_b (1 = oracle, lower is better)",
}


@dataclass
class Point:
    budget: str
    x: float  # mean KV entries kept per head
    y: float
    n: int
    stderr: float | None = None  # standard error of y, a mean over samples (scores only, n >= 2)
    ci: Interval | None = None  # 95% bootstrap interval of y over samples, in y's units (n >= 2; not of averages)


def distinct_labels(results: Iterable[Result]) -> list[Result]:
    """The results, with each scorer label naming one scorer per model. Where one label covers several scorer
    identities on one model (a policy retrained into the same directory: its weights differ), each such result's
    label gains the first six hex digits of its weights' sha256, or of its scorer_id for a scorer without weights
    ("KVP (kvp-r) @ea3804"), so that two policies are never pooled into one line. Every other result is returned as
    it is."""
    results = list(results)
    ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in results:
        ids[(r.model_fingerprint, r.scorer_label)].add(r.scorer_id)
    return [replace(r, scorer_label=f"{r.scorer_label} @{r.scorer_identity.get('sha256', r.scorer_id)[:6]}")
            if len(ids[(r.model_fingerprint, r.scorer_label)]) > 1 else r for r in results]


LEARNED_KIND, FREE_KIND, READS_KIND = "learned", "attention-free", "reads attention"


def training_seed(r: Result) -> int | None:
    """The seed a result's scorer was trained with (a KVP policy's, a KVzap MLP's fit seed for r's model); None for
    a scorer without one (a heuristic, KVzap's closed-form linear model, a policy recorded before seeds were)."""
    identity = r.scorer_identity
    if "trained" in identity:  # KVzap: per model, as its shipped weights differ by model
        return identity["trained"].get(r.model, {}).get("seed")
    return identity.get("seed") if "sha256" in identity else None


def seed_families(results: Iterable[Result]) -> dict[str, list[str]]:
    """The methods trained with several seeds among `results`: family label ("KVP (mix), 3 seeds") -> its members'
    scorer labels. Members share a model, a method and what it was trained on (a KVP policy's `trained_on`) and
    each has its own seed; a family needs two seeds or more (labels with the same seed are no family)."""
    seeds: dict[tuple, dict[str, int]] = defaultdict(dict)
    for r in results:
        seed = training_seed(r)
        if seed is not None:
            trained_on = r.scorer_identity.get("trained_on")
            family = (r.model, r.scorer_identity.get("name"), json.dumps(trained_on, sort_keys=True))
            seeds[family][r.scorer_label] = seed
    families = {}
    for (_, name, trained_on), members in sorted(seeds.items()):
        if len(members) >= 2 and len(set(members.values())) == len(members):
            method = LEARNED_LABEL if name == "kvp" else catalog_label(name)
            source = (json.loads(trained_on) or {}).get("source")
            families[f"{method}{f' ({source})' if source else ''}, {len(members)} seeds"] = sorted(members)
    return families


@dataclass
class Line:
    scorer: str  # display label
    points: list[Point]
    kind: str = FREE_KIND  # LEARNED_KIND, FREE_KIND, READS_KIND, or the oracle's scorer_kind


def scorer_class(r: Result) -> str:
    """What a result's scorer sees: a learned policy, an attention-free heuristic (the cache only), one that reads
    attention (the catalog's `reads_attention`: the question's, or the chunk's just fed), or the oracle (the true
    future)."""
    if r.scorer_kind in (LEARNED_KIND, "oracle"):
        return r.scorer_kind
    return READS_KIND if r.scorer_identity.get("name") in reads_attention() else FREE_KIND


@dataclass
class Comparison:
    """A learned policy against another method at one budget of a task, on the samples both were evaluated on
    (paired by seed and sample): the difference learned − other of the metric, in its units (% points, perplexity,
    cost), with its 95% paired bootstrap interval and the two-sided p-value of a paired permutation test; whether the
    two methods' own intervals (their points' `ci`, over all their samples) overlap; and whether the difference
    survives Holm's correction over every comparison of its group (the family of one comparison table)."""

    budget: str
    x: float  # mean KV entries kept per head at the budget
    learned: str  # scorer labels
    other: str
    difference: float
    ci: Interval
    n: int  # paired samples, >= 2
    overlap: bool
    p: float  # paired permutation test (kvpolicy.significance), two-sided
    holm: bool = False  # survives Holm's correction at ALPHA over the comparisons of its group


@dataclass
class Panel:
    title: str
    metric: str
    lines: list[Line]
    reference: Point | None = None  # full-cache value (a horizontal line)
    comparisons: list[Comparison] = field(default_factory=list)  # learned policies vs the others (task panels)

    @property
    def n_range(self) -> tuple[int, int]:
        ns = [p.n for line in self.lines for p in line.points] + ([self.reference.n] if self.reference else [])
        return (min(ns), max(ns)) if ns else (0, 0)


@dataclass
class Group:
    """Everything one figure shows, with the facts its caption states."""

    model: str
    family: str
    metric: str
    protocol: str
    context_tokens: int | None
    data: str
    panels: list[Panel] = field(default_factory=list)
    training: list[str] = field(default_factory=list)  # how each learned policy's training data relates to this data
    seed_families: dict[str, list[str]] = field(default_factory=dict)  # seed_families of its results

    @property
    def n_samples(self) -> tuple[int, int]:
        ranges = [p.n_range for p in self.panels if p.n_range != (0, 0)]
        return (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else (0, 0)

    @property
    def y_label(self) -> str:
        """What the y axis shows: the metric; a perplexity says which tokens it is over (a dialogue's final
        assistant turn, or every token of a stream)."""
        if self.metric == "perplexity" and self.protocol == BOUNDED_STREAM:
            return "perplexity of every token of the stream"
        return METRICS[self.metric]

    def title(self) -> str:
        what = {"accuracy": "Accuracy", "perplexity": "Perplexity", "cost": "Per-budget ranking cost −R_b"}.get(
            self.metric, self.metric)
        return f"{what} vs KV cache size — {self.family}"

    def caption(self) -> str:
        lo, hi = self.n_samples
        n = f"n = {lo}" if lo == hi else f"n = {lo}–{hi}"
        ctx = f", context {self.context_tokens} tokens" if self.context_tokens else ""
        notes = "".join(f" · {note}" for note in self.training)
        return (f"model: {self.model} · protocol: {self.protocol} · data: {self.data}{ctx} · {n} samples per point"
                f"{notes}")


def trained_corpora(source: str) -> set[str]:
    """The corpora a policy trained on traces of `source` has seen: a union's parts are joined by "+" (as `kvp train
    --traces A B` records them), each part's corpora as `traces.sources.corpora_of` names them."""
    return {corpus for part in source.split("+") for corpus in corpora_of(part)}


def training_notes(results: Iterable[Result]) -> list[str]:
    """For each learned policy among the results: what it was trained on and whether these results are on the
    same corpus (held-out prompts) or another one (a cross-corpus check), and at a longer context than trained."""
    notes: dict[str, str] = {}
    for r in results:
        trained = r.trained_on
        if trained is None or not trained.source or r.scorer_label in notes:
            continue
        at = f" at {trained.context_tokens} tokens" if trained.context_tokens else ""
        if trained.source == r.corpus:
            relation = "same corpus, held-out prompts"
        elif r.corpus in trained_corpora(trained.source):
            relation = f"its training traces include {r.corpus} prompts: held-out prompts"
        else:
            relation = "a cross-corpus check: evaluated on data it was not trained on"
        if trained.context_tokens and r.context_tokens and r.context_tokens > trained.context_tokens:
            relation += ", at a longer context than trained"
        notes[r.scorer_label] = f"{r.scorer_label} trained on {trained.source} traces{at}: {relation}"
    return [notes[label] for label in sorted(notes)]


def _percent(ratio: np.ndarray) -> np.ndarray:
    return 100.0 * ratio


def _pooled(metric: str, results: list[Result]) -> tuple[tuple[list[float], list[float]], Transform | None]:
    """Every metric as a pooled ratio transform(Σ num / Σ den) over samples: per-sample numerators and denominators,
    and the transform into the metric's units. A score is its mean in % (Σ value / Σ 1), perplexity
    exp(Σ nll / Σ tokens), cost Σ lost / Σ oracle's lost."""
    if metric == "perplexity":
        return ([r.nll_sum for r in results], [r.n_tokens for r in results]), np.exp
    if metric in SCORES:
        return ([r.value for r in results], [1.0] * len(results)), _percent
    return ([r.lost for r in results], [r.best for r in results]), None


def _mean_points(results: list[Result], metric: str, x_of: dict[str, float]) -> list[Point]:
    """One point per budget: a score's mean (in %, with its standard error), pooled perplexity
    exp(Σ nll / Σ tokens), or pooled cost; each with its bootstrap interval over samples."""
    by_budget: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_budget[r.budget].append(r)
    points = []
    for budget, rs in by_budget.items():
        ratio, transform = _pooled(metric, rs)
        se = mean_stderr([r.value for r in rs]) if metric in SCORES else None
        points.append(Point(budget=budget, x=x_of[budget], y=pooled_ratio(*ratio, transform), n=len(rs),
                            stderr=None if se is None else 100.0 * se, ci=bootstrap_ratio_ci(*ratio, transform)))
    return sorted(points, key=lambda p: p.x)


def _comparisons(metric: str, by_scorer: dict[str, list[Result]], lines: list[Line], x_of: dict[str, float]
                 ) -> list[Comparison]:
    """Each learned policy against each other method but the full cache (two learned policies once), at every
    budget where they share at least two samples (paired by seed and sample)."""
    kinds = {line.scorer: by_scorer[line.scorer][0].scorer_kind for line in lines}  # the full cache has no line
    at: dict[tuple[str, str], dict[tuple[int, str], Result]] = defaultdict(dict)
    for label in kinds:
        for r in by_scorer[label]:
            at[(label, r.budget)][(r.seed, r.sample)] = r
    ci_of = {(line.scorer, p.budget): p.ci for line in lines for p in line.points}
    comparisons = []
    for learned in sorted(label for label, kind in kinds.items() if kind == "learned"):
        for other in sorted(label for label, kind in kinds.items() if kind != "reference" and label != learned):
            if kinds[other] == "learned" and other < learned:  # already compared the other way round
                continue
            for budget in sorted(x_of, key=x_of.get):
                mine, theirs = at.get((learned, budget), {}), at.get((other, budget), {})
                pairs = sorted(mine.keys() & theirs.keys())
                if len(pairs) < 2:
                    continue
                a, transform = _pooled(metric, [mine[k] for k in pairs])
                b, _ = _pooled(metric, [theirs[k] for k in pairs])
                ci_a, ci_b = ci_of[(learned, budget)], ci_of[(other, budget)]
                comparisons.append(Comparison(
                    budget=budget, x=x_of[budget], learned=learned, other=other,
                    difference=pooled_ratio(*a, transform) - pooled_ratio(*b, transform),
                    ci=paired_ratio_difference_ci(a, b, transform), n=len(pairs),
                    overlap=ci_a[0] <= ci_b[1] and ci_b[0] <= ci_a[1], p=paired_permutation_p(a, b, transform)))
    return comparisons


def _budget_x(results: list[Result]) -> dict[str, float]:
    kept: dict[str, list[float]] = defaultdict(list)
    for r in results:
        kept[r.budget].append(float(r.kept))
    return {b: float(np.mean(v)) for b, v in kept.items()}


def _panel(title: str, metric: str, results: list[Result]) -> Panel:
    x_of = _budget_x(results)
    by_scorer: dict[str, list[Result]] = defaultdict(list)
    reference = None
    for r in results:
        by_scorer[r.scorer_label].append(r)
    lines = []
    for label, rs in sorted(by_scorer.items()):
        if rs[0].scorer == FULL:
            reference = _mean_points(rs, metric, x_of)[0]
        else:
            lines.append(Line(scorer=label, points=_mean_points(rs, metric, x_of), kind=scorer_class(rs[0])))
    return Panel(title=title, metric=metric, lines=lines, reference=reference,
                 comparisons=_comparisons(metric, by_scorer, lines, x_of))


def _average_panel(panels: list[Panel], metric: str) -> Panel | None:
    """Mean over tasks of a per-task score, at the (scorer, budget) points every task has (no standard error, no
    interval, no comparisons)."""
    if len(panels) < 2:
        return None
    common: dict[str, dict[str, list[Point]]] = defaultdict(lambda: defaultdict(list))
    for panel in panels:
        for line in panel.lines:
            for p in line.points:
                common[line.scorer][p.budget].append(p)
    lines = []
    for scorer, per_budget in sorted(common.items()):
        pts = [
            Point(budget=b, x=float(np.mean([p.x for p in ps])), y=float(np.mean([p.y for p in ps])),
                  n=min(p.n for p in ps))
            for b, ps in per_budget.items()
            if len(ps) == len(panels)
        ]
        if pts:
            kind = next(line.kind for panel in panels for line in panel.lines if line.scorer == scorer)
            lines.append(Line(scorer=scorer, points=sorted(pts, key=lambda p: p.x), kind=kind))
    refs = [p.reference for p in panels if p.reference is not None]
    reference = None
    if len(refs) == len(panels):
        reference = Point(FULL, max(r.x for r in refs), float(np.mean([r.y for r in refs])), min(r.n for r in refs))
    return Panel(title=f"average over {len(panels)} tasks", metric=metric, lines=lines, reference=reference)


def _panel_results(results: list[Result]) -> list[tuple[str, int | None, list[Result]]]:
    """(title, every, results) of each panel: one per task, and per `every` (tokens fed between two cuts: a bounded
    stream's re-rank interval, a chunked prefill's chunk size; different intervals are different settings). The
    full-cache reference (every None, it cuts nothing) is drawn in each of its task's panels; a task's compress-once
    results (every None) keep their own panel, and its learned policies' are drawn in each chunked panel too,
    labelled ONCE_SUFFIX, so that the panel compares each policy chunked with itself compressing once (paired)."""
    by_panel: dict[tuple[str, int | None], list[Result]] = defaultdict(list)
    for r in results:
        by_panel[(r.task, r.every)].append(r)
    for (task, every), rs in list(by_panel.items()):
        if every is not None or not any(t == task and e is not None for t, e in by_panel):
            continue
        once = [replace(r, scorer_label=r.scorer_label + ONCE_SUFFIX) for r in rs if r.scorer_kind == "learned"]
        for (t, e), others in by_panel.items():
            if t == task and e is not None:
                chunked = others[0].protocol != BOUNDED_STREAM
                others.extend([r for r in rs if r.scorer == FULL] + (once if chunked else []))
        if all(r.scorer == FULL for r in rs):
            del by_panel[(task, every)]
    return [(_panel_title(task, every, rs), every, rs)
            for (task, every), rs in sorted(by_panel.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))]


ONCE_SUFFIX = ", compress-once"  # a learned policy's compress-once line in a chunked prefill's panel


def _panel_title(task: str, every: int | None, results: list[Result]) -> str:
    if every is None:
        return task
    if any(r.protocol == BOUNDED_STREAM for r in results):
        return f"{task}, re-ranked every {every} tokens"
    return f"{task}, prefilled {every} tokens at a time, cut after each"


def curve_groups(results: Iterable[Result]) -> list[Group]:
    """Groups (figures) of quality-vs-cache-size curves for every score, perplexity and per-budget cost."""
    buckets: dict[tuple, list[Result]] = defaultdict(list)
    for result in results:
        if result.budget == WHOLE_RANKING:  # whole-ranking cost: drawn as the per-head heatmap, not as a curve
            continue
        for r in result.per_metric():
            buckets[(r.model, r.family, r.metric, r.protocol, r.context_tokens, r.data)].append(r)
    groups = []
    for (model, family, metric, protocol, ctx, data), rs in sorted(buckets.items(), key=lambda kv: str(kv[0])):
        group = Group(model=model, family=family, metric=metric, protocol=protocol, context_tokens=ctx, data=data,
                      training=training_notes(rs), seed_families=seed_families(rs))
        panels = [(every, _panel(title, metric, trs)) for title, every, trs in _panel_results(rs)]
        group.panels = [panel for _, panel in panels]
        if metric in SCORES:  # one average per setting: compress-once, and each prefill chunk size apart
            for every in dict.fromkeys(every for every, _ in panels):
                average = _average_panel([panel for e, panel in panels if e == every], metric)
                if average is not None:
                    if every is not None:
                        average.title += f", prefilled {every} tokens at a time"
                    group.panels.append(average)
        groups.append(_holm_corrected(group))
    return groups


def _holm_corrected(group: Group) -> Group:
    """The group, each comparison marked whether it survives Holm's correction at ALPHA over all comparisons of
    the group's panels (one family: the rows of its comparison table)."""
    family = [c for panel in group.panels for c in panel.comparisons]
    survives = iter(holm_survivors([c.p for c in family], ALPHA))
    group.panels = [replace(panel, comparisons=[replace(c, holm=next(survives)) for c in panel.comparisons])
                    for panel in group.panels]
    return group


@dataclass
class HeadMap:
    """Per-head whole-ranking normalized cost of every scorer on one trace set: cost[scorer] is (L, H)."""

    model: str
    data: str
    n: int
    cost: dict[str, np.ndarray]
    heuristics: list[str]  # scorers that count as heuristics (no oracle, no learned policy)

    def best_heuristic(self) -> tuple[np.ndarray, list[str]]:
        """(L, H) index into `heuristics` of the lowest-cost heuristic per head, and the names."""
        stacked = np.stack([self.cost[h] for h in self.heuristics])  # (S, L, H)
        return stacked.argmin(axis=0), self.heuristics

    def caption(self) -> str:
        return (f"model: {self.model} · protocol: held-out traces, whole-ranking cost of the evictable tokens "
                f"(sinks and recent kept by every method) · data: {self.data} · n = {self.n} samples")


def head_maps(results: Iterable[Result]) -> list[HeadMap]:
    """One HeadMap per (model, trace set) from the whole-ranking (WHOLE_RANKING budget) cost results."""
    buckets: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        if r.metric == "cost" and r.budget == WHOLE_RANKING:
            buckets[(r.model, r.data)].append(r)
    maps = []
    for (model, data), rs in sorted(buckets.items()):
        by_scorer: dict[str, list[np.ndarray]] = defaultdict(list)
        kinds: dict[str, str] = {}
        for r in rs:
            by_scorer[r.scorer_label].append(np.asarray(r.per_head, dtype=np.float64))
            kinds[r.scorer_label] = r.scorer_kind
        cost = {s: np.mean(v, axis=0) for s, v in by_scorer.items()}
        heuristics = sorted(s for s in cost if kinds[s] == "heuristic")
        if heuristics:
            n = min(len(v) for v in by_scorer.values())
            maps.append(HeadMap(model=model, data=data, n=n, cost=cost, heuristics=heuristics))
    return maps


@dataclass
class Throughput:
    """Evaluation speed of one scorer (or of all scorers together) on one kind of sample: a sample's shared
    prefill plus the scorer's ranking, cuts and answers at every budget of the sweep."""

    family: str
    context_tokens: int | None
    protocol: str
    every: int | None  # a bounded stream's re-rank interval (each interval is its own setting); None otherwise
    scorer: str
    samples: int
    results: int  # results per sample (budgets of one scorer, or all results of a sample)
    seconds_per_sample: float

    @property
    def samples_per_minute(self) -> float:
        return 60.0 / self.seconds_per_sample if self.seconds_per_sample > 0 else float("inf")


ALL_SCORERS = "all scorers together"


@dataclass
class _SampleTime:
    """The time one sample took: its shared prefill, and the work of `results` results on it."""

    prefill: float
    work: float = 0.0
    results: int = 0


def throughput(results: Iterable[Result]) -> list[Throughput]:
    """Per scorer (its share of the sweep: answers are decoded in one batch with the other scorers at the same
    budget) and for all scorers of a sample together (one prefill, every ranking, cut and answer)."""
    per_sample: dict[tuple, _SampleTime] = {}
    for r in results:
        key = (r.model, r.family, r.context_tokens, r.protocol, r.every, r.scorer_label, r.task, r.sample)
        spent = per_sample.setdefault(key, _SampleTime(float(r.prefill_seconds)))
        spent.work += float(r.seconds)
        spent.results += 1
    together: dict[tuple, _SampleTime] = {}
    for (model, family, ctx, protocol, every, _, task, sample), spent in per_sample.items():
        whole = together.setdefault((model, family, ctx, protocol, every, ALL_SCORERS, task, sample),
                                    _SampleTime(spent.prefill))
        whole.work += spent.work
        whole.results += spent.results
    grouped: dict[tuple, list[_SampleTime]] = defaultdict(list)
    for (_, family, ctx, protocol, every, scorer, _, _), spent in (per_sample | together).items():
        grouped[(family, ctx, protocol, every, scorer)].append(spent)
    out = []
    for (family, ctx, protocol, every, scorer), times in sorted(grouped.items(), key=lambda kv: str(kv[0])):
        seconds = float(np.mean([t.prefill + t.work for t in times]))
        out.append(Throughput(family, ctx, protocol, every, scorer, len(times), max(t.results for t in times),
                              seconds))
    return out


@dataclass
class CurvePoint:
    x: int  # training prompts or steps
    cost: float  # mean whole-ranking normalized cost over the held-out samples
    stderr: float | None
    n: int
    ci: Interval | None = None  # 95% bootstrap interval of the mean cost over samples (n >= 2)


@dataclass
class LearningCurve:
    """Held-out whole-ranking cost of learned policies of one model, trained on one trace source, against their
    number of training prompts (at the most steps) and training steps (at the most prompts), on one data set (one
    corpus of a mix), with the baselines' costs on the same samples as references."""

    model: str
    data: str
    source: str  # the trace source every policy of the curve was trained on
    by_prompts: list[CurvePoint]
    by_steps: list[CurvePoint]
    references: dict[str, float]  # scorer label -> mean cost (heuristics and the oracle)

    def caption(self) -> str:
        n = max((p.n for p in self.by_prompts + self.by_steps), default=0)
        return (f"model: {self.model} · policies trained on {self.source} traces · data: {self.data} · whole-ranking "
                f"normalized cost of the evictable tokens (1 = oracle, lower is better) · n = {n} held-out samples "
                "per point")


def cost_point(x: int, rs: list[Result]) -> CurvePoint:
    """The mean whole-ranking cost of `rs` (one result per held-out sample: its cost, a mean over heads), with its
    standard error and 95% bootstrap interval over the samples; x: the point's place on a curve."""
    values = [r.value for r in rs]
    return CurvePoint(x, float(np.mean(values)), mean_stderr(values), len(values), bootstrap_ci(values))


def learning_curves(results: Iterable[Result]) -> list[LearningCurve]:
    """One LearningCurve per (model, data, trace source) where learned policies trained on that source with
    different numbers of prompts or steps were evaluated on held-out traces; policies of different sources (KVP-R
    and KVP-D) are different recipes, not points of one curve."""
    buckets: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in results:
        if r.metric == "cost" and r.budget == WHOLE_RANKING:
            buckets[(r.model, r.data)].append(r)
    curves = []
    for (model, data), rs in sorted(buckets.items()):
        learned: dict[str, dict[tuple[int, int], list[Result]]] = defaultdict(lambda: defaultdict(list))
        references: dict[str, list[float]] = defaultdict(list)
        for r in rs:
            trained = r.trained_on
            if r.scorer_kind == "learned" and trained and trained.prompts and trained.steps:
                learned[trained.source][(trained.prompts, trained.steps)].append(r)
            elif r.scorer_kind != "learned":
                references[r.scorer_label].append(r.value)
        reference_means = {label: float(np.mean(v)) for label, v in sorted(references.items())}
        for source, points in sorted(learned.items()):
            if len(points) < 2:
                continue
            most_steps = max(steps for _, steps in points)
            most_prompts = max(prompts for prompts, _ in points)
            by_prompts = [cost_point(p, points[(p, s)]) for p, s in sorted(points) if s == most_steps]
            by_steps = [cost_point(s, points[(p, s)]) for p, s in sorted(points, key=lambda k: k[1])
                        if p == most_prompts]
            curves.append(LearningCurve(model, data, source, by_prompts, by_steps, reference_means))
    return curves

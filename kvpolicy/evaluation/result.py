"""A result: one evaluated (model, scorer, budget, task, context length, protocol, seed, sample), as the typed
`Result` the sweep builds and the report reads, and as the JSON object that is one line of a results file.

Every record carries the schema version it was written with (schema 1 called that field "format"); a reader
refuses any other version, and checks every field against the type `Result` declares for it (kvpolicy.schema),
and then every value against what the sweep can write (BOUNDS: never NaN or infinite, a score in [0, 1], a count
never negative, a known budget label), so a damaged record is one error naming FILE:LINE and the field, never a
traceback or a nonsense figure later. Schema 3 names each metric as lm-eval-harness or LongBench does (acc,
acc_norm, rouge_l, retrieval_score) and records further metrics of the same answer in `extra_metrics`; schema 2
records are read too, except those of the zero-shot tasks, which schema 3 scores otherwise (see RESCORED).
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Union, get_args, get_origin, get_type_hints

from kvpolicy.errors import KVPError
from kvpolicy.io import sha256_json
from kvpolicy.schema import Optional, validate

SCHEMA = 3
# zero-shot tasks that schema 2 scored otherwise (ARC on its letter labels, BoolQ with another prompt, every metric
# called "accuracy"): their schema-2 records are refused, never mixed with records of the same key scored now
RESCORED = ("boolq", "arc_challenge", "gov_report", "passage_retrieval_en")

FULL = "full"  # scorer spec and budget label of the uncompressed reference
WHOLE_RANKING = "all"  # budget label of a trace's whole-ranking cost

# the fields that identify a result (its configuration); every other field is a measurement or a description
KEY_FIELDS = ("model_fingerprint", "model_dtype", "scorer_id", "budget", "task", "context_tokens", "protocol", "every",
              "seed", "sample")
# key fields added after the first results were written: at these values they are left out of the key's hash, so
# records written before them keep their keys (every earlier result ran in float32, and none was a bounded stream)
KEY_DEFAULTS = {"model_dtype": "float32", "every": None}

# metrics whose value is a per-sample score in [0, 1], reported as a mean over samples with its standard error:
# RULER's string match ("accuracy"), lm-eval's multiple-choice acc and acc_norm, LongBench's ROUGE-L F1 (GovReport)
# and retrieval score (passage retrieval)
SCORES = ("accuracy", "acc", "acc_norm", "rouge_l", "retrieval_score")
# what a record of each metric must hold beyond the fields without a default: a cost record holds `per_head` ((L, H)
# per-head cost) and, at a budget (not the whole ranking), the mean evicted utility `lost` and the oracle's `best`
METRIC_FIELDS = {**dict.fromkeys(SCORES, ()), "perplexity": ("nll_sum", "n_tokens"),
                 "cost": ("lost", "best", "per_head")}
WHOLE_RANKING_FIELDS = ("per_head",)

# the budget labels the sweep writes: Budget.label ('b256', 'r0.50'), FULL and WHOLE_RANKING
BUDGET_LABEL = re.compile(rf"b[0-9]+|r[0-9]+\.[0-9]+|{FULL}|{WHOLE_RANKING}")

DAMAGED = "a results file holds only records written by `kvp sweep`; re-run the sweep into a new results file"

# what the report reads of a learned scorer's identity (see TrainedOn)
_IDENTITY = {"trained_on": Optional({"source": (str, None), "context_tokens": (int, None),
                                     "prompts": Optional((int, None)), "steps": Optional((int, None))})}


@dataclass(frozen=True)
class TrainedOn:
    """What a learned policy was trained on: its trace source ("ruler" | "dialogue" | "essays" | "mix"), context
    length, number of training prompts and training steps (None where the checkpoint does not say)."""

    source: str | None
    context_tokens: int | None
    prompts: int | None = None
    steps: int | None = None


@dataclass(frozen=True)
class Result:
    """One result. The key (KEY_FIELDS): model_fingerprint, model_dtype, scorer_id (hash of the scorer's identity),
    budget (label: 'b256', 'r0.50', FULL or WHOLE_RANKING), task, context_tokens (None: the data's own lengths),
    protocol, every (tokens fed between two cuts: a bounded stream's re-rank interval, or the chunk size of a prompt
    prefilled chunk by chunk; None for compress-once and for a stream's full-cache reference, which cuts nothing),
    seed, sample. What the report names and draws: model,
    scorer (spec), scorer_label, scorer_kind ("heuristic" | "learned" | "oracle" | "reference"), family, data, corpus,
    metric (a name of METRIC_FIELDS), kept (cache entries per head after the cut), value (the sample's score), seconds
    (this result's own work) and prefill_seconds (its share of the prefill). Per metric: prediction and answers
    (SCORES); nll_sum and n_tokens (perplexity, pooled as exp(Σ nll_sum / Σ n_tokens)); lost, best and per_head (cost,
    see METRIC_FIELDS). extra_metrics: further score metrics of the same answer by name, beside `metric` (lm-eval's
    acc_norm beside acc). `schema` is the version this kvpolicy writes; `key` is derived from the key fields."""

    model_fingerprint: str
    scorer_id: str
    budget: str
    task: str
    context_tokens: int | None
    protocol: str
    seed: int
    sample: str
    model: str
    scorer: str
    scorer_label: str
    family: str
    data: str
    metric: str
    kept: int
    value: float
    seconds: float
    scorer_kind: str = "heuristic"
    scorer_identity: dict = field(default_factory=dict, metadata={"schema": _IDENTITY})
    corpus: str | None = None
    prefill_seconds: float = 0.0
    budget_tokens: int | None = None
    budget_ratio: float | None = None
    length: int | None = None  # cache entries per head before the cut
    cache_bytes_full: int | None = None
    cache_bytes: int | None = None
    prediction: str | None = None
    answers: list[str] | None = None
    nll_sum: float | None = None
    n_tokens: int | None = None
    lost: float | None = None
    best: float | None = None
    per_head: list[list[float]] | None = None
    extra_metrics: dict[str, float] | None = None
    model_dtype: str = KEY_DEFAULTS["model_dtype"]  # the dtype the model ran in
    every: int | None = KEY_DEFAULTS["every"]  # tokens fed between two cuts: re-rank interval, prefill chunk
    created: str | None = None  # ISO time of writing
    code_version: str | None = None
    schema: int = field(default=SCHEMA, init=False)

    @property
    def key(self) -> str:
        return record_key({name: getattr(self, name) for name in KEY_FIELDS})

    @property
    def trained_on(self) -> TrainedOn | None:
        """What a learned scorer was trained on, as its checkpoint states it (None for any other scorer)."""
        trained = self.scorer_identity.get("trained_on") if self.scorer_kind == "learned" else None
        if not trained:
            return None
        return TrainedOn(trained.get("source"), trained.get("context_tokens"), trained.get("prompts"),
                         trained.get("steps"))

    def per_metric(self) -> list[Result]:
        """The result once per metric it holds: itself, then one copy per extra metric with that metric's value."""
        extra = self.extra_metrics or {}
        return [self] + [replace(self, metric=name, value=value, extra_metrics=None) for name, value in extra.items()]

    def to_json(self) -> dict[str, Any]:
        """The record as a results file holds it: every field but those null by default and null here (a
        perplexity record holds no `per_head`), and the key."""
        record = {name: value for name, value in asdict(self).items() if value is not None or name not in _NULL}
        return {**record, "key": self.key}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Result:
        """The result a JSON record holds, checked (see check_record); `where` (FILE:LINE) names it in errors."""
        check_record(obj, where)
        return cls(**{f.name: obj[f.name] for f in fields(cls) if f.init and f.name in obj})


def record_key(key_fields: dict[str, Any]) -> str:
    """Stable key of a configuration: sha256 over the KEY_FIELDS (all required but those of KEY_DEFAULTS)."""
    missing = [f for f in KEY_FIELDS if f not in key_fields and f not in KEY_DEFAULTS]
    if missing:
        raise KVPError(f"result record lacks key fields {missing}; a record needs all of {list(KEY_FIELDS)}")
    values = {f: key_fields.get(f, KEY_DEFAULTS.get(f)) for f in KEY_FIELDS}
    return sha256_json({f: v for f, v in values.items() if f not in KEY_DEFAULTS or v != KEY_DEFAULTS[f]})[:24]


def _spec(hint: Any) -> Any:
    """The kvpolicy.schema spec of a field type: str, int, float, dict, X | None, list[X]."""
    if hint is type(None):
        return None
    if get_origin(hint) in (Union, types.UnionType):
        return tuple(_spec(arg) for arg in get_args(hint))
    if get_origin(hint) is list:
        return [_spec(get_args(hint)[0])]
    return get_origin(hint) or hint


def _record_schema() -> dict[str, Any]:
    """The schema of a record, from Result's field types: a field without a default is required, any other may be
    absent (and null where its type allows)."""
    hints = get_type_hints(Result)
    schema = {}
    for f in fields(Result):
        spec = f.metadata.get("schema", _spec(hints[f.name]))
        schema[f.name] = spec if f.default is MISSING and f.default_factory is MISSING else Optional(spec)
    return schema


RECORD = _record_schema()
_NULL = {f.name for f in fields(Result) if f.default is None}  # null unless set: left out of a record when null
_PER_METRIC = {name for names in METRIC_FIELDS.values() for name in names}


def _present(name: str) -> Any:
    """The spec of a field that a record's metric requires: RECORD's, neither absent nor null."""
    spec = RECORD[name].schema
    if not isinstance(spec, tuple):
        return spec
    rest = tuple(s for s in spec if s is not None)
    return rest[0] if len(rest) == 1 else rest


@dataclass(frozen=True)
class Bounds:
    """Where a measured number lies: finite, lo <= x (lo < x when `above`) and x <= hi."""

    lo: float = 0.0
    hi: float = math.inf
    above: bool = False

    def admits(self, x: float) -> bool:
        return math.isfinite(x) and (x > self.lo if self.above else x >= self.lo) and x <= self.hi

    def __str__(self) -> str:
        if math.isfinite(self.hi):
            return f"in [{self.lo:g}, {self.hi:g}]"
        return f"{'>' if self.above else '>='} {self.lo:g}"


SHARE, NON_NEGATIVE, AT_LEAST_ONE = Bounds(0, 1), Bounds(0), Bounds(1)
# what the sweep writes into each numeric field (`value` by metric, list and dict fields per item): a score is a
# per-sample fraction in [0, 1] (never a percentage); a perplexity exp(mean nll) >= 1, so any positive number passes;
# a cost is a ratio of evicted utility, unbounded above; lost and best are shares of the utility. Nothing is ever NaN
# or infinite: json.dumps writes NaN by default (the store's allow_nan=True only says so), but no metric produces one
# from finite model outputs and traces, and one would poison every mean it enters.
BOUNDS = {"kept": NON_NEGATIVE, "length": NON_NEGATIVE, "cache_bytes_full": NON_NEGATIVE, "cache_bytes": NON_NEGATIVE,
          "seconds": NON_NEGATIVE, "prefill_seconds": NON_NEGATIVE, "context_tokens": AT_LEAST_ONE,
          "every": AT_LEAST_ONE, "budget_tokens": AT_LEAST_ONE, "budget_ratio": SHARE, "nll_sum": NON_NEGATIVE,
          "n_tokens": AT_LEAST_ONE, "lost": SHARE, "best": SHARE, "per_head": NON_NEGATIVE, "extra_metrics": SHARE}
VALUE_BOUNDS = {**dict.fromkeys(SCORES, SHARE), "perplexity": Bounds(0, above=True), "cost": NON_NEGATIVE}
PERPLEXITY_TOLERANCE = 0.01  # |log(value) − nll_sum / n_tokens|: the sweep's float32 sum and mean differ by ~1e-7


def _numbers(name: str, value: Any) -> Iterator[tuple[str, Any]]:
    """(field, number) of a field: itself, or each item of a list of lists (per_head) or of an object."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(f"{name}[{i}]", item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(f"{name}.{key}", item)
    elif value is not None:
        yield name, value


def _value_problem(obj: dict) -> str | None:
    """What is wrong with a well-typed record's values (None when nothing): a number out of its BOUNDS, a budget
    label the sweep never writes, more entries kept than the cache held, a perplexity that is not exp(nll_sum /
    n_tokens)."""
    if not BUDGET_LABEL.fullmatch(obj["budget"]):
        return (f"field 'budget' must be a budget label ('b256', 'r0.50', '{FULL}' or '{WHOLE_RANKING}'), "
                f"got {obj['budget']!r:.60}")
    checks = [(name, BOUNDS[name]) for name in BOUNDS] + [("value", VALUE_BOUNDS[obj["metric"]])]
    for name, bounds in checks:
        for field_name, number in _numbers(name, obj.get(name)):
            if not bounds.admits(number):
                return f"field '{field_name}' must be a finite number {bounds}, got {number!r:.60}"
    if obj.get("length") is not None and obj["kept"] > obj["length"]:
        return f"field 'kept' must be at most the cache's length before the cut ({obj['length']}), got {obj['kept']}"
    if obj["metric"] == "perplexity":
        mean_nll = obj["nll_sum"] / obj["n_tokens"]
        if abs(math.log(obj["value"]) - mean_nll) > PERPLEXITY_TOLERANCE:
            return (f"field 'value' must be the perplexity exp(nll_sum / n_tokens) = {math.exp(min(mean_nll, 700)):.4g}"
                    f", got {obj['value']!r:.60}")
    return None


def check_record(obj: Any, where: str, fix: str = DAMAGED) -> None:
    """Refuse a record of a schema version this kvpolicy cannot read, or one missing or mistyping a field or holding
    a value the sweep never writes (_value_problem): one KVPError naming `where` (FILE:LINE) and the version or the
    field. The fields its metric requires are checked before the others of that kind, so that a bad value deep in
    one (per_head[0][1]) is named exactly. `fix`: what the user should do about it."""
    if not isinstance(obj, dict):
        raise KVPError(f"{where} is not a result record (expected a JSON object)")
    found = obj.get("schema", obj.get("format"))  # schema 1 called its version "format"
    if found is None:
        raise KVPError(f"{where} holds a record without a schema version; this kvpolicy reads schema {SCHEMA}; "
                       "re-run the sweep into a new results file")
    if found == 2 and obj.get("task") in RESCORED:
        raise KVPError(f"{where} holds a {obj['task']} result of schema 2, scored before this kvpolicy (schema "
                       f"{SCHEMA}) followed lm-eval-harness; re-run the sweep into a new results file")
    if found not in (2, SCHEMA):
        raise KVPError(f"{where} holds results of schema {found!r}; this kvpolicy reads schema {SCHEMA}; "
                       "re-run the sweep into a new results file")
    validate(obj, {name: spec for name, spec in RECORD.items() if name not in _PER_METRIC}, where, fix)
    metric = obj["metric"]
    if metric not in METRIC_FIELDS:
        raise KVPError(f"{where}: field 'metric' must be one of {', '.join(METRIC_FIELDS)}, got {metric!r}; {fix}")
    required = WHOLE_RANKING_FIELDS if metric == "cost" and obj["budget"] == WHOLE_RANKING else METRIC_FIELDS[metric]
    validate(obj, {name: _present(name) for name in required}, where, fix)
    validate(obj, RECORD, where, fix)
    extra = obj.get("extra_metrics") or {}
    unknown = [name for name in extra if name not in SCORES]
    if unknown:
        raise KVPError(f"{where}: field 'extra_metrics' names {unknown[0]!r}, not one of {', '.join(SCORES)}; "
                       f"{fix}")
    if extra:
        validate(obj, {"extra_metrics": {name: float for name in extra}}, where, fix)
    if (problem := _value_problem(obj)) is not None:
        raise KVPError(f"{where}: {problem}; {fix}")

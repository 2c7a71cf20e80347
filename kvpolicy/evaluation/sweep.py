"""The sweep: models × scorers × budgets × tasks × protocols (× context lengths, × the re-rank intervals of bounded
streams) into a resumable results store.

Every result is one JSONL record keyed by its full configuration; a key already in the store is never
recomputed, so a killed sweep resumes where it stopped. Work is organised so that nothing is computed twice: one
prefill per sample (or per shared context) and protocol, one ranking per scorer, one cut per budget; a bounded
stream, whose every cut depends on the scorer, budget and interval before it, is one stream per result. Sweeps
started together on one results file share the work: each claims a unit before computing it and leaves the units
claimed by others for last, when it waits for them and computes only what is still missing.

Under torchrun (WORLD_SIZE > 1) every rank runs the sweep into the one results store. Rank r of W starts with its
own share of the planned units (r, r + W, r + 2W, ...), so no two ranks contend for a unit at the start, then
takes the others' shares from their far end, where their owners come last: a rank that finishes early steals the
work still unclaimed, and the claims keep every result written once. The store's locks are POSIX locks on the
results file's sidecar, so ranks on several nodes need the results file on a filesystem they all share (with
working POSIX locks). Only rank 0 shows a progress bar, counting the other ranks' results as it meets their units.
The ranks meet at status checks: before each model's work (so that they start on their shares together) and at
the end (after which every rank's results are in the store). A rank that fails goes to the next check and raises
its error there; every other rank stops at that check with a one-line error that another rank failed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, UTC
from typing import Any

from tqdm import tqdm

import kvpolicy
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.catalog import SWEEP, default_lineup
from kvpolicy.distributed import AnotherRankFailed, DistContext, init_distributed, shutdown_distributed
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.lineup import FULL_CACHE, Contender, IsMissing, make_contenders, parse_budget
from kvpolicy.evaluation.names import DEFAULT_EVERY, PROTOCOLS
from kvpolicy.evaluation.outcome import Outcome
from kvpolicy.evaluation.result import FULL, KEY_DEFAULTS, Result, record_key
from kvpolicy.evaluation.store import ResultStore
from kvpolicy.evaluation.tasks import resolve_tasks
from kvpolicy.evaluation.tasks.base import Intervals, Task
from kvpolicy.io import check_writable
from kvpolicy.models import ModelHandle, load_model, resolve_model
from kvpolicy.models.placement import resolve_device
from kvpolicy.models.registry import DEFAULT_MODEL
from kvpolicy.progress import bar


@dataclass
class SweepConfig:
    """out: the JSONL results file. budgets: tokens per head ('256') or compression ratios ('0.5' / 'r0.5').
    protocols: empty = each task's default. context_tokens: lengths for tasks sized in tokens (RULER-style,
    dialogue; longgen: the stream's length); others use their data's own lengths. max_new_tokens: 0 = each task's
    own limit, else a cap. full_cache: also evaluate the uncompressed cache as the reference. hub_local: hub
    dataset -> local file. device, dtype: where the models run (kvpolicy.models.placement's defaults when None).
    every: the re-rank intervals of bounded streams (longgen tasks): tokens fed between two cuts, one set of
    results each. prefill_chunks: chunk sizes at which the prompts of QA and dialogue tasks are also prefilled
    chunk by chunk, cut back to the budget after each, one set of results each beside compress-once."""

    out: str
    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    scorers: list[str] = field(default_factory=lambda: list(default_lineup(SWEEP)))
    budgets: list[str] = field(default_factory=lambda: ["128", "256", "512"])
    tasks: list[str] = field(default_factory=lambda: ["ruler"])
    protocols: list[str] = field(default_factory=list)
    context_tokens: list[int] = field(default_factory=lambda: [2048])
    n_samples: int = 5
    seed: int = 0
    max_new_tokens: int = 0
    full_cache: bool = True
    hub_local: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    every: list[int] = field(default_factory=lambda: [DEFAULT_EVERY])
    prefill_chunks: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("models", "scorers", "budgets", "tasks", "context_tokens", "every"):
            if not getattr(self, name):
                raise KVPError(f"a sweep needs at least one entry in {name}")
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown:
            raise KVPError(f"unknown protocol(s) {', '.join(unknown)}; known protocols: {', '.join(PROTOCOLS)}")
        if self.n_samples < 1:
            raise KVPError(f"need at least 1 sample per task, got {self.n_samples}")
        if any(c < 64 for c in self.context_tokens):
            raise KVPError(f"context lengths must be at least 64 tokens, got {self.context_tokens}")
        if self.max_new_tokens < 0:
            raise KVPError("max_new_tokens must be >= 0 (0: each task's own limit)")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.every):
            raise KVPError(f"re-rank intervals (--every) are whole numbers of tokens >= 1, got {self.every}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.prefill_chunks):
            raise KVPError(f"prefill chunks (--prefill-chunk) are whole numbers of tokens >= 1, got "
                           f"{self.prefill_chunks}")

    @property
    def intervals(self) -> Intervals:
        return Intervals(tuple(self.every), tuple(self.prefill_chunks))


@dataclass
class WorkUnit:
    """One prefill's worth of work: samples sharing a context under one (task, protocol, context length), and the
    contenders evaluated on it; `every` is the tokens fed between two cuts: a bounded stream's re-rank interval or a
    chunked prefill's chunk size (None: compress-once, or a stream's full-cache reference, which cuts nothing)."""

    task: Task
    protocol: str
    context_tokens: int | None
    samples: list[Any]  # what the task's kind loads: QASample, DialogueSample, StreamSample, trace index
    contenders: list[Contender]
    missing: int  # results the store lacked when the unit was planned
    every: int | None = None


@dataclass
class SweepRun:
    """What one run of a sweep did: results written into `path`, results found already there, seconds taken.
    Under torchrun `written` counts every rank's results and `per_rank[r]` those of rank r; `rank` is the process
    the run belongs to (0 outside torchrun)."""

    path: str
    written: int
    skipped: int
    seconds: float
    notes: list[str]
    per_rank: list[int] = field(default_factory=list)
    rank: int = 0


def _protocols(task: Task, requested: list[str]) -> list[str]:
    """The requested protocols the task supports (none requested: the task's default)."""
    if not requested:
        return [task.protocols[0]]
    return [p for p in requested if p in task.protocols]


def rank_order(n: int, rank: int, world: int) -> list[int]:
    """Indices 0..n-1 in the order rank `rank` of `world` takes them: its own share first (rank, rank + world,
    rank + 2·world, ...), then the other ranks' shares from the last index back, since their owners reach those
    last (a world of one: 0..n-1)."""
    return list(range(rank, n, world)) + [i for i in reversed(range(n)) if i % world != rank]


class Sweep:
    """Plans and runs a SweepConfig against its store, as rank `ctx.rank` of `ctx.world` (torchrun) or alone."""

    def __init__(self, config: SweepConfig, ctx: DistContext | None = None):
        check_writable(config.out, "results file")
        self.config = config
        self.ctx = ctx or DistContext()
        self.store = ResultStore(config.out)
        self.budgets: list[Budget] = [parse_budget(b) for b in config.budgets]
        self.tasks = resolve_tasks(config.tasks, config.hub_local)
        for name in config.models:
            resolve_model(name)  # unknown names fail now, listing the known models
        self.contenders = make_contenders(config.scorers)
        for task in self.tasks:  # a line-up a task cannot run is refused now, not midway through the sweep
            task.check_lineup(self.contenders, self.budgets, config.intervals)
        for contender in self.contenders:  # and likewise a budget a scorer cannot cut to
            if contender.scorer is not None:
                contender.scorer.check_budgets(self.budgets)
        self.notes: list[str] = []

    def key_fields(self, handle: ModelHandle, contender: Contender, budget: str, unit: WorkUnit, sample: str) -> dict:
        """The key fields (result.KEY_FIELDS) of one result of `unit`."""
        return {"model_fingerprint": handle.info.fingerprint, "model_dtype": handle.dtype_name,
                "scorer_id": contender.id, "budget": budget,
                "task": unit.task.name, "context_tokens": unit.context_tokens, "protocol": unit.protocol,
                "every": unit.every, "seed": self.config.seed, "sample": sample}

    def _budget_labels(self, contender: Contender, task: Task) -> list[str]:
        """The budget labels of a contender's results on `task` (the task may add its own)."""
        if contender is FULL_CACHE:
            return [FULL]
        return task.budget_labels([b.label for b in self.budgets])

    def plan(self, handle: ModelHandle) -> list[WorkUnit]:
        """The units of work for one model, with how many results each still lacks."""
        for contender in self.contenders:
            if contender.kind == "learned":
                contender.scorer.check_model(handle.info)  # a policy trained for another model is refused
        units = []
        for task in self.tasks:
            protocols = _protocols(task, self.config.protocols)
            if not protocols:
                self.notes.append(f"{task.name}: none of the protocols {self.config.protocols} applies "
                                  f"(it supports {', '.join(task.protocols)})")
            contexts = self.config.context_tokens if task.sized else [None]
            for context_tokens in contexts:
                samples = task.samples(handle, self.config.n_samples, context_tokens, self.config.seed)
                self._check_positions(handle, task, context_tokens, samples)
                for protocol in protocols:
                    contenders = self._contenders(task, protocol)
                    for group in task.prefill_groups(protocol, samples):
                        for every, members in task.interval_groups(contenders, protocol, self.config.intervals):
                            self._note_unchunked(task, protocol, contenders, every, members)
                            unit = WorkUnit(task, protocol, context_tokens, group, members, 0, every)
                            unit.missing = self._missing(handle, unit)
                            units.append(unit)
        return units

    def _note_unchunked(self, task: Task, protocol: str, contenders: list[Contender], every: int | None,
                        members: list[Contender]) -> None:
        """Say which scorers a chunked prefill leaves to compress-once: those ranking only a whole prefill."""
        if every is None or protocol not in task.chunked_protocols:
            return
        left = [c.label for c in contenders if c is not FULL_CACHE and c not in members]
        if left:  # repeats are dropped when the run reports its notes
            self.notes.append(f"{task.name}: {', '.join(left)} ran compress-once only under {protocol} (a chunked "
                              "prefill needs a scorer that ranks a cut cache)")

    def _contenders(self, task: Task, protocol: str) -> list[Contender]:
        """The contenders `task` runs under `protocol`, after the full-cache reference when the sweep and the task
        compare with it; those it cannot run are left out with a note."""
        contenders = [c for c in self.contenders if task.supports(c, protocol)]
        skipped = [c.label for c in self.contenders if c not in contenders]
        if skipped:
            self.notes.append(f"{task.name}: skipped {', '.join(skipped)} under {protocol} (cannot run there)")
        if self.config.full_cache and task.full_cache_reference:
            contenders = [FULL_CACHE, *contenders]
        return contenders

    def _missing(self, handle: ModelHandle, unit: WorkUnit) -> int:
        """How many results of `unit` the store lacks."""
        return sum(record_key(self.key_fields(handle, c, label, unit, unit.task.sample_id(s))) not in self.store
                   for c in unit.contenders for label in self._budget_labels(c, unit.task) for s in unit.samples)

    def _unit_id(self, handle: ModelHandle, unit: WorkUnit) -> dict[str, Any]:
        """What names a unit across sweeps: its prefill (model, task, protocol, context, re-rank interval, seed,
        samples)."""
        return {"model_fingerprint": handle.info.fingerprint, "task": unit.task.name, "protocol": unit.protocol,
                "context_tokens": unit.context_tokens, "every": unit.every, "seed": self.config.seed,
                "samples": [unit.task.sample_id(s) for s in unit.samples]}

    def _check_positions(self, handle: ModelHandle, task: Task, context_tokens: int | None,
                         samples: list[Any]) -> None:
        """Refuse, before any work, samples that need more positions (prompt and answer, or the whole stream) than
        the model has; a task that runs no model (trace costs) needs none."""
        needed = task.positions(handle, samples, self.config.max_new_tokens)
        if needed is None:
            return
        need, what = needed
        have = handle.info.max_positions
        if need > have:
            at = f" at --context {context_tokens}" if context_tokens else ""
            fix = (f"use a --context at least {need - have} tokens shorter" if task.sized
                   else "use a model with more positions")
            raise KVPError(f"{task.name}{at} needs {need} positions ({what}) but {handle.info.name} has {have}; {fix}")

    def _outcomes(self, handle: ModelHandle, unit: WorkUnit, is_missing: IsMissing) -> Iterator[Outcome]:
        """The task's runner on `unit`: outcomes of its missing results."""
        contenders = [c for c in unit.contenders if c is not FULL_CACHE]
        return unit.task.outcomes(handle, unit.samples, unit.protocol, contenders, self.budgets, is_missing,
                                  unit.every, self.config.max_new_tokens)

    def result(self, handle: ModelHandle, unit: WorkUnit, outcome: Outcome) -> Result:
        """The result record of one outcome of `unit`."""
        contender, task = outcome.contender, unit.task
        budget = next((b for b in self.budgets if b.label == outcome.budget), None)
        data, corpus = task.sample_facts(outcome.sample)
        return Result(
            **self.key_fields(handle, contender, outcome.budget, unit, outcome.sample),
            model=_model_label(handle), scorer=contender.spec, scorer_label=contender.label, scorer_kind=contender.kind,
            scorer_identity=contender.identity, budget_tokens=budget.tokens if budget else None,
            budget_ratio=budget.ratio if budget else None, family=task.family, data=data, corpus=corpus,
            metric=task.metric, length=outcome.length, kept=outcome.kept, cache_bytes_full=outcome.cache_bytes_full,
            cache_bytes=outcome.cache_bytes, seconds=round(outcome.seconds, 4),
            prefill_seconds=round(outcome.prefill_seconds, 4), **outcome.fields,
            created=datetime.now(UTC).isoformat(timespec="seconds"), code_version=kvpolicy.__version__,
        )

    def _compute(self, handle: ModelHandle, unit: WorkUnit, progress: tqdm, wait: bool) -> int | None:
        """Claim `unit` and write the results it still lacks (a concurrent sweep may have written some since the
        plan): how many this sweep wrote, or None when another process holds the unit and not `wait`."""
        with self.store.claim(self._unit_id(handle, unit), wait) as held:
            if not held:
                return None
            self.store.refresh()
            missing = self._missing(handle, unit)
            progress.update(unit.missing - missing)  # written by another sweep meanwhile
            if not missing:
                return 0
            ids = [unit.task.sample_id(s) for s in unit.samples]
            by_id = {c.id: c for c in unit.contenders}

            def is_missing(contender_id: str, label: str) -> bool:
                contender = by_id.get(contender_id)
                return contender is not None and any(
                    record_key(self.key_fields(handle, contender, label, unit, sid)) not in self.store for sid in ids)

            written = 0
            for outcome in self._outcomes(handle, unit, is_missing):
                if self.store.append(self.result(handle, unit, outcome)) is not None:
                    written += 1
                    progress.update(1)
            return written

    def _progress(self, handle: ModelHandle, total: int) -> tqdm:
        """The progress bar of one model's sweep: shown by rank 0 only, so that ranks never draw over each other."""
        if not self.ctx.main:
            return tqdm(total=total, disable=True)
        return bar(desc=f"sweep {handle.info.name}", total=total, unit="result")

    def _run_model(self, handle: ModelHandle) -> tuple[int, int]:
        """(results written, results already done) for one model. One pass, in this rank's order (`rank_order`),
        computes the units no concurrent sweep holds; then each held unit is waited for and only what it still
        lacks is computed (normally nothing): what another sweep wrote counts as already done."""
        units = self.plan(handle)
        self.ctx.check(ok=True)  # every rank has planned: they start on their own shares together
        planned = sum(len(u.samples) * sum(len(self._budget_labels(c, u.task)) for c in u.contenders) for u in units)
        ordered = [units[i] for i in rank_order(len(units), self.ctx.rank, self.ctx.world)]
        unfinished = [u for u in ordered if u.missing]
        with self._progress(handle, sum(u.missing for u in unfinished)) as progress:
            per_unit = [self._compute(handle, u, progress, wait=False) for u in unfinished]
            per_unit = [self._compute(handle, u, progress, wait=True) if n is None else n
                        for u, n in zip(unfinished, per_unit)]
        written = sum(per_unit)
        return written, planned - written

    def run(self) -> SweepRun:
        """This process's part of the sweep: what it wrote, and what it found done (by earlier runs or others)."""
        start = time.perf_counter()
        written = skipped = 0
        device = self.ctx.device if self.ctx.distributed else self.config.device  # torchrun on CUDA: a GPU per rank
        try:
            for name in self.config.models:
                try:
                    handle = load_model(name, device=device, dtype=self.config.dtype)
                except OSError as err:
                    raise KVPError(f"cannot load model '{name}': {err}") from None
                new, done = self._run_model(handle)
                written, skipped = written + new, skipped + done
        finally:
            self.store.close()
        return SweepRun(self.config.out, written, skipped, time.perf_counter() - start, list(dict.fromkeys(self.notes)),
                        [written], self.ctx.rank)


def _model_label(handle: ModelHandle) -> str:
    """The model as results and the report name it: its name, and its dtype when not float32 (so that the report
    never pools results of one model run in two dtypes)."""
    dtype = handle.dtype_name
    return handle.info.name if dtype == KEY_DEFAULTS["model_dtype"] else f"{handle.info.name} ({dtype})"


def run_sweep(config: SweepConfig) -> SweepRun:
    """Run (or resume) a sweep; returns what was written and what was already there. Under torchrun every rank
    calls it (joining the process group here) and gets the whole world's counts once every rank is done, so
    that rank 0 can read the complete store; a rank that failed raises its error, the others AnotherRankFailed."""
    ctx = init_distributed(resolve_device(config.device).type)  # a CUDA request without CUDA: one line
    try:
        try:
            done = Sweep(config, ctx).run()
        except (KVPError, OSError, KeyboardInterrupt) as err:
            if not isinstance(err, AnotherRankFailed):  # (that one was raised by a check every rank took part in)
                ctx.check(ok=False)  # so that no rank waits forever on this one: all stop at this check
            raise
        ctx.check(ok=True)  # after it, every rank's results are in the store
        per_rank = ctx.all_reduce([done.written if r == ctx.rank else 0 for r in range(ctx.world)], "sum")
    finally:
        shutdown_distributed(ctx)
    if ctx.main:
        for note in done.notes:
            print(f"note: {note}", file=sys.stderr)
    written = sum(per_rank)  # what the other ranks wrote this rank counted as already done
    return replace(done, written=written, skipped=done.skipped + done.written - written, per_rank=per_rank)

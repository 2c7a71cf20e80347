"""A task kind is one file and one row: the kind (a Task subclass) carries its samples, positions and runner, and its
catalog row makes it reachable by name everywhere, so that the sweep, `kvp sweep` and the report run it unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kvpolicy.compression.budget import Budget
from kvpolicy.errors import KVPError
from kvpolicy.evaluation import sweep
from kvpolicy.evaluation.lineup import FULL_CACHE, Contender, IsMissing
from kvpolicy.evaluation.names import QUERY_AWARE
from kvpolicy.evaluation.outcome import Outcome
from kvpolicy.evaluation.result import FULL
from kvpolicy.evaluation.store import read_results
from kvpolicy.evaluation.tasks import catalog, known_tasks, resolve_tasks, task_help
from kvpolicy.evaluation.tasks.base import Task
from kvpolicy.evaluation.tasks.catalog import TaskEntry
from kvpolicy.evaluation.tasks.traces import task_name


@dataclass(frozen=True)
class Sized:
    id: str
    length: int


@dataclass(frozen=True)
class KeptShareTask(Task):
    """A kind that runs no model: a result's value is the share of a sample's length its budget keeps."""

    def outcomes(self, handle, samples: list[Sized], protocol: str, contenders: list[Contender],
                 budgets: list[Budget], is_missing: IsMissing, every: int | None,
                 max_new_tokens: int) -> Iterator[Outcome]:
        for sample in samples:
            for contender in [FULL_CACHE, *contenders]:
                for budget in [None] if contender is FULL_CACHE else budgets:
                    label = FULL if budget is None else budget.label
                    if is_missing(contender.id, label):
                        kept = sample.length if budget is None else min(budget.kept(sample.length), sample.length)
                        yield Outcome(sample.id, contender, label, sample.length, kept, 0, 0, 0.0, 0.0,
                                      {"value": kept / sample.length})


def kept_share_task() -> KeptShareTask:
    return KeptShareTask(name="kept-share", family="kept share", data="synthetic lengths", metric="accuracy",
                         protocols=(QUERY_AWARE,), sized=True,
                         load=lambda handle, n, context, seed: [Sized(f"s{i}", context) for i in range(n)])


@pytest.fixture
def kept_share(monkeypatch):
    row = TaskEntry("kept-share", f"{__name__}:kept_share_task", "the share of a synthetic length a budget keeps")
    monkeypatch.setattr(catalog, "CATALOG", (*catalog.CATALOG, row))


def test_a_bad_row_is_refused():
    with pytest.raises(ValueError, match="'module:function'"):
        TaskEntry("x", "no_colon", "help")
    with pytest.raises(ValueError, match="either members or a free argument"):
        TaskEntry("x", "m:f", "help", members=("a",), argument="DIR")


def test_names_resolve_as_the_rows_say():
    needles = [f"needle:{kind}" for kind in ("chat", "code", "json", "csv", "conversation")]
    assert [t.name for t in resolve_tasks(["needles", "needle:chat", "ruler:niah_code"])] == [
        *needles, "ruler:niah_code"]  # each task once, in order; `also` members one at a time
    assert "ruler:niah_code" not in [t.name for t in resolve_tasks(["ruler"])]
    assert "traces:DIR" in known_tasks() and "traces:DIR: reward-level ranking cost" in task_help()
    for name in ("traces", "needle", "needles:chat", "ruler:", "boolq:x"):
        with pytest.raises(KVPError, match=f"unknown task '{name}'; known tasks: ruler, ruler:TASK"):
            resolve_tasks([name])


@pytest.mark.model
def test_one_row_adds_a_task_kind_everywhere(kept_share, smollm, tmp_path, monkeypatch, capsys):
    from kvpolicy.cli import main
    from kvpolicy.report.render import write_report

    assert [type(t) for t in resolve_tasks(["kept-share"])] == [KeptShareTask]
    assert "kept-share" in known_tasks()
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "kept-share: the share of a synthetic length a budget keeps" in " ".join(capsys.readouterr().out.split())
    # the sweep runs it (full-cache reference, token and ratio budgets, resume) with no change of its own
    monkeypatch.setattr(sweep, "load_model", lambda *a, **k: smollm)
    config = sweep.SweepConfig(out=str(tmp_path / "r.jsonl"), scorers=["knorm", "random"], budgets=["32", "0.75"],
                               tasks=["kept-share"], context_tokens=[128], n_samples=2)
    assert sweep.run_sweep(config).written == 2 * (1 + 2 * 2)
    assert sweep.run_sweep(config).written == 0
    values = {(r.scorer, r.budget, r.sample): r.value for r in read_results(config.out).records}
    assert values[("knorm", "b32", "s1")] == 0.25 and values[("random", "r0.75", "s0")] == 0.25
    assert values[("full", "full", "s0")] == 1.0
    # the report draws it in its own family
    report = write_report(config.out, tmp_path / "report")
    assert "kept share" in report.markdown.read_text()


def test_a_trace_set_cut_mid_prompt_is_another_task_than_the_whole_prompts_of_its_prompts():
    """Results are keyed by task and prompt: the mid-prompt traces of a test split hold its prompts too, so their
    results must not be taken for (or skipped as) those of the whole-prompt set of the same directory name."""
    whole = {"future": {"mode": "greedy", "max_tokens": 128}}
    mid = {"future": {"mode": "greedy", "max_tokens": 128, "cut_at": "mid-prompt"}}
    assert task_name("runs/a/traces/test", whole) == "traces:test"  # as results always named it
    assert task_name("runs/b/traces/test", mid) == "traces:test@mid-prompt"

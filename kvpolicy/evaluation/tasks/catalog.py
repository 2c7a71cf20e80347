"""The task catalog: one row per benchmark (or family of benchmarks), as plain values (no torch), so that `kvp sweep
--help` never imports the tasks. What `--task` accepts, its help, the errors that list the known tasks and
`resolve_tasks` all derive from it.

Adding a benchmark is its factory in this package and one row here; adding a task kind (a new way to run one) is
a `Task` subclass beside its runner and a row for its first benchmark (docs/ARCHITECTURE.md, "Where to add").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvpolicy.data.needles import NEEDLE_TASKS
from kvpolicy.data.ruler import EXTRA_TASKS, HUB_TASKS, RULER_TASKS
from kvpolicy.errors import KVPError
from kvpolicy.lazy import check_reference, import_reference

if TYPE_CHECKING:
    from kvpolicy.evaluation.tasks.base import Task


@dataclass(frozen=True)
class TaskEntry:
    """One benchmark, or a family of them.

    name: what `--task` takes (for a family: all its members); make: the factory of one task as "module:function",
    imported on first use: make(member) for a family's member or a free argument, make() for a single task, with
    the local file of its hub dataset (or None) as a last argument when `hub` names one; help: one line for
    `kvp sweep --help`; members: a family's tasks, each also reachable as `PREFIX:MEMBER`; also: members reachable
    only one at a time (never in the whole family); prefix: the name before ':' (default: name); argument: what a
    free argument after ':' stands for (`traces:DIR`), in place of members: the name alone is then no task;
    hub: the hub dataset (kvpolicy.data.hub) it reads, whose local copy `--hub-local NAME=FILE` gives."""

    name: str
    make: str
    help: str
    members: tuple[str, ...] = ()
    also: tuple[str, ...] = ()
    prefix: str = ""
    argument: str = ""
    hub: str = ""

    def __post_init__(self):
        check_reference(self.make, f"task '{self.name}': give its factory as 'module:function'")
        if self.argument and self.members:
            raise ValueError(f"task '{self.name}': a row takes either members or a free argument")

    @property
    def one(self) -> str:
        """The prefix of one member: `PREFIX:MEMBER`."""
        return self.prefix or self.name

    @property
    def usage(self) -> str:
        """How `--task` names it: 'ruler, ruler:TASK (TASK in a, b)', 'dialogue' or 'traces:DIR'."""
        if self.argument:
            return f"{self.one}:{self.argument}"
        if not self.members:
            return self.name
        return f"{self.name}, {self.one}:TASK (TASK in {', '.join((*self.members, *self.also))})"

    def build(self, argument: str | None, hub_local: dict[str, str]) -> Task:
        """One task: the member or free argument `argument` (None for a single task)."""
        args = () if argument is None else (argument,)
        return import_reference(self.make)(*args, *((hub_local.get(self.hub),) if self.hub else ()))

    def resolve(self, name: str, hub_local: dict[str, str]) -> list[Task] | None:
        """The tasks `--task name` means under this row, or None when the name is not this row's."""
        head, sep, arg = name.partition(":")
        if name == self.name and not self.argument:
            return [self.build(m, hub_local) for m in self.members] if self.members else [self.build(None, hub_local)]
        if sep and head == self.one and ((self.argument and arg) or arg in (*self.members, *self.also)):
            return [self.build(arg, hub_local)]
        return None


_TASKS = "kvpolicy.evaluation.tasks"
# in the order help texts and errors list them
CATALOG: tuple[TaskEntry, ...] = (
    TaskEntry("ruler", f"{_TASKS}.ruler:offline_task", "every RULER-style task over the essays (offline stand-in "
              "for RULER)", members=tuple(RULER_TASKS), also=tuple(EXTRA_TASKS)),
    TaskEntry("ruler-hub", f"{_TASKS}.ruler:hub_task", "RULER 4K from the hub (online)", members=HUB_TASKS,
              hub="ruler-4k"),
    TaskEntry("needles", f"{_TASKS}.needles:needle_task", "evaluation-only needle tasks (a phrasing and haystacks "
              "no trace uses)", members=tuple(NEEDLE_TASKS), prefix="needle"),
    TaskEntry("dialogue", f"{_TASKS}.dialogue:sharegpt_task", "ShareGPT dialogues, perplexity of the final "
              "assistant turn (offline stand-in for OASST2)"),
    TaskEntry("oasst2", f"{_TASKS}.dialogue:oasst2_task", "OASST2 dialogues from the hub (online)", hub="oasst2"),
    TaskEntry("longgen", f"{_TASKS}.longgen:longgen_task", "long texts streamed through a bounded cache, "
              "perplexity of every token (offline)", members=("essays", "dialogue")),
    TaskEntry("boolq", f"{_TASKS}.zero_shot:boolq_task", "BoolQ, zero-shot (online)", hub="boolq"),
    TaskEntry("arc_challenge", f"{_TASKS}.zero_shot:arc_challenge_task", "ARC-Challenge, zero-shot (online)",
              hub="arc_challenge"),
    TaskEntry("gov_report", f"{_TASKS}.zero_shot:gov_report_task", "LongBench GovReport, zero-shot (online)",
              hub="gov_report"),
    TaskEntry("passage_retrieval_en", f"{_TASKS}.zero_shot:passage_retrieval_task",
              "LongBench passage retrieval, zero-shot (online)", hub="passage_retrieval_en"),
    TaskEntry("traces", f"{_TASKS}.traces:trace_task", "reward-level ranking cost on held-out traces recorded by "
              "`kvp traces`", argument="DIR"),
)


def known_tasks() -> str:
    """Every name `--task` takes, as errors list them."""
    return ", ".join(e.usage for e in CATALOG)


def task_help() -> str:
    """`kvp sweep --task`'s help: each row's names and what it runs."""
    return "; ".join(f"{e.usage}: {e.help}" for e in CATALOG)


def resolve_tasks(names: list[str], hub_local: dict[str, str] | None = None) -> list[Task]:
    """The tasks that `names` name, each once, in order; hub_local maps a hub dataset
    name to a local file in its schema (offline tests, mirrors). An unknown name is a KVPError listing the known
    ones."""
    hub_local = hub_local or {}
    tasks: dict[str, Task] = {}
    for name in names:
        found = next((t for t in (e.resolve(name, hub_local) for e in CATALOG) if t is not None), None)
        if found is None:
            raise KVPError(f"unknown task '{name}'; known tasks: {known_tasks()}")
        tasks.update((t.name, t) for t in found)
    return list(tasks.values())

"""The benchmarks a sweep can run, by name.

    ruler                  every RULER-style task over the essays (offline); ruler:TASK for one
    ruler-hub              RULER 4K from the hub (online); ruler-hub:TASK for one
    needles                evaluation-only needle tasks (a phrasing and haystacks no trace uses); needle:TASK for one
    dialogue               ShareGPT dialogues, perplexity of the final assistant turn (offline stand-in for OASST2)
    oasst2                 OASST2 dialogues from the hub (online)
    longgen                long texts streamed through a bounded cache, perplexity of every token (offline);
                           longgen:essays (eval-split essays) or longgen:dialogue (long ShareGPT dialogues) for one
    boolq, arc_challenge, gov_report, passage_retrieval_en   zero-shot hub benchmarks (online)
    traces:DIR             reward-level ranking cost on held-out traces recorded by `kvp traces`
"""

from __future__ import annotations

from kvpolicy.data.needles import NEEDLE_TASKS
from kvpolicy.data.ruler import RULER_TASKS, TASKS
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.names import known_tasks
from kvpolicy.evaluation.tasks.base import (
    MULTI_TURN,
    PROMPT_ONCE,
    PROTOCOLS,
    QUERY_AWARE,
    QUESTION_AGNOSTIC,
    TRACES,
    DialogueTask,
    Prompt,
    QATask,
    Task,
    TraceTask,
)
from kvpolicy.evaluation.tasks.needles import needle_task
from kvpolicy.evaluation.tasks.dialogue import oasst2_task, sharegpt_task
from kvpolicy.evaluation.tasks.longgen import LONGGEN, StreamTask
from kvpolicy.evaluation.tasks.ruler import HUB_TASKS, hub_task, offline_task
from kvpolicy.evaluation.tasks.traces import trace_task
from kvpolicy.evaluation.tasks.zero_shot import zero_shot_tasks


def resolve_tasks(names: list[str], hub_local: dict[str, str] | None = None) -> list[Task]:
    """Tasks from names (see the module docstring); hub_local maps a hub dataset name to a local file in its
    schema (offline tests, mirrors). Unknown names raise a KVPError listing the known ones."""
    hub_local = hub_local or {}
    zero_shot = zero_shot_tasks(hub_local)
    tasks: dict[str, Task] = {}
    for name in names:
        head, _, arg = name.partition(":")
        if name == "ruler":
            found = [offline_task(t) for t in RULER_TASKS]
        elif head == "ruler" and arg in TASKS:
            found = [offline_task(arg)]
        elif name == "needles":
            found = [needle_task(t) for t in NEEDLE_TASKS]
        elif head == "needle" and arg in NEEDLE_TASKS:
            found = [needle_task(arg)]
        elif name == "ruler-hub":
            found = [hub_task(t, hub_local.get("ruler-4k")) for t in HUB_TASKS]
        elif head == "ruler-hub" and arg in HUB_TASKS:
            found = [hub_task(arg, hub_local.get("ruler-4k"))]
        elif name == "dialogue":
            found = [sharegpt_task()]
        elif name == "oasst2":
            found = [oasst2_task(hub_local.get("oasst2"))]
        elif name == "longgen":
            found = [make() for make in LONGGEN.values()]
        elif head == "longgen" and arg in LONGGEN:
            found = [LONGGEN[arg]()]
        elif name in zero_shot:
            found = [zero_shot[name]]
        elif head == "traces" and arg:
            found = [trace_task(arg)]
        else:
            raise KVPError(f"unknown task '{name}'; known tasks: {known_tasks()}")
        tasks.update((t.name, t) for t in found)
    return list(tasks.values())


__all__ = ["DialogueTask", "MULTI_TURN", "PROMPT_ONCE", "PROTOCOLS", "Prompt", "QATask", "QUERY_AWARE",
           "QUESTION_AGNOSTIC", "StreamTask", "TRACES", "Task", "TraceTask", "known_tasks", "resolve_tasks"]

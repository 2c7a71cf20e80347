"""The names `kvp sweep` offers (protocols, tasks, the default re-rank interval of a bounded
stream), as plain values (no torch), so its help never imports the tasks. `ZERO_SHOT_TASKS` lists
`tasks.zero_shot.zero_shot_tasks()`'s keys and `LONGGEN_TASKS` those of `tasks.longgen.LONGGEN` (tests keep them
equal)."""

from __future__ import annotations

from kvpolicy.compression.protocols import PROTOCOLS as COMPRESSION_PROTOCOLS
from kvpolicy.compression.protocols import QUERY_AWARE, QUESTION_AGNOSTIC  # noqa: F401 (re-exported)
from kvpolicy.data.needles import NEEDLE_TASKS
from kvpolicy.data.ruler import TASKS

MULTI_TURN, PROMPT_ONCE = "multi-turn", "prompt-once"
TRACES = "traces"
BOUNDED_STREAM = "bounded-stream"

PROTOCOLS = {  # compression's two (compression/protocols.py), then evaluation's own
    **COMPRESSION_PROTOCOLS,
    MULTI_TURN: "compress after every turn; the dialogue continues on the compressed cache",
    PROMPT_ONCE: "compress once after the whole dialogue prompt (the KVP paper)",
    TRACES: "rank the prompt tokens of held-out traces; cost of the evicted future attention",
    BOUNDED_STREAM: "feed a long text --every tokens at a time, cutting the cache back to the budget after each chunk",
}
LONGGEN_TASKS = ("essays", "dialogue")  # long texts streamed under BOUNDED_STREAM (tasks.longgen)
DEFAULT_EVERY = 64  # tokens fed between two cuts of a bounded stream (`kvp sweep --every`)
ZERO_SHOT_TASKS = ("boolq", "arc_challenge", "gov_report", "passage_retrieval_en")


def known_tasks() -> str:
    return (f"ruler, ruler:TASK (TASK in {', '.join(TASKS)}), ruler-hub, ruler-hub:TASK, needles, "
            f"needle:TASK (TASK in {', '.join(NEEDLE_TASKS)}), dialogue, oasst2, longgen, "
            f"longgen:TASK (TASK in {', '.join(LONGGEN_TASKS)}), "
            f"{', '.join(ZERO_SHOT_TASKS)}, traces:DIR")

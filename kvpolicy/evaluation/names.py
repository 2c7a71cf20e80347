"""The protocols `kvp sweep` offers and the default re-rank interval of a bounded stream, as plain values (no torch),
so its help never imports the tasks (whose names are in tasks/catalog.py)."""

from __future__ import annotations

from kvpolicy.compression.protocols import PROTOCOLS as COMPRESSION_PROTOCOLS
from kvpolicy.compression.protocols import QUERY_AWARE, QUESTION_AGNOSTIC  # noqa: F401 (re-exported)

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
DEFAULT_EVERY = 64  # tokens fed between two cuts of a bounded stream (`kvp sweep --every`)

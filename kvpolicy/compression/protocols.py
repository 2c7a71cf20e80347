"""The protocols: when a prompt's cache is cut relative to what the model reads. Each is one name (results files key
on these exact strings) with what it does; compression runs these two, and evaluation/names.py adds its own
(dialogue, traces, bounded streams) to the same table. Plain values (no torch), so `kvp --help` can list them."""

from kvpolicy.errors import KVPError

QUERY_AWARE = "query-aware"
QUESTION_AGNOSTIC = "question-agnostic"

PROTOCOLS = {
    QUERY_AWARE: "compress after context and question (the KVP paper)",
    QUESTION_AGNOSTIC: "compress the context, then read the question (kvpress)",
}


def check_protocol_name(protocol: str) -> None:
    """Refuse a protocol compression does not run, in one line naming those it does."""
    if protocol not in PROTOCOLS:
        raise KVPError(f"unknown protocol '{protocol}'; choose one of {', '.join(PROTOCOLS)}")

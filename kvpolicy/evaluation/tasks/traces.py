"""Reward-level benchmark: held-out traces (a `kvp traces` directory, e.g. its test split), every trace a sample."""

from __future__ import annotations

from pathlib import Path

from kvpolicy.evaluation.costs import TraceTask
from kvpolicy.evaluation.names import TRACES
from kvpolicy.traces.store import TraceReader


def describe(reader: TraceReader) -> str:
    """'held-out <source> traces (<split> split, n at ~T tokens)' from the manifest, substitutes named."""
    m = reader.manifest
    source = str(m.get("source", "?"))
    named = {"ruler": "RULER-style tasks over Paul Graham essays",
             "dialogue": "ShareGPT dialogues (stand-in for OASST2)",
             "essays": "plain continuation of Paul Graham essays",
             "mix": "a mix of RULER-style tasks, ShareGPT dialogues (stand-in for OASST2) and essay continuation"}
    ctx = m.get("context_tokens")
    size = f", ~{ctx} tokens" if ctx else ""
    cut = f", caches cut {_cut_at(m)}" if _cut_at(m) else ""
    return (f"held-out traces: {named.get(source, source)} ({m.get('split', '?')} split, {len(reader)} prompts{size}"
            f"{cut})")


def task_name(directory: str | Path, manifest: dict) -> str:
    """How results name the trace set in `directory`: 'traces:DIRNAME', with '@mid-prompt' for traces whose caches
    were cut mid-prompt (`kvp traces --cut-at mid-prompt`), which hold the same prompts as a whole-prompt set of
    theirs but other samples (a result is keyed by its task and prompt)."""
    cut = _cut_at(manifest)
    return f"traces:{Path(directory).name}" + (f"@{cut}" if cut else "")


def _cut_at(manifest: dict) -> str | None:
    """Where the set's caches were cut, when not at the end of the prompt (`FutureConfig.describe`)."""
    return manifest.get("future", {}).get("cut_at")


def trace_task(directory: str) -> TraceTask:
    reader = TraceReader(directory)
    return TraceTask(name=task_name(directory, reader.manifest), family="ranking cost on held-out traces",
                     data=describe(reader), metric="cost", protocols=(TRACES,), sized=False,
                     corpus=reader.manifest.get("source"), directory=str(directory))

"""Training prompts for traces: RULER-style tasks or ShareGPT dialogues, as chat-rendered text plus the reference
continuation (end-of-turn included). Prompt i of a (source, split, seed, context) is always the same prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterator, Sequence

from kvpolicy.data import dialogue, ruler
from kvpolicy.data.dialogue import render_continuation
from kvpolicy.errors import KVPError

SOURCES = ("ruler", "dialogue")
TRACE_SPLITS = ("train", "val", "test")  # "eval" prompts belong to the evaluation harness only
DESCRIPTIONS = {"ruler": ruler.SOURCE, "dialogue": dialogue.SOURCE}


@dataclass(frozen=True)
class TracePrompt:
    index: int
    id: str
    prompt: str
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)


def source_seeds(source: str, seed: int, tasks: Sequence[str] | None) -> dict[str, Any]:
    """What fixes the prompts of a run, for the manifest (sample i of the run has sample id i)."""
    if source == "ruler":
        return {"ruler_seed": seed, "tasks": list(tasks or ruler.RULER_TASKS),
                "rule": "sample i = task tasks[i % len(tasks)], sample_id i; rng = sha256(task|split|seed|id)"}
    return {"rule": "conversations in ShareGPT file order, split by sha256 of the base conversation id "
                    "(80/5/5/10 train/val/test/eval); sample i = the i-th dialogue of the split that fits",
            "min_fraction": dialogue.MIN_FRACTION, "min_user_turns": dialogue.MIN_USER_TURNS}


def trace_prompts(handle, source: str, split: str, n: int, context_tokens: int, seed: int = 0,
                  tasks: Sequence[str] | None = None, indices: Sequence[int] | None = None) -> Iterator[TracePrompt]:
    """Prompts `indices` (default 0..n-1, in increasing order) of the source's split."""
    if source not in SOURCES:
        raise KVPError(f"unknown trace source '{source}'; use one of: {', '.join(SOURCES)}")
    if split not in TRACE_SPLITS:
        raise KVPError(f"traces use the splits {', '.join(TRACE_SPLITS)}; '{split}' is not one of them")
    wanted = sorted(set(range(n) if indices is None else indices))
    if source == "ruler":
        tasks = tuple(tasks or ruler.RULER_TASKS)
        for i in wanted:
            s = ruler.make_sample(tasks[i % len(tasks)], handle, context_tokens, seed, i, split)
            reference = render_continuation(handle, list(s.messages), s.prompt, s.answer_prefix + s.reference)
            yield TracePrompt(i, s.id, s.prompt, reference, {"task": s.task, "sample_id": i, "seed": seed})
        return
    if not wanted:
        return
    found = 0
    for i, d in enumerate(dialogue.iter_dialogues(handle, split, context_tokens)):
        found = i + 1
        if i in wanted:
            yield TracePrompt(i, d.id, d.prompt, d.reference, {"n_user_turns": d.n_user_turns})
        if i >= wanted[-1]:
            return
    raise KVPError(f"the dialogue source holds only {found} {split} prompts of at most {context_tokens} tokens "
                   f"(ShareGPT, stand-in for OASST2), {n} were asked for; ask for fewer or change --context")

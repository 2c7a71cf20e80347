"""Training prompts for traces: RULER-style tasks, ShareGPT dialogues (chat-rendered, reference continuation up to
the end of turn; `long-dialogue` cuts them from whole conversations, for prompts longer than ShareGPT's ~2K-token
parts), plain essay continuation, plain continuation of Python source code, or `mix`, a fixed interleaving
of the first three at several lengths, so that a policy trained on it is not tuned to one generator (code is a
separate source that `kvp train` can read beside the mix). Prompt i of a (source, split, seed, context) is always
the same prompt."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterator, Sequence

from kvpolicy.data import dialogue, documents, ruler
from kvpolicy.data.dialogue import render_continuation
from kvpolicy.errors import KVPError

SOURCES = ("ruler", "dialogue", "long-dialogue", "essays", "code", "mix")
DIALOGUE_SOURCES = ("dialogue", "long-dialogue")
TRACE_SPLITS = ("train", "val", "test")  # "eval" prompts belong to the evaluation harness only
# mix: sample i is MIX_CYCLE[i % len(MIX_CYCLE)] = (source, context length as a multiple of --context); each source's
# own samples are numbered in order of appearance, so the mix holds distinct prompts of each source
MIX_CYCLE = (("ruler", 1.0), ("dialogue", 1.0), ("essays", 1.0), ("ruler", 0.5), ("essays", 1.0), ("dialogue", 1.0),
             ("ruler", 1.0), ("essays", 2.0), ("dialogue", 0.5), ("ruler", 2.0))
MIX_SOURCES = tuple(dict.fromkeys(source for source, _ in MIX_CYCLE))
ESSAYS, CODE = documents.CORPORA["essays"].source, documents.CORPORA["code"].source
DESCRIPTIONS = {"ruler": ruler.SOURCE, "dialogue": dialogue.SOURCE, "essays": ESSAYS, "code": CODE,
                "long-dialogue": f"{dialogue.SOURCE}, whole conversations (their parts joined)",
                "mix": f"a fixed mix of {ruler.SOURCE}; {dialogue.SOURCE}; {ESSAYS}, at 0.5x, 1x and 2x the context "
                       "length"}


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
                "rule": "sample i = task tasks[i % len(tasks)], sample_id i; rng = sha256(task|split|seed|id); essay "
                        "and code haystacks: the split's own essays and files (split as for --source essays, code)"}
    if source == "essays":
        return {"rule": "essays split by sha256 of their name (70/10/10/10 train/val/test/eval), joined in name order; "
                        "sample i = the window of --context tokens at token i * (context // 2)"}
    if source == "code":
        return {"rule": "standard library .py files (no tests, site-packages or IDLE) split by sha256 of their path "
                        "(70/10/10/10 train/val/test/eval), each encoded with its path as a first comment, in path "
                        "order; sample i = the window of --context tokens at token i * (context // 2)",
                "python": CODE}
    if source == "mix":
        return {"cycle": [list(c) for c in MIX_CYCLE], "rule": "sample i = cycle[i % len(cycle)]: that source's next "
                "sample at that multiple of --context", **{s: source_seeds(s, seed, tasks) for s in MIX_SOURCES}}
    order = ("whole conversations (ShareGPT's parts ID_0, ID_1, ... joined in order) in the file order of their "
             "first part" if source == "long-dialogue" else "conversations in ShareGPT file order")
    return {"rule": f"{order}, split by sha256 of the first part's first turn, whitespace collapsed and case folded "
                    "(80/5/5/10 train/val/test/eval; every part takes its conversation's split); sample i = the i-th "
                    "dialogue of the split that fits",
            "min_fraction": dialogue.MIN_FRACTION, "min_user_turns": dialogue.MIN_USER_TURNS,
            "min_answer_tokens": dialogue.MIN_ANSWER_TOKENS}


def corpora_of(source: str) -> tuple[str, ...]:
    """The corpora whose data a trace source's prompts come from: each of the mix's sources for the mix, dialogue
    for long-dialogue."""
    return MIX_SOURCES if source == "mix" else ("dialogue",) if source == "long-dialogue" else (source,)


def longest_context(source: str, context_tokens: int) -> int:
    """The longest prompt a run of `source` at --context `context_tokens` asks for (the mix goes to 2x)."""
    return int(context_tokens * max(scale for _, scale in MIX_CYCLE)) if source == "mix" else context_tokens


def mix_plan(n: int, context_tokens: int) -> list[tuple[str, int, int]]:
    """(source, that source's own sample index, context length) of samples 0..n-1 of the mix."""
    seen: dict[tuple[str, int], int] = {}
    plan = []
    for i in range(n):
        source, scale = MIX_CYCLE[i % len(MIX_CYCLE)]
        length = int(context_tokens * scale)
        index = seen.get((source, length), 0)
        seen[(source, length)] = index + 1
        plan.append((source, index, length))
    return plan


def trace_prompts(handle, source: str, split: str, n: int, context_tokens: int, seed: int = 0,
                  tasks: Sequence[str] | None = None, indices: Sequence[int] | None = None) -> Iterator[TracePrompt]:
    """Prompts `indices` (default 0..n-1, in increasing order) of the source's split."""
    if source not in SOURCES:
        raise KVPError(f"unknown trace source '{source}'; use one of: {', '.join(SOURCES)}")
    if split not in TRACE_SPLITS:
        raise KVPError(f"traces use the splits {', '.join(TRACE_SPLITS)}; '{split}' is not one of them")
    wanted = sorted(set(range(n) if indices is None else indices))
    if source == "mix":
        yield from _mix_prompts(handle, split, n, context_tokens, seed, tasks, wanted)
    elif source == "ruler":
        tasks = tuple(tasks or ruler.RULER_TASKS)
        for i in wanted:
            s = ruler.make_sample(tasks[i % len(tasks)], handle, context_tokens, seed, i, split)
            reference = render_continuation(handle, list(s.messages), s.prompt, s.answer_prefix + s.reference)
            yield TracePrompt(i, s.id, s.prompt, reference, {"task": s.task, "sample_id": i, "seed": seed})
    else:
        samples = (dialogue.iter_dialogues(handle, split, context_tokens, whole=source == "long-dialogue")
                   if source in DIALOGUE_SOURCES
                   else documents.iter_documents(handle, split, context_tokens, corpus=source))
        yield from _first_of(samples, wanted, source, split, n, context_tokens)


def _first_of(samples: Iterator, wanted: list[int], source: str, split: str, n: int,
              context_tokens: int) -> Iterator[TracePrompt]:
    """The `wanted` samples of an ordered stream of dialogues or documents."""
    if not wanted:
        return
    found = 0
    for i, d in enumerate(samples):
        found = i + 1
        if i in wanted:
            meta = {"n_user_turns": d.n_user_turns} if source in DIALOGUE_SOURCES else {}
            yield TracePrompt(i, d.id, d.prompt, d.reference, meta)
        if i >= wanted[-1]:
            return
    raise KVPError(f"the {source} source holds only {found} {split} prompts of {context_tokens} tokens "
                   f"({DESCRIPTIONS[source]}), {n} were asked for; ask for fewer or change --context")


def _mix_prompts(handle, split: str, n: int, context_tokens: int, seed: int, tasks: Sequence[str] | None,
                 wanted: list[int]) -> Iterator[TracePrompt]:
    """Sample i of the mix: its source's sample at its length (see MIX_CYCLE), with the source in its metadata.
    Each (source, length) stream is read once, for all the samples wanted of it."""
    plan = mix_plan(n, context_tokens)
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i in wanted:
        groups[plan[i][0], plan[i][2]].append(i)
    made: dict[int, TracePrompt] = {}
    for (source, length), members in groups.items():
        count = 1 + max(j for s, j, c in plan if (s, c) == (source, length))
        prompts = trace_prompts(handle, source, split, count, length, seed, tasks, [plan[i][1] for i in members])
        for i, prompt in zip(members, prompts):
            made[i] = TracePrompt(i, f"mix/{i}/{prompt.id}@{length}", prompt.prompt, prompt.reference,
                                  {**prompt.meta, "source": source, "context_tokens": length})
    for i in wanted:
        yield made[i]

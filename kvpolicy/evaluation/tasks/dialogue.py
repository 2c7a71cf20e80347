"""Dialogue perplexity benchmarks: perplexity of the final assistant turn of multi-turn conversations.

Offline: ShareGPT dialogues (the stand-in for the paper's OASST2), from the dialogue generator's "eval" split
(never a conversation of the training traces), cut at a turn boundary to the context length. Online: OASST2
threads from the hub.
"""

from __future__ import annotations

from dataclasses import replace

from kvpolicy.data.records import Conversation
from kvpolicy.evaluation.tasks.base import MULTI_TURN, PROMPT_ONCE, DialogueTask

FAMILY = "dialogue perplexity"
EVAL_SPLIT = "eval"


def ending_with_answer(conversation: Conversation) -> Conversation | None:
    """The conversation up to its last assistant turn (None when no user turn precedes one)."""
    turns = list(conversation.turns)
    while turns and turns[-1].role != "assistant":
        turns.pop()
    if len(turns) < 2 or not any(t.role == "user" for t in turns):
        return None
    return replace(conversation, turns=tuple(turns))


def sharegpt_task() -> DialogueTask:
    def load(handle, n: int, context_tokens: int, seed: int) -> list[Conversation]:
        from kvpolicy.data.dialogue import make_dialogues

        return make_dialogues(handle, context_tokens, n, split=EVAL_SPLIT, seed=seed)

    return DialogueTask(name="dialogue", family=FAMILY, data="ShareGPT (stand-in for OASST2)", metric="perplexity",
                        protocols=(MULTI_TURN, PROMPT_ONCE), sized=True, load=load)


def oasst2_task(local: str | None = None) -> DialogueTask:
    def load(handle, n: int, context_tokens: int, seed: int) -> list[Conversation]:
        from kvpolicy.data.hub import load_hub

        cut = [ending_with_answer(c) for c in load_hub("oasst2", local=local)]
        return [c for c in cut if c is not None][:n]

    return DialogueTask(name="oasst2", family=FAMILY, data="OASST2 (OpenAssistant/oasst2, validation)",
                        metric="perplexity", protocols=(MULTI_TURN, PROMPT_ONCE), sized=False, load=load)

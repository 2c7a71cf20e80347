"""Dialogue perplexity benchmarks: perplexity of the final assistant turn of multi-turn conversations.

Offline: ShareGPT dialogues (the stand-in for the paper's OASST2), from the dialogue generator's "eval" split
(never a conversation of the training traces: the split is fixed by a hash of the conversation's content, so a
conversation ShareGPT repeats under another id is in one split too), cut at a turn boundary to the context length;
the sample seed does not apply. Online: OASST2 threads from the hub.
"""

from __future__ import annotations

from dataclasses import replace

from kvpolicy.data.dialogue import DialogueSample, make_dialogues, render_continuation
from kvpolicy.data.records import Conversation
from kvpolicy.evaluation.names import MULTI_TURN, PROMPT_ONCE
from kvpolicy.evaluation.perplexity import DialogueTask

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


def as_sample(handle, conversation: Conversation) -> DialogueSample:
    """A conversation ending with an assistant turn as a dialogue sample: that turn is the reference to score."""
    messages = conversation.messages()[:-1]
    prompt = handle.chat(messages)
    reference = render_continuation(handle, messages, prompt, conversation.turns[-1].text)
    return DialogueSample(id=conversation.id, split="hub", messages=tuple(messages), prompt=prompt,
                          reference=reference, length=handle.encode(prompt).shape[1],
                          n_user_turns=sum(m["role"] == "user" for m in messages), source=conversation.source)


def sharegpt_task() -> DialogueTask:
    def load(handle, n: int, context_tokens: int, seed: int) -> list[DialogueSample]:
        return make_dialogues(handle, EVAL_SPLIT, n, context_tokens)

    return DialogueTask(name="dialogue", family=FAMILY, data="ShareGPT (stand-in for OASST2)", metric="perplexity",
                        protocols=(MULTI_TURN, PROMPT_ONCE), sized=True, corpus="dialogue", load=load)


def oasst2_task(local: str | None = None) -> DialogueTask:
    def load(handle, n: int, context_tokens: int, seed: int) -> list[DialogueSample]:
        from kvpolicy.data.hub import load_hub

        cut = [ending_with_answer(c) for c in load_hub("oasst2", local=local)]
        return [as_sample(handle, c) for c in cut if c is not None][:n]

    return DialogueTask(name="oasst2", family=FAMILY, data="OASST2 (OpenAssistant/oasst2, validation)",
                        metric="perplexity", protocols=(MULTI_TURN, PROMPT_ONCE), sized=False, load=load)

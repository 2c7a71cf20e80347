"""Multi-turn dialogue prompts from ShareGPT (our offline stand-in for OASST2), cut at a turn boundary.

A dialogue sample is a conversation prefix that ends with a user turn, as long as fits in `context_tokens` chat-
rendered tokens; the reference future is the assistant turn that follows, rendered as the chat template would
(end-of-turn token included). ShareGPT cuts a long conversation into parts of about 2K tokens ("ID_0", "ID_1", ...);
`joined_conversations` joins them again, for prompts and texts longer than one part.

Conversations go to a split by a hash of their content (kvpolicy.data.splits: 80% train, 5% val, 5% test, 10% eval),
not of their id: ShareGPT holds one conversation under several ids (shared twice, a reply regenerated, continued and
shared again), and all of them open with the same first turn, so they land in one split. All the parts of a
conversation share its split, and the assignment does not depend on how many samples are asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Iterator

from kvpolicy.data.records import Conversation, Turn
from kvpolicy.data.sharegpt import SOURCE, iter_conversations
from kvpolicy.data.splits import DIALOGUE_BUCKETS, check_split, split_of
from kvpolicy.errors import KVPError

MIN_FRACTION = 0.5  # a prompt takes at least this fraction of the target length
MIN_USER_TURNS = 2  # multi-turn dialogues only
# a reply of a few tokens ("OK", "Thanks!") makes a perplexity of noise: a sample's reference reply has at least this
# many tokens (end-of-turn included)
MIN_ANSWER_TOKENS = 16


@dataclass(frozen=True)
class DialogueSample:
    """messages: the prompt turns (last one a user turn); prompt: chat-rendered with the assistant header;
    reference: the next assistant turn as the template renders it, up to and including its end-of-turn token."""

    id: str
    split: str
    messages: tuple[dict, ...]
    prompt: str
    reference: str
    length: int
    n_user_turns: int
    source: str = SOURCE


def part_of(conversation_id: str) -> tuple[str, int]:
    """(ID, n) of a ShareGPT part "ID_n"; (ID, 0) of an id without a part suffix."""
    base, part = re.fullmatch(r"(.*?)(?:_(\d+))?", conversation_id).groups()
    return base, int(part or 0)


def content_key(conversation: Conversation) -> str:
    """What identifies a conversation's content: its first turn, whitespace collapsed and case folded. Every repeat
    of a conversation's whole text shares it, and so do a conversation with a regenerated reply and one continued and
    shared again."""
    return " ".join(conversation.turns[0].text.split()).casefold()


def labelled_parts(limit: int | None = None) -> Iterator[tuple[str, Conversation]]:
    """(split, part) for ShareGPT's parts in file order (the first `limit`). A conversation's split is fixed by a
    hash of the content key of its first part in the file; its later parts ("ID_1", ... follow "ID_0" in the file)
    take that split."""
    splits: dict[str, str] = {}
    for part in iter_conversations(limit=limit):
        base, _ = part_of(part.id)
        if base not in splits:
            splits[base] = split_of("dialogue", content_key(part), DIALOGUE_BUCKETS)
        yield splits[base], part


def parts_in_split(split: str, limit: int | None = None) -> Iterator[Conversation]:
    """ShareGPT's parts of `split` in file order (among the file's first `limit` parts)."""
    return (part for part_split, part in labelled_parts(limit) if part_split == split)


def joined_conversations(split: str, limit: int | None = None) -> Iterator[Conversation]:
    """ShareGPT conversations of `split` (among the file's first `limit` parts), each with its parts joined in part
    order, in the file order of their first part. Where the shipped file lacks a part, two turns of one role can meet:
    they are merged into one, so that chat templates that require alternating roles render the conversation."""
    parts: dict[str, dict[int, Conversation]] = {}
    for conversation in parts_in_split(split, limit):
        base, part = part_of(conversation.id)
        parts.setdefault(base, {})[part] = conversation
    for base, by_part in parts.items():
        turns: list[Turn] = []
        for turn in (t for _, c in sorted(by_part.items()) for t in c.turns):
            if turns and turns[-1].role == turn.role:
                turns[-1] = Turn(turn.role, f"{turns[-1].text}\n\n{turn.text}")
            else:
                turns.append(turn)
        yield Conversation(id=base, turns=tuple(turns), source=SOURCE)


def render_continuation(handle, messages: list[dict], prompt: str, assistant_text: str) -> str:
    """The text the chat template adds after `prompt` (messages rendered with the assistant header, maybe followed
    by an answer prefix) when the assistant turn is `assistant_text`: the continuation up to and including the
    end-of-turn marker."""
    full = handle.chat(list(messages) + [{"role": "assistant", "content": assistant_text}], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise KVPError("the chat template renders an assistant turn differently from its generation prompt; "
                       "reference continuations need a template where the prompt is a prefix of the full dialogue")
    continuation = full[len(prompt):]
    markers = [handle.tokenizer.convert_ids_to_tokens(i) for i in sorted(handle.eos_token_ids)]
    ends = [continuation.find(m) + len(m) for m in markers if m in continuation]
    return continuation[: min(ends)] if ends else continuation


def cut_dialogue(handle, conversation: Conversation, split: str, context_tokens: int, min_tokens: int,
                 min_user_turns: int, min_answer_tokens: int = MIN_ANSWER_TOKENS) -> DialogueSample | None:
    """The longest prefix ending with a user turn (and followed by an assistant turn) that fits in
    `context_tokens`, as a sample of `split` (the conversation's); None when that prefix is shorter than `min_tokens`
    or has too few user turns, or when the reply that follows it has fewer than `min_answer_tokens` tokens."""
    turns = conversation.turns
    first = next((t.role for t in turns if t.role != "system"), None)
    if first != "user":
        return None
    best = None
    for end in range(len(turns) - 1):
        if turns[end].role != "user" or turns[end + 1].role != "assistant":
            continue
        messages = [{"role": t.role, "content": t.text} for t in turns[: end + 1]]
        prompt = handle.chat(messages)
        length = handle.encode(prompt).shape[1]
        if length > context_tokens:
            break
        best = (end, messages, prompt, length)
    if best is None:
        return None
    end, messages, prompt, length = best
    n_user = sum(m["role"] == "user" for m in messages)
    if length < min_tokens or n_user < min_user_turns:
        return None
    reference = render_continuation(handle, messages, prompt, turns[end + 1].text)
    if handle.encode(reference).shape[1] < min_answer_tokens:
        return None
    return DialogueSample(
        id=f"sharegpt/{conversation.id}/{end + 1}", split=split, messages=tuple(messages), prompt=prompt,
        reference=reference, length=length, n_user_turns=n_user,
    )


def iter_dialogues(handle, split: str, context_tokens: int, min_fraction: float = MIN_FRACTION,
                   min_user_turns: int = MIN_USER_TURNS, scan_limit: int | None = None,
                   whole: bool = False) -> Iterator[DialogueSample]:
    """Dialogue samples of a split in file order: prompts of min_fraction·context_tokens to context_tokens tokens
    with at least `min_user_turns` user turns (multi-turn by default) and a reply of at least MIN_ANSWER_TOKENS
    tokens after them, cut from ShareGPT's parts as shipped, or with
    `whole`, from whole conversations (their parts joined again: prompts beyond one part's ~2K tokens)."""
    check_split(split)
    if not 0 <= min_fraction <= 1:
        raise KVPError(f"min_fraction must be in [0, 1], got {min_fraction}")
    min_tokens = int(min_fraction * context_tokens)
    conversations = joined_conversations(split, scan_limit) if whole else parts_in_split(split, scan_limit)
    for conversation in conversations:
        if conversation.n_user_turns < min_user_turns:
            continue
        sample = cut_dialogue(handle, conversation, split, context_tokens, min_tokens, min_user_turns)
        if sample is not None:
            yield sample


def make_dialogues(handle, split: str, n: int, context_tokens: int, **kwargs) -> list[DialogueSample]:
    """The first n dialogue samples of a split; KVPError when the corpus holds fewer."""
    samples = []
    for sample in iter_dialogues(handle, split, context_tokens, **kwargs):
        samples.append(sample)
        if len(samples) == n:
            return samples
    raise KVPError(f"ShareGPT holds only {len(samples)} {split} dialogues of {context_tokens} tokens or less that "
                   f"meet the length and turn limits, {n} were asked for; ask for fewer or change --context")

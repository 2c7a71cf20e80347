"""ShareGPT dialogue prompts (stand-in for OASST2): cut at a user turn, reference = next assistant turn; whole
conversations are ShareGPT's parts joined again."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import pytest

from kvpolicy.data.dialogue import (MIN_ANSWER_TOKENS, cut_dialogue, joined_conversations, labelled_parts,
                                    make_dialogues, part_of, render_continuation)
from kvpolicy.data.sharegpt import iter_conversations
from kvpolicy.data.splits import SPLITS
from kvpolicy.errors import KVPError


def _splits(limit: int | None = None) -> dict[str, str]:
    """base id -> split of the conversations among the file's first `limit` parts."""
    return {part_of(part.id)[0]: split for split, part in labelled_parts(limit)}


def test_split_assignment_is_fixed_proportioned_and_keeps_parts_together():
    splits, n_parts = defaultdict(set), Counter()
    for split, part in labelled_parts():
        base, _ = part_of(part.id)
        splits[base].add(split)
        n_parts[base] += 1
    assert sum(n > 1 for n in n_parts.values()) > 1000  # conversations cut in several parts...
    assert all(len(s) == 1 for s in splits.values())  # ...each part in its conversation's split
    counts = Counter(split for (split,) in splits.values())
    assert set(counts) == set(SPLITS)
    assert 0.76 < counts["train"] / len(splits) < 0.84 and 0.08 < counts["eval"] / len(splits) < 0.12
    # the first parts of the file split as the whole file does: how many are read changes no assignment
    assert list(labelled_parts(limit=500)) == list(itertools.islice(labelled_parts(), 500))
    assert [part_of(i) for i in ("abc_12", "a_1_2", "abc", "abc_")] == [("abc", 12), ("a_1", 2), ("abc", 0),
                                                                          ("abc_", 0)]


def _parts(limit: int) -> dict[str, list]:
    """The shipped parts of each conversation among the file's first `limit`, in part order."""
    parts = defaultdict(dict)
    for c in iter_conversations(limit=limit):
        base, part = part_of(c.id)
        parts[base][part] = c
    return {base: [by_part[k] for k in sorted(by_part)] for base, by_part in parts.items()}


def test_joined_conversations_put_the_parts_back_in_order():
    parts = _parts(1500)
    joined = {c.id: c for c in joined_conversations("val", limit=1500)}
    assert set(joined) == {base for base, split in _splits(1500).items() if split == "val"}
    several = [base for base in joined if len(parts[base]) > 1]
    assert several  # the file's first 1,500 parts hold val conversations cut in several parts
    for base in several:
        turns = joined[base].turns
        assert all(a.role != b.role for a, b in zip(turns, turns[1:]))  # roles alternate: same-role meetings merged
        shipped = [t.text for part in parts[base] for t in part.turns]
        assert "\n\n".join(t.text for t in turns) == "\n\n".join(shipped) and len(turns) <= len(shipped)


@pytest.mark.model
def test_whole_dialogues_reach_beyond_one_part(smollm):
    samples = make_dialogues(smollm, "train", 2, 4096, scan_limit=1500, whole=True)
    parts, splits = _parts(1500), _splits(1500)
    for s in samples:
        base = s.id.split("/")[1]
        assert 2048 <= s.length <= 4096 and s.messages[-1]["role"] == "user" and splits[base] == "train"
        longest_part = max(smollm.encode(smollm.chat(p.messages(), add_generation_prompt=False)).shape[1]
                           for p in parts[base])
        assert s.length > longest_part  # no single shipped part holds this prompt


@pytest.mark.model
def test_dialogues_are_cut_at_a_user_turn_within_the_budget(smollm):
    target = 1024
    samples = make_dialogues(smollm, "train", 4, target)
    conversations = {c.id: c for c in iter_conversations(limit=400)}
    assert len({s.id for s in samples}) == 4
    for s in samples:
        assert s.split == "train" and "OASST2" in s.source
        assert target // 2 <= s.length <= target and s.length == smollm.encode(s.prompt).shape[1]
        assert s.messages[-1]["role"] == "user" and s.n_user_turns >= 2
        assert s.prompt == smollm.chat(list(s.messages))
        conv_id, n_turns = s.id.split("/")[1], int(s.id.split("/")[2])
        turns = conversations[conv_id].turns
        assert [m["content"] for m in s.messages] == [t.text for t in turns[:n_turns]]
        nxt = turns[n_turns]
        assert nxt.role == "assistant" and s.reference == nxt.text + "<|im_end|>"
        assert smollm.encode(s.reference).shape[1] >= MIN_ANSWER_TOKENS  # a perplexity over a real reply
        # the longest such prefix: the next user turn would not fit
        later = [i for i in range(n_turns + 1, len(turns) - 1)
                 if turns[i].role == "user" and turns[i + 1].role == "assistant"]
        if later:
            longer = smollm.chat([{"role": t.role, "content": t.text} for t in turns[: later[0] + 1]])
            assert smollm.encode(longer).shape[1] > target


@pytest.mark.model
def test_splits_never_share_a_conversation(smollm):
    train = make_dialogues(smollm, "train", 5, 768)
    evaluation = make_dialogues(smollm, "eval", 2, 768)
    base = lambda s: s.id.split("/")[1].rsplit("_", 1)[0]  # noqa: E731
    assert not {base(s) for s in train} & {base(s) for s in evaluation}
    assert all(s.split == "eval" for s in evaluation)


@pytest.mark.model
def test_empty_source_is_a_clear_error(smollm):
    with pytest.raises(KVPError, match="holds only 0 train dialogues"):
        make_dialogues(smollm, "train", 1, 40, scan_limit=30)
    with pytest.raises(KVPError, match="unknown split"):
        make_dialogues(smollm, "dev", 1, 512)


@pytest.mark.model
def test_render_continuation_keeps_an_answer_prefix(smollm):
    messages = [{"role": "user", "content": "Which number?"}]
    prompt = smollm.chat(messages) + "The number is"
    assert render_continuation(smollm, messages, prompt, "The number is 7.") == " 7.<|im_end|>"


@pytest.mark.model
def test_a_prompt_followed_by_a_reply_of_a_few_tokens_is_no_sample(smollm):
    """The eval conversation DhelrJT_0 cut at 1K tokens is followed by a 3-token reply, whose perplexity (2,291 with
    the full cache) would swamp any mean: it is skipped."""
    conversation = next(c for c in iter_conversations() if c.id == "DhelrJT_0")
    short = cut_dialogue(smollm, conversation, "eval", 1024, 512, 2, min_answer_tokens=0)
    assert short is not None and smollm.encode(short.reference).shape[1] < MIN_ANSWER_TOKENS
    assert cut_dialogue(smollm, conversation, "eval", 1024, 512, 2) is None

"""ShareGPT dialogue prompts (stand-in for OASST2): cut at a user turn, reference = next assistant turn; whole
conversations are ShareGPT's parts joined again."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from kvpolicy.data.dialogue import (SPLITS, joined_conversations, make_dialogues, part_of, render_continuation,
                                    split_of)
from kvpolicy.data.sharegpt import iter_conversations
from kvpolicy.errors import KVPError


def test_split_assignment_is_fixed_disjoint_and_proportioned():
    ids = [f"conv{i}" for i in range(4000)]
    counts = Counter(split_of(i) for i in ids)
    assert set(counts) == set(SPLITS)
    assert 0.76 < counts["train"] / 4000 < 0.84 and 0.08 < counts["eval"] / 4000 < 0.12
    assert [split_of(i) for i in ids[:50]] == [split_of(i) for i in ids[:50]]
    assert {split_of(f"abc{i}_0") for i in range(50)} != {"train"}  # ids do spread
    assert all(split_of(f"x{i}_0") == split_of(f"x{i}_3") for i in range(200))  # parts of one conversation
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
    assert set(joined) == {base for base in parts if split_of(base) == "val"}
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
    parts = _parts(1500)
    for s in samples:
        base = s.id.split("/")[1]
        assert 2048 <= s.length <= 4096 and s.messages[-1]["role"] == "user" and split_of(base) == "train"
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

"""Disjoint splits for every source, so that no training prompt reads the text of an evaluation prompt: essays and
source files go to a split by file, ShareGPT conversations by content (repeats under other ids land together)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest
import torch

from kvpolicy.data.code import code_lines, source_paths, source_split, split_paths
from kvpolicy.data.dialogue import content_key, labelled_parts, part_of
from kvpolicy.data.essays import essay_split, haystack_text, load_essays
from kvpolicy.data.ruler import make_sample
from kvpolicy.data.splits import DIALOGUE_BUCKETS, SPLITS, check_split, split_of
from kvpolicy.errors import KVPError

LONGEST_CONTEXT = 8192  # the longest contexts the presets ask of RULER-style prompts (study: 4K and 8K)
# a handle that counts words as tokens: RULER's sizing needs only .chat and .encode, and no model
WORDS = SimpleNamespace(chat=lambda messages: messages[-1]["content"],
                        encode=lambda text: torch.zeros(1, len(text.split())))
# one ShareGPT conversation under several ids, which the old split by id put in eval and in another split
REPEATED = (("6IfCLvz", "cokMI3s"), ("EbEB1G6", "uhw4GfJ"), ("A4GMAA9", "Q5nm7zE"), ("MvnANED", "BA2CLQy", "gMxa77o"))


def _pairwise_disjoint(groups: dict[str, set]) -> bool:
    return sum(map(len, groups.values())) == len(set().union(*groups.values()))


def _haystack_sentences(context: str) -> list[str]:
    """The essay sentences of a RULER essay-haystack context (the needles left out), long enough to be one essay's."""
    haystack = context.split("\n")[1]
    return [s for s in re.split(r"(?<=[.!?]) ", haystack) if len(s) >= 40 and "special magic" not in s]


def test_one_rule_assigns_every_corpus_in_proportion():
    assert essay_split("worked") == split_of("essay", "worked") and source_split("a.py") == split_of("code", "a.py")
    counts = Counter(split_of("any", f"unit{i}") for i in range(4000))
    assert [round(counts[s] / 4000, 1) for s in SPLITS] == [0.7, 0.1, 0.1, 0.1]
    counts = Counter(split_of("any", f"unit{i}", DIALOGUE_BUCKETS) for i in range(4000))
    assert 0.76 < counts["train"] / 4000 < 0.84 and 0.08 < counts["eval"] / 4000 < 0.12
    with pytest.raises(KVPError, match="unknown split 'dev'; use one of: train, val, test, eval"):
        check_split("dev")


def test_essays_split_by_file_with_room_for_the_longest_context():
    names = {split: {e.name for e in load_essays() if essay_split(e.name) == split} for split in SPLITS}
    assert _pairwise_disjoint(names) and sum(map(len, names.values())) == len(load_essays())
    # the assignment plain-continuation traces always had
    assert names["eval"] == {"wisdom", "worked"} and names["test"] == {"corpdev", "popular"}
    assert all(len(haystack_text(split).split(" ")) >= LONGEST_CONTEXT for split in SPLITS)


@pytest.mark.parametrize("split", SPLITS)
def test_a_ruler_essay_haystack_reads_its_own_splits_essays_only(split):
    others = [haystack_text(other) for other in SPLITS if other != split]
    for sample_id in range(3):
        s = make_sample("niah_single_2", WORDS, 2048, seed=0, sample_id=sample_id, split=split)
        sentences = _haystack_sentences(s.context)
        assert len(sentences) > 30 and all(x in haystack_text(split) for x in sentences)
        assert not any(x in text for text in others for x in sentences)


def test_an_essay_haystack_longer_than_the_splits_essays_is_refused():
    words = len(haystack_text("test").split(" "))
    with pytest.raises(KVPError, match=f"the essays of the test split hold {words} words.*at most {words} tokens"):
        make_sample("niah_single_2", WORDS, words + 1, seed=0, sample_id=0, split="test")
    make_sample("niah_single_1", WORDS, words + 1, seed=0, sample_id=0, split="test")  # a noise haystack has room


def test_code_files_split_by_path_and_a_code_haystack_reads_its_own_splits_files_only():
    paths = {split: set(split_paths(split)) for split in SPLITS}
    assert _pairwise_disjoint(paths) and set().union(*paths.values()) == set(source_paths())
    for split in SPLITS:
        assert len(code_lines(split)) > LONGEST_CONTEXT  # every line is a token at least: a haystack never repeats
        headers = [h for i in range(3)
                   for h in re.findall(r"^# (\S+)$", make_sample("niah_code", WORDS, 4096, 0, i, split).context, re.M)
                   if h in source_paths()]  # each file's lines start with its path as a comment
        assert headers and {source_split(h) for h in headers} == {split}


@pytest.fixture(scope="module")
def sharegpt() -> dict[str, tuple[set[str], str, str]]:
    """base id -> (the splits of its parts, the content key of its first part, its whole text whitespace collapsed)."""
    splits, keys, texts = defaultdict(set), {}, defaultdict(list)
    for split, part in labelled_parts():
        base, _ = part_of(part.id)
        splits[base].add(split)
        keys.setdefault(base, content_key(part))
        texts[base] += [t.text for t in part.turns]
    return {base: (splits[base], keys[base], " ".join(" ".join(texts[base]).split())) for base in splits}


def test_sharegpt_splits_share_no_content_and_keep_parts_together(sharegpt):
    assert all(len(splits) == 1 for splits, _, _ in sharegpt.values())  # every part in its conversation's split
    by_key = defaultdict(set)
    for (split,), key, _ in sharegpt.values():
        by_key[key].add(split)
    assert all(len(splits) == 1 for splits in by_key.values())
    assert sum(split == {"eval"} for split, _, _ in sharegpt.values()) > 900


def test_sharegpt_repeats_land_in_one_split(sharegpt):
    by_text = defaultdict(list)
    for split, _, text in sharegpt.values():
        by_text[text].append(split)
    repeated = [splits for splits in by_text.values() if len(splits) > 1]
    assert len(repeated) > 100 and all(len(set().union(*splits)) == 1 for splits in repeated)
    for bases in REPEATED:
        assert len({sharegpt[base][2] for base in bases}) == 1  # one conversation
        assert len(set().union(*(sharegpt[base][0] for base in bases))) == 1

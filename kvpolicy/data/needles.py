"""Needle tasks written for evaluation only: a needle phrasing and a haystack that no training trace uses.

The trace sources that hold needles (`kvp traces --source ruler`, and the mix) draw them from one phrasing ("One of
the special magic numbers for KEY is: N.") in essays, noise or distractor needles. A policy that learned what
those needles look like, rather than what the future attends to, would do well on them and fail here:

- needle:chat: the haystack is the assistant replies of ShareGPT conversations of the dialogue "eval" split (the
  dialogue traces use train/val/test only); the needle is a personal detail in conversational prose, "By the way,
  NAME's locker combination is 17-42-08.", asked as "What is NAME's locker combination?".
- needle:code: the haystack is Python source code, the `torch.nn` sources of the pinned torch, which no trace reads
  (the `code` trace source and the `ruler:niah_code` needles read the Python standard library; the mix holds no
  code); the needle is a module constant, `DEPLOY_TOKEN_WORD = "amber-falcon-42"  # ...`, asked as "What is the
  value of DEPLOY_TOKEN_WORD?".
- needle:json: the haystack is a warehouse inventory, a JSON array of synthetic records (kvpolicy.data.tables: a
  seeded generator and word lists, no corpus text); the needle is one more record, asked as "In which bin is the
  item with SKU KT-3041 stored?".
- needle:csv: the haystack is a shipment log as CSV rows under a header (synthetic, like needle:json); the needle is
  one more row, asked as "What is the tracking code of shipment SH204817?".
- needle:conversation: the haystack is a transcript ("User: ...", "Assistant: ...") of long whole ShareGPT
  conversations of the dialogue eval split (the split is by content, and none shares a long line with a
  train/val/test conversation either: a user can paste one text into two conversations that open differently),
  continued by the next ones where one is shorter than the context; the needle is a fact the user states at the
  start, "Before we start, a note for later: my booking reference is KTR-5821.", asked at the end as "What booking
  reference did the user give at the start of the conversation?".

A sample is a pure function of (task, seed, sample_id) (for needle:code, of the torch version too), sized to the
context like the RULER-style tasks and scored with RULER's string_match_all.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvpolicy.data.dialogue import joined_conversations, labelled_parts, parts_in_split
from kvpolicy.data.records import Conversation, QASample
from kvpolicy.data.ruler import Built, fit_to_context, insert_at_depths, sample_from
from kvpolicy.data.tables import INVENTORY, SHIPMENTS, Record, draw_code
from kvpolicy.errors import KVPError

SPLIT = "eval"  # of the dialogue corpus, for the chat and conversation haystacks; no trace is recorded from it
CHAT_CONVERSATIONS = 400  # eval-split conversations whose replies form the chat haystack
MIN_CONVERSATION_TURNS = 6  # a long conversation, for the conversation haystack: three exchanges at least
MAX_LINE_CHARS = 500  # conversations with a longer line are left out: sizing to the context then stays close
SHARED_LINE_CHARS = 60  # a line this long in an eval and a train/val/test conversation marks a text pasted in both
USER, ASSISTANT = "User: ", "Assistant: "  # transcript labels of a turn's first line
FIRST_NAMES = ("Amara", "Bastian", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiroshi", "Ingrid", "Jonas",
               "Kalani", "Leona", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosalind", "Soren", "Talia")
LAST_NAMES = ("Abernathy", "Brennan", "Castellano", "Dunmore", "Eriksen", "Fairweather", "Galloway", "Haldane",
              "Iwasaki", "Jovanovic", "Kowalczyk", "Lindqvist", "Marchetti", "Nakamura", "Okonkwo", "Pemberton")
CODE_WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "falcon", "glacier", "harbor", "indigo", "juniper",
              "kestrel", "lantern", "meadow", "nimbus", "onyx", "pylon", "quartz", "raven", "sierra", "tundra")


@dataclass(frozen=True)
class NeedleTask:
    """An evaluation-only needle task: its haystack's name (as outputs state it) and its builder."""

    name: str
    data: str
    builder: Callable[[random.Random], Callable[[int], Built]]
    max_new_tokens: int = 32


def _rng(task: str, seed: int, sample_id: int) -> random.Random:
    digest = hashlib.sha256(f"needle|{task}|{seed}|{sample_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@functools.lru_cache(maxsize=1)
def chat_units() -> tuple[str, ...]:
    """Lines of the assistant replies of the first CHAT_CONVERSATIONS eval-split ShareGPT conversations."""
    return tuple(line.strip() for conversation in itertools.islice(parts_in_split(SPLIT), CHAT_CONVERSATIONS)
                 for t in conversation.turns if t.role == "assistant" for line in t.text.splitlines() if line.strip())


@functools.lru_cache(maxsize=1)
def code_units() -> tuple[str, ...]:
    """Non-empty lines of the torch.nn Python sources, files in sorted order (found without importing torch)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise KVPError("needle:code reads the torch package's sources, and torch is not installed")
    root = Path(spec.submodule_search_locations[0]) / "nn"
    return tuple(line.rstrip() for path in sorted(root.rglob("*.py"))
                 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _long_lines(conversation: Conversation) -> Iterator[str]:
    return (line for t in conversation.turns for line in map(str.rstrip, t.text.splitlines())
            if len(line) >= SHARED_LINE_CHARS)


@functools.lru_cache(maxsize=1)
def long_conversations() -> tuple[Conversation, ...]:
    """The long whole (parts joined) eval-split ShareGPT conversations: opened by the user, user and assistant turns
    only, at least MIN_CONVERSATION_TURNS turns, no line longer than MAX_LINE_CHARS, and no line of SHARED_LINE_CHARS
    or more that a train/val/test conversation also holds (the content split keeps repeats of a conversation
    together, not a text pasted into conversations that open differently)."""
    elsewhere = {hash(line) for split, c in labelled_parts() if split != SPLIT for line in _long_lines(c)}
    return tuple(c for c in joined_conversations(SPLIT)
                 if len(c.turns) >= MIN_CONVERSATION_TURNS and c.turns[0].role == "user"
                 and all(t.role in ("user", "assistant") for t in c.turns)
                 and max(len(line) for t in c.turns for line in t.text.splitlines()) <= MAX_LINE_CHARS
                 and elsewhere.isdisjoint(map(hash, _long_lines(c))))


@functools.lru_cache(maxsize=1)
def conversation_units() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The non-empty transcript lines of long_conversations() one after another, each turn's first line labelled
    USER or ASSISTANT, and the index of each conversation's first line."""
    units: list[str] = []
    starts: list[int] = []
    for conversation in long_conversations():
        starts.append(len(units))
        for turn in conversation.turns:
            first, *rest = (line.rstrip() for line in turn.text.splitlines() if line.strip())
            units += [(USER if turn.role == "user" else ASSISTANT) + first, *rest]
    return tuple(units), tuple(starts)


def _window(units: tuple[str, ...], start: int, size: int) -> list[str]:
    """`size` consecutive units from `start`, wrapping around the pool."""
    return [units[(start + i) % len(units)] for i in range(size)]


def _chat(rng: random.Random) -> Callable[[int], Built]:
    units = chat_units()
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    combination = "-".join(f"{rng.randint(0, 99):02d}" for _ in range(3))
    needle = f"By the way, {name}'s locker combination is {combination}."
    start, depth = rng.randrange(len(units)), rng.random()

    def build(size: int) -> Built:
        notes = "\n".join(insert_at_depths(_window(units, start, size), [needle], [depth]))
        context = f"Here are notes collected from several conversations with an assistant.\n\n{notes}\n\n"
        return (context, f"What is {name}'s locker combination?", f"{name}'s locker combination is",
                [combination])

    return build


def _code(rng: random.Random) -> Callable[[int], Built]:
    units = code_units()
    constant = f"DEPLOY_TOKEN_{rng.choice(CODE_WORDS).upper()}_{rng.choice(CODE_WORDS).upper()}"
    token = f"{rng.choice(CODE_WORDS)}-{rng.choice(CODE_WORDS)}-{rng.randint(10, 99)}"
    needle = f'{constant} = "{token}"  # used by the release job'
    start, depth = rng.randrange(len(units)), rng.random()

    def build(size: int) -> Built:
        source = "\n".join(insert_at_depths(_window(units, start, size), [needle], [depth]))
        context = f"Read this Python code.\n\n```python\n{source}\n```\n\n"
        return context, f"What is the value of {constant} in the code above?", f'The value of {constant} is "', [token]

    return build


def _json(rng: random.Random) -> Callable[[int], Built]:
    needle, salt, depth = INVENTORY.draw(rng), rng.getrandbits(64), rng.random()
    sku = needle[INVENTORY.key]

    def build(size: int) -> Built:
        records = ",\n".join(INVENTORY.rows(needle, salt, size, depth, json.dumps))
        context = ("Here is an export of a warehouse inventory: a JSON array, one record per line.\n\n"
                   f"```json\n[\n{records}\n]\n```\n\n")
        return (context, f"In which bin is the item with SKU {sku} stored?",
                f"The item with SKU {sku} is stored in bin", [str(needle[INVENTORY.asked])])

    return build


def _csv_row(record: Record) -> str:
    return ",".join(str(value) for value in record.values())


def _csv(rng: random.Random) -> Callable[[int], Built]:
    needle, salt, depth = SHIPMENTS.draw(rng), rng.getrandbits(64), rng.random()
    shipment, header = needle[SHIPMENTS.key], ",".join(needle)

    def build(size: int) -> Built:
        rows = "\n".join(SHIPMENTS.rows(needle, salt, size, depth, _csv_row))
        context = f"Here is a shipment log exported as CSV.\n\n```csv\n{header}\n{rows}\n```\n\n"
        return (context, f"What is the tracking code of shipment {shipment}?",
                f"The tracking code of shipment {shipment} is", [str(needle[SHIPMENTS.asked])])

    return build


def _conversation(rng: random.Random) -> Callable[[int], Built]:
    units, starts = conversation_units()
    reference = draw_code(rng, "LLL-DDDD")
    needle = f"Before we start, a note for later: my booking reference is {reference}."
    start = rng.choice(starts)

    def build(size: int) -> Built:
        first, *rest = _window(units, start, size) or [USER]  # the needle opens the user's first turn
        transcript = "\n".join([USER + needle, first.removeprefix(USER), *rest])
        context = f"Here is the transcript of a long conversation between a user and an assistant.\n\n{transcript}\n\n"
        return (context, "What booking reference did the user give at the start of the conversation?",
                "The booking reference the user gave is", [reference])

    return build


NEEDLE_TASKS: dict[str, NeedleTask] = {
    t.name: t
    for t in (
        NeedleTask("chat", "ShareGPT assistant replies of the dialogue eval split (evaluation-only needle)", _chat),
        NeedleTask("code", "torch.nn Python sources (evaluation-only needle)", _code),
        NeedleTask("json", "synthetic warehouse inventory records as a JSON array (evaluation-only needle)", _json),
        NeedleTask("csv", "synthetic shipment log as CSV rows (evaluation-only needle)", _csv),
        NeedleTask("conversation", "long whole ShareGPT conversations of the dialogue eval split as a transcript "
                   "(evaluation-only needle)", _conversation),
    )
}


def make_needle_sample(task: str, handle, context_tokens: int, seed: int, sample_id: int) -> QASample:
    """The evaluation-only needle sample (task, seed, sample_id) rendered for `handle` in at most `context_tokens`
    tokens (chat template and answer prefix included)."""
    if task not in NEEDLE_TASKS:
        raise KVPError(f"unknown evaluation-only needle task '{task}'; known: {', '.join(NEEDLE_TASKS)}")
    spec = NEEDLE_TASKS[task]
    built, _ = fit_to_context(spec.builder(_rng(task, seed, sample_id)), handle, context_tokens, f"needle:{task}")
    return sample_from(built, handle, id=f"needle/{task}/s{seed}/{sample_id}", task=f"needle:{task}",
                       source=spec.data, split=SPLIT, seed=seed, sample_id=sample_id, metric="all",
                       max_new_tokens=spec.max_new_tokens)

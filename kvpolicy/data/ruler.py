"""RULER-style synthetic long-context tasks, sized in the model's own tokens, and RULER's string-match metrics.

Tasks (after RULER, Hsieh et al. 2024, https://arxiv.org/abs/2404.06654, with its templates): needle in a haystack
with one needle (noise / essay haystack, number / UUID values), several keys, several values and several queries;
variable tracking; common-words and frequent-words extraction. The essay haystack is the Paul Graham essays.

A sample is a pure function of (task, split, seed, sample_id): its random draws come from a generator seeded with
a hash of those four, so the training splits (train/val/test) and the evaluation split ("eval") never share a
prompt. Nor do they share haystack text: the essay haystack of a split is that split's essays only, the code
haystack that split's source files only (split by file, kvpolicy.data.splits), so no training prompt reads the text
of an evaluation prompt. Keys and word lists come from one vocabulary for every split: words, not text. The filler
is sized by bisection so that the chat-rendered prompt, answer prefix included, has at most `context_tokens` tokens
and comes within a few tokens of it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kvpolicy.data.code import code_lines
from kvpolicy.data.essays import haystack_text
from kvpolicy.data.records import QASample
from kvpolicy.data.splits import check_split
from kvpolicy.errors import KVPError

TASK_KINDS = ("niah", "vt", "cwe", "fwe")
HAYSTACKS = ("essay", "noise", "needle", "code")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SOURCE = "RULER-style synthetic tasks (kvpolicy generator, Paul Graham essays haystack)"


@dataclass(frozen=True)
class TaskSpec:
    """One RULER task. For needle tasks: `haystack` essay | noise | needle (distractor needles) | code (lines of the
    Python standard library's files, needles as comments; like the essays, each split reads its own files only), key
    and value types, and how many keys / values per key / queried keys."""

    name: str
    kind: str
    max_new_tokens: int
    metric: str = "all"
    haystack: str = "essay"
    key_type: str = "words"
    value_type: str = "numbers"
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.metric not in ("all", "part"):
            raise ValueError(f"metric must be 'all' or 'part', got {self.metric!r}")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")
        if not 1 <= self.n_queries <= self.n_keys:
            raise ValueError("need 1 <= n_queries <= n_keys")


RULER_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("niah_single_1", "niah", 128, haystack="noise"),
        TaskSpec("niah_single_2", "niah", 128),
        TaskSpec("niah_single_3", "niah", 128, value_type="uuids"),
        TaskSpec("niah_multikey_1", "niah", 128, n_keys=4),
        TaskSpec("niah_multikey_2", "niah", 128, haystack="needle"),
        TaskSpec("niah_multikey_3", "niah", 128, haystack="needle", key_type="uuids", value_type="uuids"),
        TaskSpec("niah_multivalue", "niah", 128, n_values=4),
        TaskSpec("niah_multiquery", "niah", 128, n_keys=4, n_queries=4),
        TaskSpec("vt", "vt", 30, haystack="noise"),
        TaskSpec("cwe", "cwe", 120),
        TaskSpec("fwe", "fwe", 50),
    )
}
# beyond RULER's own tasks (never in the default task cycle): needles in source code, for a code model's traces
EXTRA_TASKS: dict[str, TaskSpec] = {"niah_code": TaskSpec("niah_code", "niah", 128, haystack="code")}
TASKS = RULER_TASKS | EXTRA_TASKS
# the tasks of RULER's own generator as the hub set simonjegou/ruler holds them (RULER's QA tasks among them)
HUB_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
             "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")


@dataclass(frozen=True)
class RulerSample(QASample):
    """A rendered RULER prompt. `prompt` = chat template over the user turn (context + question) followed by the
    answer prefix; `prompt_context` is its prefix that ends with the context (for question-agnostic compression:
    prompt == prompt_context + prompt_question). `reference` is the gold continuation after the answer prefix."""

    split: str = ""
    seed: int = 0
    sample_id: int = 0
    metric: str = "all"
    max_new_tokens: int = 128
    messages: tuple[dict, ...] = field(default=())
    prompt: str = ""
    prompt_context: str = ""
    prompt_question: str = ""
    length: int = 0
    reference: str = ""


# ---------------------------------------------------------------- metrics (RULER's, per sample, in [0, 1])
def string_match_all(prediction: str, answers: list[str] | tuple[str, ...]) -> float:
    """Fraction of the reference answers found (case-insensitive) in the prediction."""
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str] | tuple[str, ...]) -> float:
    """1 if any reference answer occurs (case-insensitive) in the prediction, else 0."""
    text = prediction.lower()
    return float(any(a.lower() in text for a in answers))


def score_prediction(sample: RulerSample, prediction: str) -> float:
    """The task's own RULER metric for one prediction."""
    metric = string_match_all if sample.metric == "all" else string_match_part
    return metric(prediction, sample.answers)


# ---------------------------------------------------------------- shared text material
@functools.cache
def _essay_words(split: str) -> tuple[list[str], list[int]]:
    """The split's essays as words, and the indices of words that start a sentence."""
    words = haystack_text(split).split(" ")
    starts = [0] + [i for i in range(1, len(words)) if words[i - 1][-1:] in ".!?"]
    return words, starts


@functools.lru_cache(maxsize=1)
def _vocabulary() -> list[str]:
    """Distinct plain lowercase words (4-9 letters) of all essays, sorted: keys and word lists are drawn from it. One
    vocabulary serves every split: a key such as "river-engine" or a list of words carries no essay's text."""
    return sorted(set(re.findall(r"\b[a-z]{4,9}\b", haystack_text())))


def _rng(task: str, split: str, seed: int, sample_id: int) -> random.Random:
    digest = hashlib.sha256(f"ruler|{task}|{split}|{seed}|{sample_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _key(rng: random.Random, kind: str) -> str:
    return _uuid(rng) if kind == "uuids" else "-".join(rng.sample(_vocabulary(), 2))


def _value(rng: random.Random, kind: str) -> str:
    return _uuid(rng) if kind == "uuids" else str(rng.randint(1_000_000, 9_999_999))


def _distinct(draw: Callable[[], str], n: int) -> list[str]:
    """n distinct draws, in draw order."""
    out: dict[str, None] = {}
    while len(out) < n:
        out.setdefault(draw())
    return list(out)


def insert_at_depths(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """Insert items (in order) into a list of text units at fractional depths (sorted)."""
    out = list(units)
    for offset, (item, depth) in enumerate(zip(items, depths)):
        out.insert(round(depth * len(units)) + offset, item)
    return out


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?]) ", text)


# ---------------------------------------------------------------- task builders
# BUILDERS[kind](spec, rng, context_tokens, split) draws a sample's content and returns build(size): its text with
# `size` filler units (sentences, noise lines, distractor needles, code lines, list words), which make_sample sizes
# to the context
Built = tuple[str, str, str, list[str]]  # context, question, answer prefix, answers
Filler = Callable[[int], list[str]]  # size -> that many filler units of a needle task's haystack


def _essay_filler(rng: random.Random, context_tokens: int, split: str) -> Filler:
    """Sentences of the split's essays from a random sentence start. A filler has at most `context_tokens` words (each
    is a token at least), so a start that many words before the end or earlier never runs out of text or repeats it:
    KVPError when the split's essays hold fewer words."""
    words, starts = _essay_words(split)
    if len(words) < context_tokens:
        raise KVPError(f"the essays of the {split} split hold {len(words)} words, too few for an essay haystack of "
                       f"up to {context_tokens} tokens; use a context of at most {len(words)} tokens")
    start = rng.choice([s for s in starts if s <= len(words) - context_tokens])
    return lambda size: _sentences(" ".join(words[start : start + size])) if size else []


def _code_filler(rng: random.Random, split: str) -> Filler:
    """Consecutive lines of the split's source files from a random line (after the split's last file, its first:
    each split holds tens of thousands of lines, more than any context)."""
    lines = code_lines(split)
    line = rng.randrange(len(lines))
    return lambda size: [lines[(line + i) % len(lines)] for i in range(size)]


def _distractor_filler(spec: TaskSpec, rng: random.Random, keys: list[str]) -> Filler:
    """Needles of the task's phrasing for keys other than the sample's."""
    salt = rng.getrandbits(64)

    def units(size: int) -> list[str]:
        local = random.Random(salt)
        others = _distinct(lambda: _key(local, spec.key_type), size + len(keys))
        others = [k for k in others if k not in keys][:size]
        return [f"One of the special magic {spec.value_type} for {k} is: {_value(local, spec.value_type)}."
                for k in others]

    return units


def _filler(spec: TaskSpec, rng: random.Random, context_tokens: int, split: str, keys: list[str]) -> Filler:
    """The filler of the needle task's haystack, its random draws made."""
    if spec.haystack == "essay":
        return _essay_filler(rng, context_tokens, split)
    if spec.haystack == "code":
        return _code_filler(rng, split)
    if spec.haystack == "noise":
        return lambda size: [NOISE] * size
    return _distractor_filler(spec, rng, keys)


def _needle_task(spec: TaskSpec, rng: random.Random, context_tokens: int, split: str) -> Callable[[int], Built]:
    keys = _distinct(lambda: _key(rng, spec.key_type), spec.n_keys)
    values = [[_value(rng, spec.value_type) for _ in range(spec.n_values)] for _ in keys]
    needles = [f"One of the special magic {spec.value_type} for {k} is: {v}."
               for k, vs in zip(keys, values) for v in vs]
    order = rng.sample(range(len(needles)), len(needles))
    needles = [needles[i] for i in order]
    depths = sorted(rng.random() for _ in needles)
    queried = keys[: spec.n_queries]
    answers = [v for vs in values[: spec.n_queries] for v in vs]
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    filler = _filler(spec, rng, context_tokens, split, keys)
    in_code = spec.haystack == "code"

    def build(size: int) -> Built:
        shown = [f"# {n}" for n in needles] if in_code else needles  # code: needles as comment lines
        haystack = ("\n" if in_code else " ").join(insert_at_depths(filler(size), shown, depths))
        tv = spec.value_type
        context = (f"Some special magic {tv} are hidden within the following text. Make sure to memorize it. "
                   f"I will quiz you about the {tv} afterwards.\n{haystack}\n")
        question = f"What are all the special magic {tv} for {query} mentioned in the provided text?"
        prefix = f"The special magic {tv} for {query} mentioned in the provided text are"
        return context, question, prefix, answers

    return build


def _variable_tracking(spec: TaskSpec, rng: random.Random, context_tokens: int, split: str,
                       hops: int = 4) -> Callable[[int], Built]:
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), hops + 1)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    depths = sorted(rng.random() for _ in chain)

    def build(size: int) -> Built:
        haystack = " ".join(insert_at_depths([NOISE] * size, chain, depths))
        context = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                   f"{haystack}\n")
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
                  f"are assigned the value {value}, they are:")
        return context, question, prefix, list(names)

    return build


def _common_words(spec: TaskSpec, rng: random.Random, context_tokens: int, split: str,
                  n_common: int = 10) -> Callable[[int], Built]:
    freq_common, freq_rare = (30, 3) if context_tokens >= 4096 else (max(4, context_tokens // 256), 1)
    pool = rng.sample(_vocabulary(), min(len(_vocabulary()), n_common + context_tokens))
    common, rare = pool[:n_common], pool[n_common:]
    salt = rng.getrandbits(64)

    def build(size: int) -> Built:
        listed = common * freq_common + rare[:size] * freq_rare
        random.Random(salt).shuffle(listed)
        numbered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
        context = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   f"Memorize the ones that appear most often.\n{numbered}\n")
        question = f"Question: What are the {n_common} most common words in the above list?"
        prefix = f"Answer: The top {n_common} words that appear most often in the list are:"
        return context, question, prefix, list(common)

    return build


def _frequent_words(spec: TaskSpec, rng: random.Random, context_tokens: int, split: str, alpha: float = 2.0,
                    vocab_size: int = 2000) -> Callable[[int], Built]:
    coded = _distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=6)), vocab_size)
    coded[0] = "...."  # the most frequent "word" is noise, as in RULER
    zeta = math.pi**2 / 6 if alpha == 2.0 else sum(k**-alpha for k in range(1, 100_000))
    salt = rng.getrandbits(64)

    def build(size: int) -> Built:
        counts = [int(size * (k**-alpha) / zeta) for k in range(1, vocab_size + 1)]
        text = [w for w, c in zip(coded, counts) for _ in range(c)]
        random.Random(salt).shuffle(text)
        context = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                   f"frequently appeared coded words. {' '.join(text)}\n")
        question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                    "frequently appeared words in the above coded text?")
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
        return context, question, prefix, coded[1:4]

    return build


BUILDERS = {"niah": _needle_task, "vt": _variable_tracking, "cwe": _common_words, "fwe": _frequent_words}


# ---------------------------------------------------------------- rendering and sizing
def render(handle, context: str, question: str, answer_prefix: str) -> tuple[tuple[dict, ...], str, str]:
    """(messages, prompt, prompt_context): the chat-rendered prompt ending with the answer prefix, and the part of
    it that ends with the context."""
    messages = ({"role": "user", "content": context + question},)
    prompt = handle.chat(list(messages)) + answer_prefix
    cut = prompt.find(context + question)
    if cut < 0:
        raise KVPError("the chat template rewrote the user message; RULER prompts need it verbatim")
    return messages, prompt, prompt[: cut + len(context)]


def fit_to_context(build: Callable[[int], Built], handle, context_tokens: int, what: str) -> tuple[Built, int]:
    """(build(size), size) for the most filler units `size` whose chat-rendered prompt (answer prefix included) has
    at most `context_tokens` tokens, by bisection (every filler unit is at least one token). `what` names the task in
    the error raised when even an empty filler does not fit."""

    def length(size: int) -> int:
        context, question, prefix, _ = build(size)
        return handle.encode(render(handle, context, question, prefix)[1]).shape[1]

    if length(0) > context_tokens:
        raise KVPError(f"{context_tokens} tokens are too few for {what}: its instructions and needles alone take "
                       f"{length(0)}; use a larger context")
    lo, hi = 0, context_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if length(mid) <= context_tokens else (lo, mid - 1)
    return build(lo), lo


def sample_from(built: Built, handle, *, id: str, task: str, source: str, split: str, seed: int, sample_id: int,
                metric: str, max_new_tokens: int) -> RulerSample:
    """The RulerSample of a built (context, question, answer prefix, answers), rendered through the chat template."""
    context, question, prefix, answers = built
    messages, prompt, prompt_context = render(handle, context, question, prefix)
    return RulerSample(
        id=id, task=task, context=context, question=question, answers=tuple(answers), answer_prefix=prefix,
        source=source, split=split, seed=seed, sample_id=sample_id, metric=metric, max_new_tokens=max_new_tokens,
        messages=messages, prompt=prompt, prompt_context=prompt_context,
        prompt_question=prompt[len(prompt_context):], length=handle.encode(prompt).shape[1],
        reference=" " + ", ".join(answers) + ".",
    )


def make_sample(task: str, handle, context_tokens: int, seed: int, sample_id: int, split: str = "train") -> RulerSample:
    """The RULER sample (task, split, seed, sample_id) rendered for `handle` (a ModelHandle: .chat, .encode) in
    at most `context_tokens` tokens (chat template and answer prefix included)."""
    if task not in TASKS:
        raise KVPError(f"unknown RULER task '{task}'; known tasks: {', '.join(TASKS)}")
    check_split(split)
    spec = TASKS[task]
    build = BUILDERS[spec.kind](spec, _rng(task, split, seed, sample_id), context_tokens, split)
    built, _ = fit_to_context(build, handle, context_tokens, f"RULER task {task}")
    return sample_from(built, handle, id=f"ruler/{split}/{task}/s{seed}/{sample_id}", task=task, source=SOURCE,
                       split=split, seed=seed, sample_id=sample_id, metric=spec.metric,
                       max_new_tokens=spec.max_new_tokens)


def make_samples(handle, context_tokens: int, n: int, split: str, seed: int = 0,
                 tasks: tuple[str, ...] | None = None) -> list[RulerSample]:
    """n samples cycling over `tasks` (all by default): sample i is task tasks[i % len(tasks)], sample_id i."""
    tasks = tuple(tasks or RULER_TASKS)
    return [make_sample(tasks[i % len(tasks)], handle, context_tokens, seed, i, split) for i in range(n)]

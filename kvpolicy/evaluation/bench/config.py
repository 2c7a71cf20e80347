"""`kvp bench`'s settings and section names as plain values (no torch), so `kvp bench --help` imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass

from kvpolicy.compression.names import ALLOCATION_MODES
from kvpolicy.errors import KVPError

# section -> the one-line header printed above it: what it measures
SECTIONS = {
    "a": "score + evict time of all layers as a share of the prefill, KVP and every baseline, per context",
    "b": "cache bytes and process peak memory at each budget and allocation mode vs the full cache",
    "c": "decode ms/token with the full cache vs a compressed one, per context",
    "d": "end-to-end answer time: kvpolicy's engine vs kvpress's kv-press-text-generation pipeline",
    "e": "trace recording and policy training throughput (and training at each --train-shape)",
    "f": "peak memory of a chunked prefill (cut after every chunk) vs compress-once vs the full cache, long contexts",
    "g": "a needle in a prompt longer than a full cache could hold, through a chunked prefill (and --long-runs): "
         "answers, peak memory",
    "h": "model.generate on an EvictingCache vs kvpolicy's engine, and a left-padded batch vs one prompt at a time",
    "ranking": "held-out ranking cost of KVP vs every baseline (traces from --traces/--val)",
}
DEFAULT_SECTIONS = ("a", "b", "c", "d", "e")  # ranking joins them when --traces and --val are given
NEEDS_POLICY = ("a", "d")  # sections that time the KVP policy
FULL, COMPRESS_ONCE, CHUNKED = "full", "compress-once", "chunked"
LONG_RUNS = (FULL, COMPRESS_ONCE, CHUNKED)  # how section g answers a long prompt: the full cache, one cut, chunked


@dataclass
class BenchConfig:
    """What `kvp bench` measures.

    contexts: prompt lengths (tokens) of sections a and c; d answers about a prompt of the first, b measures at the
    longest. keep: share of the context a compressed cache keeps in a, c and d (d removes 1 - keep, kvpress's
    compression ratio). budgets: entries kept per KV head in b and in the ranking section. decode_tokens: decode
    steps timed per cache in c; answer_tokens: max_new_tokens in d; repeats: timings are the best of this many.
    trace_n / trace_context / trace_future: the training traces section e records; train_steps: its training run.
    train_shapes: (layers, KV heads, head dim) at which section e also times training, on synthetic traces.
    allocations: the allocation modes section b measures each budget in.
    peak_contexts / peak_budget / prefill_chunk: section f's prompt lengths, budget and chunk size; peak_reference:
    the prompt length of its full-cache reference row (section g uses the same budget, chunk and reference).
    long_context / needle_depths / long_runs: section g's prompt length, the depths its needle is placed at and how
    each is answered (LONG_RUNS: chunked, compress-once, full).
    batch_rows: the prompts section h decodes in one batch (at the first context, keeping `keep` of it).
    """

    contexts: tuple[int, ...] = (2048, 4096)
    keep: float = 0.25
    budgets: tuple[int, ...] = (128, 256, 512, 1024)
    decode_tokens: int = 32
    answer_tokens: int = 16
    repeats: int = 3
    trace_n: int = 6
    trace_context: int = 1024
    trace_future: int = 32
    train_steps: int = 100
    train_shapes: tuple[tuple[int, int, int], ...] = ()
    allocations: tuple[str, ...] = tuple(ALLOCATION_MODES)
    peak_contexts: tuple[int, ...] = (4096, 8192, 16384)
    peak_budget: int = 1024
    prefill_chunk: int = 1024
    peak_reference: int = 2048
    long_context: int = 32000  # a 32K-class prompt that leaves Qwen2.5's 32,768 positions room for the question
    needle_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    batch_rows: int = 4
    long_runs: tuple[str, ...] = (CHUNKED,)

    def __post_init__(self):
        if not self.contexts or min(self.contexts) < 64:
            raise KVPError(f"--contexts must be at least 64 tokens each, got {list(self.contexts)}")
        if not 0 < self.keep < 1:
            raise KVPError(f"--keep is the share of the cache kept, in (0, 1); got {self.keep}")
        if not self.budgets or min(self.budgets) < 1:
            raise KVPError(f"--budgets are entries kept per KV head, each >= 1; got {list(self.budgets)}")
        for name in ("decode_tokens", "answer_tokens", "repeats", "trace_n", "train_steps", "batch_rows"):
            if getattr(self, name) < 1:
                raise KVPError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.allocations or set(self.allocations) - set(ALLOCATION_MODES):
            raise KVPError(f"--allocation takes {', '.join(ALLOCATION_MODES)}; got {list(self.allocations)}")
        if not self.peak_contexts or min(self.peak_contexts) < 64 or self.peak_reference < 64:
            raise KVPError("--peak-contexts and --peak-reference must be at least 64 tokens each")
        if self.long_context < 64 or not self.needle_depths or not all(0 <= d <= 1 for d in self.needle_depths):
            raise KVPError("--long-context must be at least 64 tokens and --needle-depths fractions in [0, 1]")
        if not self.long_runs or set(self.long_runs) - set(LONG_RUNS):
            raise KVPError(f"--long-runs takes {', '.join(LONG_RUNS)}; got {list(self.long_runs)}")
        if min(self.peak_budget, self.prefill_chunk) < 1:
            raise KVPError("--peak-budget and --prefill-chunk must be >= 1")
        if self.trace_context < 16 or self.trace_future < 1:
            raise KVPError("--trace-context must be >= 16 tokens and --trace-future >= 1")


def parse_shape(text: str) -> tuple[int, int, int]:
    """"28x4x128" -> (28, 4, 128): layers, KV heads, head dim."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise KVPError(f"--train-shape takes LAYERSxKV_HEADSxHEAD_DIM, e.g. 28x4x128; got '{text}'")
    return tuple(map(int, parts))


def plan_sections(chosen: list[str] | None, ranking_traces: bool, have_policy: bool) -> list[str]:
    """The sections to run, in order. chosen: --sections (None: a-e, plus ranking when its traces are given).
    Without a --policy, section e runs first: it trains the policy sections a and d time."""
    chosen = chosen or [*DEFAULT_SECTIONS, *(["ranking"] if ranking_traces else [])]
    if "ranking" in chosen and not ranking_traces:
        raise KVPError("the ranking section needs held-out traces: give --traces DIR and --val DIR")
    order = [s for s in SECTIONS if s in chosen]
    if not have_policy and any(s in NEEDS_POLICY for s in order):
        order = ["e", *(s for s in order if s != "e")]
    return order

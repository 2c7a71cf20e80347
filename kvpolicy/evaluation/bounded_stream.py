"""Long-generation perplexity on a bounded cache (protocol bounded-stream): eviction while a long text streams in.

A text of T tokens is streamed through the model, teacher-forced: its first token is prefilled alone (nothing
predicts it), then the rest is fed `every` (N) tokens at a time. After each chunk but the last (no token is left to
predict from the cache it leaves), a cache holding more than the budget b entries per KV head is re-ranked by the
scorer and physically cut back to b (the engine's compress: rank, then evict), so no forward reads more than b
earlier entries and the cache never holds more than b + N per head. A token's NLL comes from the logits of the
forward that fed the token before it, on the cache as it was then. The tokens of the first chunks, predicted before
any eviction, count too: all T − 1 tokens after the first.

Attention-free scorers (KVP's kvp:..., StreamingLLM, KNorm, KeyDiff) rank from the cache alone. Query-based ones
(TOVA, SnapKV; H2O, which takes every row) rank in their decoding form: with the attention inputs of the chunk just
fed, recorded during its forward, so one that needs more rows than a chunk holds is refused. The full-cache
reference cuts nothing, so its NLL does not depend on N: one stream per sample, fed FULL_CHUNK tokens at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import product

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import check_chunks, continuation_nll, feed_chunks, prefill
from kvpolicy.compression.scorers import Scorer
from kvpolicy.compression.state import KVState
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.lineup import FULL_CACHE, Contender, IsMissing, missing_budgets
from kvpolicy.evaluation.names import BOUNDED_STREAM
from kvpolicy.evaluation.outcome import Clock, Outcome
from kvpolicy.evaluation.result import FULL
from kvpolicy.evaluation.tasks.base import Intervals, Task
from kvpolicy.models import ModelHandle
from kvpolicy.models.attention import record_attention_inputs


@dataclass(frozen=True)
class StreamSample:
    """A text to stream: its id and token ids (1, T), T = the task's --context."""

    id: str
    ids: torch.Tensor = field(repr=False, compare=False)


@dataclass(frozen=True)
class StreamTask(Task):
    """Perplexity of long texts streamed through a cache bounded at the budget: load(handle, n, context_tokens,
    seed) -> n StreamSamples of context_tokens tokens each. Every scorer and budget is its own stream, once per
    re-rank interval (`kvp sweep --every`); the full-cache reference, which cuts nothing, once."""

    def positions(self, handle: ModelHandle, samples: list[StreamSample], max_new_tokens: int) -> tuple[int, str]:
        return max(s.ids.shape[1] for s in samples), "the whole stream"

    def supports(self, contender: Contender, protocol: str) -> bool:
        """Not a scorer that ranks only a whole prefill (KVzip, KVzap): a stream re-ranks a cut cache."""
        return super().supports(contender, protocol) and not contender.whole_prefill

    def check_lineup(self, contenders: list[Contender], budgets: list[Budget], intervals: Intervals) -> None:
        for contender, budget, n in product(contenders, budgets, intervals.stream):
            if self.supports(contender, BOUNDED_STREAM):  # the others are skipped on these tasks
                check_stream(contender.scorer, budget, n)

    def interval_groups(self, contenders: list[Contender], protocol: str,
                        intervals: Intervals) -> list[tuple[int | None, list[Contender]]]:
        scorers = [c for c in contenders if c is not FULL_CACHE]
        reference = [(None, [FULL_CACHE])] if len(scorers) < len(contenders) else []
        return reference + [(n, scorers) for n in intervals.stream]

    def outcomes(self, handle: ModelHandle, samples: list[StreamSample], protocol: str, contenders: list[Contender],
                 budgets: list[Budget], is_missing: IsMissing, every: int | None,
                 max_new_tokens: int) -> Iterator[Outcome]:
        (sample,) = samples
        return run_stream(handle, sample, contenders, budgets, every, is_missing)

FULL_CHUNK = 512  # tokens per forward of the full-cache reference: any size gives its NLL; this bounds the logits


@dataclass
class StreamStep:
    """One chunk of a stream. nll: (n,) NLL of its n tokens; fed: cache entries per KV head right after feeding it,
    before any cut; state: the cache the next chunk is fed on (cut back to the budget, or as fed when no cut was
    due), keys and values (1, H, entries, d) per layer; the stream goes on in place from it, so read it before
    taking the next step."""

    nll: torch.Tensor
    fed: int
    state: KVState


@dataclass(frozen=True)
class StreamedNLL:
    """A whole stream: nll_sum over n_tokens (T − 1) tokens; peak: the most entries per KV head its cache held
    (<= budget + every); entry_bytes: bytes of one cached position's keys and values over all layers and KV heads."""

    nll_sum: float
    n_tokens: int
    peak: int
    entry_bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)


def check_stream(scorer: Scorer | None, budget: Budget | None, every: int) -> None:
    """Refuse a stream that cannot run: `check_chunks`, or a ratio budget (the cache grows with every chunk)."""
    check_chunks(scorer, budget, every, "--every")
    if budget is not None and budget.tokens is None:
        raise KVPError(f"a bounded stream keeps a number of entries per head ('256'), not a ratio ('{budget.label}'): "
                       "the cache grows with every chunk")


def _feed(handle: ModelHandle, state: KVState, chunk: torch.Tensor, rows: int) -> torch.Tensor:
    """NLL (n,) of chunk (1, n) fed on `state`, advanced in place; the attention inputs of its last `rows` tokens
    (ALL_QUERIES: all; 0: none) stay recorded on the state for the next ranking, as prefill(record_queries=rows)
    keeps them."""
    if not rows:
        return continuation_nll(handle, state, chunk, append=True)
    with record_attention_inputs(handle.layers, rows) as recorded:
        nll = continuation_nll(handle, state, chunk, append=True)
    state.recorded = recorded
    return nll


def stream_steps(handle: ModelHandle, ids: torch.Tensor, scorer: Scorer | None, budget: Budget | None,
                 every: int) -> Iterator[StreamStep]:
    """Stream ids (1, T) through the model `every` tokens at a time after the first token, cutting the cache back to
    `budget` by `scorer` after every chunk but the last (scorer and budget None: the full cache, never cut). The
    steps' NLLs cover all T − 1 tokens after the first, those of the chunks fed before any cut included."""
    check_stream(scorer, budget, every)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise KVPError(f"a stream is one sequence of at least 2 tokens, ids (1, T); got {tuple(ids.shape)}")
    if scorer is not None:
        scorer.check_model(handle.info)  # a policy trained for another model is refused before any work
    state, _ = prefill(handle, ids[:, :1])
    chunks = ids[:, 1:].split(every, dim=1)
    for step in feed_chunks(handle, state, chunks, scorer, budget, partial(_feed, handle)):
        yield StreamStep(step.out, round(step.fed), state)


def stream_nll(handle: ModelHandle, ids: torch.Tensor, scorer: Scorer | None, budget: Budget | None,
               every: int) -> StreamedNLL:
    """The NLL of every token but the first of ids (1, T) streamed as `stream_steps` streams it."""
    nll_sum, n_tokens, peak = 0.0, 0, 0
    for step in stream_steps(handle, ids, scorer, budget, every):
        nll_sum += float(step.nll.sum())
        n_tokens += step.nll.numel()
        peak = max(peak, step.fed)
    return StreamedNLL(nll_sum, n_tokens, peak, step.state.nbytes_at(1))


def run_stream(handle: ModelHandle, sample: StreamSample, contenders: list[Contender], budgets: list[Budget],
               every: int | None, is_missing: IsMissing) -> Iterator[Outcome]:
    """Outcomes of one sample's missing (contender, budget) pairs, each its own stream re-ranked every `every`
    tokens, and of the full-cache reference when it is missing (every None: a unit of the reference alone). kept:
    the entries per head each cut leaves (the whole stream when the budget holds it)."""
    missing = missing_budgets(contenders, budgets, is_missing)
    length = sample.ids.shape[1]
    for contender in [FULL_CACHE, *contenders]:
        full = contender is FULL_CACHE
        for budget in missing[contender.id]:
            clock = Clock()
            if full:
                streamed = stream_nll(handle, sample.ids, None, None, FULL_CHUNK)
            else:
                streamed = stream_nll(handle, sample.ids, contender.scorer, budget, every)
            kept = budget.kept(length)
            fields = {"nll_sum": streamed.nll_sum, "n_tokens": streamed.n_tokens, "value": streamed.perplexity}
            yield Outcome(sample.id, contender, FULL if full else budget.label, length, kept,
                          streamed.entry_bytes * length, streamed.entry_bytes * kept, clock.lap(), 0.0, fields)

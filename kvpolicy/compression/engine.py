"""The compression engine: prefill → rank → evict → decode, on a physically shrinking KV cache.

With the uniform allocation every head of every layer keeps the same number of entries, so eviction is one gather
along the sequence axis and the cache stays a plain DynamicCache that any attention kernel reads. An adaptive
allocation (compression/allocation.py) gives layers their own lengths and heads their own counts: such a layer is
stored ragged (compression/ragged.py) and read padded to its largest count, the padding masked out of attention
(`KVState.masks`, compression/head_masks.py). New tokens get RoPE positions that
continue from the number of tokens fed so far (`KVState.next_position`), while their cache_position indexes the
shrunken cache, so transformers' causal mask lets them see every kept entry and the earlier tokens of their
own chunk.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kvpolicy.compression.allocation import UNIFORM, Allocation, kept_entries
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.head_masks import masked_heads
from kvpolicy.compression.catalog import attention_free
from kvpolicy.compression.prompts import split_prompt
from kvpolicy.compression.protocols import QUERY_AWARE, QUESTION_AGNOSTIC, check_protocol_name
from kvpolicy.compression.scorers.base import LayerView, Scorer
from kvpolicy.compression.state import KVState, cache_from_tensors, gather_entries, stack_states
from kvpolicy.errors import KVPError
from kvpolicy.models import ModelHandle
from kvpolicy.models.handle import layer_windows
from kvpolicy.models.placement import synchronize
from kvpolicy.models.attention import ALL_QUERIES, record_attention_inputs
from kvpolicy.models.decoding import GREEDY, Decoded, Sampling, check_stop_strings, cut_at_stop, decode_tokens


@dataclass
class BoundedDecoding:
    """Keep the cache within budget.tokens + every entries per head (on average over heads and layers, for an
    adaptive allocation) during decoding: whenever it reaches that size, re-score it with `scorer` and cut it back
    to the budget. Only attention-free scorers can (they need nothing but the cache)."""

    scorer: Scorer
    budget: Budget
    every: int = 16

    def __post_init__(self):
        if not self.scorer.attention_free:
            needs = ("re-reads the cached text, which only an uncut prefill holds" if self.scorer.reads_text
                     else "needs the queries of a prefill chunk")
            raise KVPError(
                f"scorer '{self.scorer.name}' {needs}, so it cannot re-score the cache while decoding; use an "
                f"attention-free scorer ({', '.join(attention_free())}, kvp:...)"
            )
        if self.budget.tokens is None:
            raise KVPError("bounded decoding needs an absolute token budget (Budget(tokens=...)), not a ratio")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise KVPError(f"bounded decoding re-scores every N >= 1 tokens; got every={self.every!r}")


def check_supported(handle: ModelHandle) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention, evicted; empty: no layer slides), from the model's config;
    a layer kind kvpolicy cannot evict from is refused (`layer_windows`)."""
    return layer_windows(handle.model.config.get_text_config(decoder=True), handle.info.name)


def _check_input(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise KVPError("input_ids must be a non-empty (batch, tokens) integer tensor")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise KVPError(
            "padded batches are not supported (each row would keep entries at different positions); "
            "run one sequence at a time or batch sequences of equal length without padding"
        )


def _forward(
    handle: ModelHandle, state: KVState, input_ids: torch.Tensor, record_rows: int = 0, all_logits: bool = False
) -> torch.Tensor:
    """Feed input_ids (B, n) after the state's tokens, in place; returns logits (B, n or 1, vocab).

    position_ids continue from next_position (true positions) while cache_position indexes the (possibly
    shrunken) cache. record_rows > 0 or ALL_QUERIES records the chunk's attention inputs into state.recorded.
    The state's token ids grow by input_ids while its cache holds every token fed (see KVState.ids).
    """
    B, n = input_ids.shape
    if state.positions and state.positions[0].shape[0] != B:
        raise KVPError(f"input has batch size {B} but the cache holds {state.positions[0].shape[0]} sequences")
    start, past = state.next_position, state.length
    if start + n > handle.info.max_positions:
        raise KVPError(
            f"{start + n} tokens exceed the {handle.info.max_positions} positions of {handle.info.name}; "
            "shorten the input"
        )
    device = handle.model.device
    fed = torch.arange(start, start + n, device=device).unsqueeze(0).expand(B, -1)  # true positions, per row
    if state.offsets is not None:
        fed = fed - state.offsets.to(device).unsqueeze(1)
    recording = record_attention_inputs(handle.layers, record_rows) if record_rows else contextlib.nullcontext(None)
    masks = state.masks
    if masks is not None and state.windows:  # a sliding layer keeps transformers' own (sliding) mask
        masks = [None if window else mask for window, mask in zip(state.windows, masks)]
    with torch.no_grad(), recording as recorded, masked_heads(handle.layers, masks):
        out = handle.model(
            input_ids=input_ids.to(device),
            past_key_values=state.cache,
            position_ids=fed,
            cache_position=torch.arange(past, past + n, device=device),
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
    heads = state.positions[0].shape[1] if state.positions else state.cache.layers[0].keys.shape[1]
    new = fed.unsqueeze(1).expand(B, heads, n)
    old = state.positions or [new[..., :0]] * state.n_layers
    state.positions = [torch.cat([p, new], dim=-1) for p in old]
    if state.masks is not None:  # new tokens are attended
        state.masks = [torch.cat([m, m.new_ones(B, heads, n)], dim=-1) for m in state.masks]
    for idx, window in enumerate(state.windows):  # a sliding layer kept its last window - 1 entries
        if window is not None:
            held = state.cache.layers[idx].get_seq_length()
            state.positions[idx] = state.positions[idx][..., -held:]
            if state.masks is not None:
                state.masks[idx] = state.masks[idx][..., -held:]
    if start == 0:
        state.ids = input_ids.to(device)
    elif state.ids is not None:  # the cache still holds every token fed
        state.ids = torch.cat([state.ids, input_ids.to(device)], dim=1)
    state.next_position = start + n
    state.recorded = recorded if record_rows else None
    state.logits = out.logits[:, -1].clone()  # not a view that would keep every position's logits alive
    return out.logits


def prefill(
    handle: ModelHandle,
    input_ids: torch.Tensor,
    state: KVState | None = None,
    record_queries: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> tuple[KVState, torch.Tensor]:
    """Run input_ids (B, T) through the model, appending to `state` in place when given (multi-turn), else to a
    new state. record_queries: how many of the chunk's last tokens' attention inputs to keep for query-based
    scorers (a scorer's `query_window`; ALL_QUERIES for all). Returns (state, next-token logits (B, vocab)).
    attention_mask: only to detect padding, which is refused."""
    windows = check_supported(handle)
    _check_input(input_ids, attention_mask)
    state = KVState.empty(windows) if state is None else state
    _forward(handle, state, input_ids, record_queries)
    return state, state.logits


def rank(handle: ModelHandle, state: KVState, scorer: Scorer) -> list[torch.Tensor]:
    """Per-layer scores (B, H, T) of every cached entry of each evicted layer (`KVState.evicted`: all layers but a
    hybrid model's sliding ones), higher = keep. Rank once, then evict at any budget.

    A scorer that re-reads the cached text (`Scorer.reads_text`, e.g. KVzip) ranks the whole cache at once with the
    model (`Scorer.rank_cache`), and only the cache of one sequence that holds every token fed (`KVState.ids`)."""
    if not state.n_layers:
        raise KVPError("the cache is empty: prefill before ranking")
    scorer.check_model(handle.info)
    if scorer.reads_text:
        if state.ids is None:
            raise KVPError(f"scorer '{scorer.name}' re-reads the cached text, but this cache no longer holds every "
                           "token fed (it was cut); rank it before any eviction, or use another scorer")
        if state.ids.shape[0] != 1:
            raise KVPError(f"scorer '{scorer.name}' re-reads the cached text of one sequence, but this cache holds "
                           f"{state.ids.shape[0]}; rank each sequence's cache on its own")
        with torch.no_grad():
            scores = scorer.rank_cache(handle, state)
    else:
        scores = _rank_layers(handle, state, scorer)
    if len(scores) != len(state.evicted):
        raise KVPError(f"scorer '{scorer.name}' returned scores for {len(scores)} layers, the cache evicts from "
                       f"{len(state.evicted)}")
    for idx, layer_scores in zip(state.evicted, scores):
        expected = state.layer(idx)[0].shape[:3]
        if layer_scores.shape != expected:
            raise KVPError(f"scorer '{scorer.name}' returned scores {tuple(layer_scores.shape)} for layer {idx}, "
                           f"expected (batch, kv_heads, T) = {tuple(expected)}")
    return scores


def _rank_layers(handle: ModelHandle, state: KVState, scorer: Scorer) -> list[torch.Tensor]:
    """`rank` by `Scorer.score_layers` (one layer at a time unless the scorer scores them together), with the
    recorded attention inputs a query-based scorer needs."""
    needs = scorer.query_window
    if needs:
        have = state.recorded[0].rows if state.recorded else 0
        whole = bool(state.recorded) and state.recorded[0].whole_chunk
        if needs != ALL_QUERIES and whole and have < needs:  # recorded right, but the chunk itself is too short
            raise KVPError(
                f"scorer '{scorer.name}' ranks from the queries of the last {needs} tokens of the chunk prefilled "
                f"before compression, but that chunk (the prompt, or its context under question-agnostic) has only "
                f"{have} tokens; give at least {needs}, or use a scorer that needs fewer, such as an attention-free "
                f"one ({', '.join(attention_free())}, kvp:...)"
            )
        if not (whole if needs == ALL_QUERIES else have >= needs):
            rows, setting = (f"the last {needs} tokens", needs)
            if needs == ALL_QUERIES:
                rows, setting = "every token", "ALL_QUERIES"
            raise KVPError(
                f"scorer '{scorer.name}' needs the attention inputs of {rows} of the latest chunk but the state holds "
                f"{have} recorded rows; prefill that chunk with record_queries={setting} right before ranking "
                "(evicting or decoding drops them)"
            )
    rotary = handle.model.model.rotary_emb
    views = []
    for number, idx in enumerate(state.evicted):  # a scorer numbers the layers it ranks (a policy: its agents')
        keys, values = state.layer(idx)
        inputs = state.recorded[idx] if needs else None
        views.append(LayerView(
            layer_idx=number,
            keys=keys,
            values=values,
            positions=state.positions[idx],
            module=handle.layers[idx].self_attn,
            hidden_states=inputs.hidden_states if inputs else None,
            position_embeddings=inputs.position_embeddings if inputs else None,
            rotary_emb=rotary,
        ))
    with torch.no_grad():
        return scorer.score_layers(views)


def evict(state: KVState, scores: list[torch.Tensor], budget: Budget, allocation: Allocation = UNIFORM) -> KVState:
    """A new, physically smaller state keeping budget.kept(T) entries per head on average (input untouched).

    `allocation` gives each layer's heads their counts (UNIFORM: budget.kept(T) each); every head keeps the sinks, the
    recent tokens and then its top scores, gathered in position order. A layer whose heads keep different counts is
    stored ragged, read padded to the largest (`KVState.masks` marks the padding); entries masked before stay
    masked. scores: one per evicted layer (`KVState.evicted`); a sliding-window layer is kept as it is. The result
    has no recorded attention inputs and no token ids (both described the uncut cache)."""
    evicted = state.evicted
    if len(scores) != len(evicted):
        raise KVPError(f"got scores for {len(scores)} layers, the cache evicts from {len(evicted)}")
    kept = budget.kept(state.length)
    if kept >= state.length:
        return state.branch()
    old_masks = [state.masks[i] for i in evicted] if state.masks is not None else None
    keys, counts = allocation.select(scores, [state.positions[i] for i in evicted], budget, state.next_positions(),
                                     old_masks)
    layers = [state.layer(i) for i in range(state.n_layers)]  # a sliding layer keeps its window as it is
    positions = list(state.positions)
    masks = [None] * state.n_layers if state.masks is None else list(state.masks)  # None: every entry attended
    for idx, (keep, attended) in zip(evicted, kept_entries(keys, counts)):
        if state.masks is not None:
            held = state.masks[idx].gather(2, keep)
            attended = held if attended is None else attended & held
        layers[idx] = gather_entries(keep, *layers[idx])
        positions[idx] = state.positions[idx].gather(2, keep)
        masks[idx] = attended
    widths = {positions[i].shape[-1] for i in evicted}
    if len(widths) == 1 and all(m is None or bool(m.all()) for m in masks):
        masks = None
    else:
        masks = [torch.ones_like(p, dtype=torch.bool) if m is None else m for p, m in zip(positions, masks)]
    return KVState(cache_from_tensors(layers, masks, state.windows), positions, state.next_position, None,
                   state.logits, masks=masks, offsets=state.offsets)


def compress(handle: ModelHandle, state: KVState, scorer: Scorer, budget: Budget) -> KVState:
    """evict(state, rank(handle, state, scorer), budget, scorer.allocation); a budget >= the cache length skips the
    ranking."""
    if budget.kept(state.length) >= state.length:
        return state.branch()
    return evict(state, rank(handle, state, scorer), budget, scorer.allocation)


def check_chunks(scorer: Scorer | None, budget: Budget | None, chunk: int, option: str) -> None:
    """Refuse, before any work, a chunked feed (a bounded stream, a chunked prefill) that cannot run: a scorer without
    a budget (or the reverse: neither is the full cache), a chunk size below 1, a scorer that ranks only a whole
    prefill (KVzip, KVzap, a KVP policy reading hidden states), or one that needs the attention inputs of more tokens
    than a chunk feeds. option: what sets the chunk size, named in the error (`--every`, `--prefill-chunk`)."""
    if (scorer is None) != (budget is None):
        raise KVPError("give both a scorer and a budget to bound the cache, or neither for the full cache")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise KVPError(f"the cache is fed N >= 1 tokens at a time; got {option} {chunk!r}")
    if scorer is not None and scorer.whole_prefill:
        what = "re-reads the whole text" if scorer.reads_text else "reads every cached entry's own hidden state"
        raise KVPError(f"scorer '{scorer.name}' {what}, which only an uncut prefill holds, so it cannot re-rank a "
                       "cache cut chunk by chunk; use another scorer")
    window = scorer.query_window if scorer is not None else 0
    if window != ALL_QUERIES and window > chunk:
        raise KVPError(f"scorer '{scorer.name}' ranks with the attention inputs of the last {window} tokens fed, but "
                       f"a chunk feeds only {chunk} between two rankings; use {option} {window} or more, or another "
                       "scorer")


@dataclass
class ChunkFed:
    """One chunk fed by `feed_chunks`: out, what `feed` returned for it; fed: entries per KV head right after
    feeding it, before any cut (averaged over heads and layers for an adaptive allocation); cut_s: the seconds the
    cut after it took (ranking and eviction; 0 when none was due)."""

    out: Any
    fed: float
    cut_s: float = 0.0


@dataclass
class ChunkedPrefill:
    """What a chunked prefill did: peak, the most entries per KV head the cache held; chunks fed; cut_s, the seconds
    its cuts took (ranking and eviction), the device's queued work included."""

    peak: float
    chunks: int
    cut_s: float


def feed_chunks(
    handle: ModelHandle,
    state: KVState,
    chunks: Sequence[torch.Tensor],
    scorer: Scorer | None,
    budget: Budget | None,
    feed: Callable[[KVState, torch.Tensor, int], Any],
    record_last: bool = False,
) -> Iterator[ChunkFed]:
    """Feed `chunks` (each (B, n)) on `state`, advanced in place, by feed(state, chunk, rows) (rows: the attention
    inputs to record, as prefill's record_queries). After every chunk but the last, a cache holding more than
    budget.tokens entries per KV head is re-ranked by `scorer` with that chunk's own recorded queries (the scorer's
    `query_window`) and physically cut back to the budget, so no chunk is fed on more than the budget and the cache
    never holds more than budget + the longest chunk per head (scorer and budget None: nothing is cut). The one
    mechanism of bounded streams (evaluation/bounded_stream.py) and of a prefill that evicts as it goes
    (`prefill_chunked`). record_last: record the last chunk's attention inputs too, for a cut the caller makes."""
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        cut = scorer is not None and not last and state.attended() + chunk.shape[1] > budget.tokens
        out = feed(state, chunk, scorer.query_window if cut or (last and record_last and scorer) else 0)
        fed, cut_s = state.attended(), 0.0
        if cut:
            start = time.perf_counter()
            state.update_from(compress(handle, state, scorer, budget))
            cut_s = _seconds_since(handle, start)
        yield ChunkFed(out, fed, cut_s)


def check_prefill_chunk(scorer: Scorer | None, budget: Budget | None, chunk: int) -> None:
    """Refuse, before any work, a chunked prefill that cannot run: `check_chunks`, a missing scorer (nothing to cut
    with), or a chunk smaller than the sinks + recent positions every cut keeps."""
    if scorer is None:
        raise KVPError("a chunked prefill cuts the cache with a scorer to a budget: give both, or no prefill chunk")
    check_chunks(scorer, budget, chunk, "--prefill-chunk")
    if chunk < budget.sinks + budget.recent:
        raise KVPError(f"a prefill chunk of {chunk} tokens is smaller than the {budget.sinks} sinks + {budget.recent} "
                       f"recent positions every cut keeps; use --prefill-chunk {budget.sinks + budget.recent} or more")


def prefill_chunked(
    handle: ModelHandle, input_ids: torch.Tensor, scorer: Scorer, budget: Budget, chunk: int
) -> tuple[KVState, ChunkedPrefill]:
    """Prefill input_ids (1, T) `chunk` tokens at a time, cutting the cache back to `budget` (tokens per head; for a
    ratio of T, `Budget.of_length`) with `scorer` after every chunk but the last (`feed_chunks`): the cache never
    holds more than budget + chunk entries per head. The chunks are aligned on the end of the prompt: the last one,
    which the caller compresses as after a whole prefill (its recorded queries are the scorer's), holds the prompt's
    last `chunk` tokens (the question, in the query-aware protocol), and the first one what remains; a chunk >= T is
    one chunk, a whole prefill. Refused (`check_prefill_chunk`): a scorer that ranks only a whole prefill (KVzip,
    KVzap), a chunk smaller than the budget's sinks + recent or than the scorer's query window; and a first chunk that
    must be cut (longer than the budget) but is shorter than that window.
    Returns (state, what the chunked prefill did)."""
    windows = check_supported(handle)
    _check_input(input_ids, None)
    check_prefill_chunk(scorer, budget, chunk)
    if budget.tokens is None:
        raise KVPError("a chunked prefill cuts to a number of entries per head: give Budget.of_length(prompt tokens)")
    scorer.check_model(handle.info)
    length = input_ids.shape[1]
    first = length % chunk or chunk
    window = scorer.query_window
    if budget.tokens < first < window:
        raise KVPError(f"the prompt's {length} tokens in chunks of {chunk} leave a first chunk of {first}: more than "
                       f"the budget, so it is cut, but fewer than the {window} queries scorer '{scorer.name}' ranks "
                       f"with; choose another chunk size or a budget of at least {window - 1}")
    rest = input_ids[:, first:]
    chunks = [input_ids[:, :first], *(rest.split(chunk, dim=1) if rest.shape[1] else ())]
    state = KVState.empty(windows)

    def feed(state: KVState, ids: torch.Tensor, rows: int) -> None:
        _forward(handle, state, ids, rows)

    steps = list(feed_chunks(handle, state, chunks, scorer, budget, feed, record_last=True))
    return state, ChunkedPrefill(max(step.fed for step in steps), len(steps), sum(step.cut_s for step in steps))


def decode_answers(
    handle: ModelHandle,
    state: KVState,
    logits: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Iterable[int] | None = None,
    bounded: BoundedDecoding | None = None,
    sampling: Sampling = GREEDY,
    stop_strings: Sequence[str] = (),
    on_token: Callable[[int, int], None] | None = None,
    answered: Callable[[int, list[int]], bool] | None = None,
    drop_finished: bool = False,
) -> list[Decoded]:
    """The answer of every row of a (possibly batched, e.g. `stack_states` of several cuts) state from its
    next-token logits (B, vocab), advancing `state` in place; one forward per step serves all rows.

    Each row stops at its own stop token (default: the model's end-of-turn ids), when its decoded text contains a
    stop string, once answered(row, tokens) says so, or after max_new_tokens; decoding ends when every row has
    stopped. Every generated token except a final stop is fed, so afterwards a row's state holds prompt + answer; a
    row that stopped early keeps being fed (its state rows then hold tokens past its answer), unless
    `drop_finished`: then its rows leave the batch as it stops, and afterwards `state` holds the rows still decoding
    at the last step only (for a caller that reads the answers, not the state). The others are exactly what
    decoding that row alone gives, up to floating-point summation order in the batched matmuls (sampled rows too:
    see `Sampling`). With `bounded`, the cache is cut back to the budget whenever it reaches budget + every
    entries. on_token(row, token) sees every kept token as it is chosen.
    """
    rows = state.positions[0].shape[0] if state.n_layers else 0
    if logits.dim() != 2 or logits.shape[0] != rows:
        raise KVPError(f"logits must be (batch, vocab) with one row per cached sequence ({rows}), "
                       f"got {tuple(logits.shape)}")

    def feed(step: torch.Tensor) -> torch.Tensor:
        if bounded is not None and state.attended() >= bounded.budget.tokens + bounded.every:
            state.update_from(compress(handle, state, bounded.scorer, bounded.budget))
        return _forward(handle, state, step)[:, -1]

    def keep_rows(kept: list[int]) -> None:
        state.update_from(state.rows(kept))

    stop = set(handle.eos_token_ids if stop_ids is None else stop_ids)
    return decode_tokens(feed, logits, max_new_tokens, stop, sampling, stop_strings, handle.decode, on_token,
                         answered, keep_rows if drop_finished else None)


def greedy_decode(
    handle: ModelHandle,
    state: KVState,
    logits: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Iterable[int] | None = None,
    bounded: BoundedDecoding | None = None,
) -> list[int]:
    """Greedy tokens of one sequence from next-token logits (1, vocab), advancing `state` in place (see
    `decode_answers`): afterwards the state holds prompt + answer and its logits."""
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise KVPError("greedy_decode decodes one sequence: logits must be (1, vocab)")
    return greedy_decode_batch(handle, state, logits, max_new_tokens, stop_ids, bounded)[0]


def greedy_decode_batch(
    handle: ModelHandle,
    state: KVState,
    logits: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Iterable[int] | None = None,
    bounded: BoundedDecoding | None = None,
) -> list[list[int]]:
    """Greedy tokens for every row of a batched state from its next-token logits (B, vocab): `decode_answers`
    without sampling or stop strings, each row stopping at its own stop token or after max_new_tokens."""
    return [answer.tokens for answer in decode_answers(handle, state, logits, max_new_tokens, stop_ids, bounded)]


def continuation_nll(
    handle: ModelHandle, state: KVState, continuation_ids: torch.Tensor, append: bool = False
) -> torch.Tensor:
    """Teacher-forced negative log-likelihood (F,) of each continuation token (1, F) given the state.

    The first token is scored with the state's stored logits; the state is left as it was unless append=True,
    in which case it is advanced past the continuation (e.g. a reference answer in a dialogue)."""
    _check_input(continuation_ids, None)
    if state.logits is None or continuation_ids.shape[0] != 1:
        raise KVPError("continuation_nll needs a prefilled single-sequence state and continuation_ids of shape (1, F)")
    work = state if append else state.branch()
    first = state.logits.unsqueeze(1)
    rest = _forward(handle, work, continuation_ids, all_logits=True)[:, :-1]
    logits = torch.cat([first, rest], dim=1)[0].float()
    return F.cross_entropy(logits, continuation_ids[0].to(logits.device), reduction="none")


@dataclass
class GenerationResult:
    """One answer, with the protocol, how it was decoded and how big the cache was before and after compression.

    text: the answer, cut before a stop string; token_ids: up to the stop token or the token that completed the
    stop string. cache_tokens_*: entries per KV head (attended, averaged over heads and layers where an adaptive
    allocation gave them different counts); cache_bytes_*: bytes of all cached keys and values held (no padding:
    compression/ragged.py); cache_bytes_full is what the whole prompt's cache holds, also when a chunked prefill
    never held it.
    timings: prefill_s (every prefill, the question's too under question-agnostic), compress_s, decode_s and
    decode_tokens_per_s (of a batch of batch_rows prompts: decode_s is the batch's, the tokens this row's)."""

    text: str
    token_ids: list[int]
    protocol: str
    scorer: dict[str, Any] | None
    budget: str | None
    context_tokens: int
    question_tokens: int
    cache_tokens_full: int
    cache_tokens_compressed: int
    cache_bytes_full: int
    cache_bytes_compressed: int
    stop_reason: str  # "stop_token", "stop_string" or "max_new_tokens"
    sampling: Sampling = GREEDY
    timings: dict[str, float] = field(default_factory=dict)
    budget_shortfall: str | None = None  # a ratio budget that could not keep every sink and recent position
    prefill_chunk: int | None = None  # the prompt was prefilled this many tokens at a time, cut after each chunk
    cache_tokens_peak: int | None = None  # the most entries per KV head the cache held during the prefill
    batch_rows: int = 1  # prompts decoded together in one batch (decode_s is the batch's)

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens + self.question_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"prompt_tokens": self.prompt_tokens}


def check_room(handle: ModelHandle, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse, before any forward pass, a generation that could run past the model's last position: the prompt and
    every new token each take one, so an answer is never cut off half-way by the position limit."""
    limit, needed = handle.info.max_positions, prompt_tokens + max_new_tokens
    if needed > limit:
        fix = (f"ask for at most {limit - prompt_tokens} new tokens or shorten the prompt" if prompt_tokens < limit
               else "shorten the prompt")
        raise KVPError(f"the prompt's {prompt_tokens} tokens and up to {max_new_tokens} new ones need {needed} "
                       f"positions, more than the {limit} of {handle.info.name}; {fix}")


def _seconds_since(handle: ModelHandle, start: float) -> float:
    """Wall time since `start`, once the model's device has finished its queued work (CUDA runs asynchronously)."""
    synchronize(handle.model.device)
    return time.perf_counter() - start


@dataclass
class _Prepared:
    """One prompt prefilled and cut, ready to decode: its state and what its GenerationResult reports of it."""

    state: KVState
    context_tokens: int
    question_tokens: int
    full_tokens: int
    full_bytes: int
    compressed_tokens: int
    compressed_bytes: int
    peak: float
    timings: dict[str, float]


def _prepare(handle: ModelHandle, context_ids: torch.Tensor, question_ids: torch.Tensor, scorer: Scorer | None,
             budget: Budget | None, protocol: str, prefill_chunk: int | None) -> _Prepared:
    """Prefill one prompt, its context (1, Tc) and question (1, Tq) tokens (in chunks of prefill_chunk, cut after
    each), and cut it to the budget, per the protocol."""
    first = torch.cat([context_ids, question_ids], dim=1) if protocol == QUERY_AWARE else context_ids
    timings = {}
    clock = time.perf_counter()
    full_tokens = first.shape[1]
    if prefill_chunk is None:
        state, _ = prefill(handle, first, record_queries=scorer.query_window if scorer else 0)
        peak, cut_to = full_tokens, budget
    else:
        cut_to = budget.of_length(full_tokens)  # a ratio of the whole prompt, kept through every cut
        state, chunked = prefill_chunked(handle, first, scorer, cut_to, prefill_chunk)
        peak = chunked.peak
    timings["prefill_s"] = _seconds_since(handle, clock)
    full_bytes = state.nbytes_at(full_tokens)
    clock = time.perf_counter()
    if scorer is not None:
        state = compress(handle, state, scorer, cut_to)
    timings["compress_s"] = _seconds_since(handle, clock)
    compressed_tokens, compressed_bytes = round(state.attended()), state.nbytes()
    if protocol == QUESTION_AGNOSTIC:
        clock = time.perf_counter()
        prefill(handle, question_ids, state)
        timings["prefill_s"] += _seconds_since(handle, clock)
    return _Prepared(state, context_ids.shape[1], question_ids.shape[1], full_tokens, full_bytes, compressed_tokens,
                     compressed_bytes, peak, timings)


def _prompts(context: str | Sequence[str], question: str | Sequence[str]) -> tuple[list[str], list[str], bool]:
    """(contexts, questions, batched): one prompt, or a list of contexts and/or questions (one question for every
    context, one context for every question, or as many of each)."""
    batched = isinstance(context, (list, tuple)) or isinstance(question, (list, tuple))
    contexts = list(context) if isinstance(context, (list, tuple)) else [context]
    questions = list(question) if isinstance(question, (list, tuple)) else [question]
    if not contexts or not questions:
        raise KVPError("generate needs at least one prompt: got an empty list")
    if len(contexts) != len(questions) and 1 not in (len(contexts), len(questions)):
        raise KVPError(f"generate got {len(contexts)} contexts and {len(questions)} questions; give as many of each, "
                       "or one of either")
    rows = max(len(contexts), len(questions))
    contexts, questions = contexts * (rows // len(contexts)), questions * (rows // len(questions))
    for text in (*contexts, *questions):
        if not isinstance(text, str):
            raise KVPError(f"prompts are text: got a {type(text).__name__} where a context or question belongs")
    if any(not (c + q).strip() for c, q in zip(contexts, questions)):
        raise KVPError("the prompt is empty: give a context or a question")
    return contexts, questions, batched


def _settings(handle: ModelHandle, scorer: Scorer | str | None, budget: Budget | int | None
              ) -> tuple[Scorer | None, Budget | None]:
    """The scorer (a Scorer, or a name such as "kvp" or "knorm" for this model) and the budget (a Budget, or entries
    per KV head), checked: both or neither."""
    if not isinstance(handle, ModelHandle):
        raise KVPError(f"generate takes the model from kvp.load_model(...), got {type(handle).__name__}")
    if isinstance(scorer, str):
        from kvpolicy.compression.scorers import named_scorer

        scorer = named_scorer(scorer, handle.info.name)
    if isinstance(budget, int) and not isinstance(budget, bool):
        budget = Budget(tokens=budget)
    if scorer is not None and not isinstance(scorer, Scorer):
        raise KVPError(f"scorer is a kvpolicy scorer or its name (kvp.load_policy(...), 'knorm'), got {scorer!r}")
    if budget is not None and not isinstance(budget, Budget):
        raise KVPError(f"budget is a kvp.Budget or a number of entries per KV head, got {budget!r}")
    if (scorer is None) != (budget is None):
        raise KVPError("give both a scorer and a budget to compress, or neither for the full cache")
    return scorer, budget


def generate(
    handle: ModelHandle,
    context: str | Sequence[str],
    question: str | Sequence[str] = "",
    scorer: Scorer | str | None = None,
    budget: Budget | int | None = None,
    protocol: str = QUERY_AWARE,
    max_new_tokens: int = 64,
    answer_prefix: str = "",
    bounded: BoundedDecoding | None = None,
    sampling: Sampling = GREEDY,
    stop_strings: Sequence[str] = (),
    on_token: Callable[..., None] | None = None,
    prefill_chunk: int | None = None,
) -> GenerationResult | list[GenerationResult]:
    """Answer `question` about `context` with a compressed cache (scorer/budget None: the full cache). scorer: a
    Scorer or a name ("kvp": the policy bundled for this model, "knorm", ...); budget: a Budget or entries per KV head.

    query-aware: prefill context + question, compress, decode (the KVP paper's protocol).
    question-agnostic: prefill and compress the context, then prefill the question on it, decode (kvpress's).
    prefill_chunk=C: prefill what is compressed C tokens at a time, cutting the cache back to the budget after each
    chunk (`prefill_chunked`), so the cache never holds more than budget + C entries per head; the last chunk is
    compressed as a whole prefill is. Query-based scorers rank each cut with the queries of the chunk just fed.
    Decoding stops at an end-of-turn token, a stop string or max_new_tokens; on_token(token) sees every answer
    token as it is chosen (e.g. to stream it with `models.text_stream.TextStream`).

    A list of contexts and/or questions answers them all, one GenerationResult each: each prompt is prefilled and
    cut on its own (exactly as alone), then every row decodes in one batch (`stack_states`: each row attends to its
    own entries, continues from its own position, and is re-cut on its own under `bounded`); on_token(row, token).
    """
    check_protocol_name(protocol)
    scorer, budget = _settings(handle, scorer, budget)
    contexts, questions, batched = _prompts(context, question)
    if prefill_chunk is not None:
        check_prefill_chunk(scorer, budget, prefill_chunk)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise KVPError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if not isinstance(sampling, Sampling):
        raise KVPError(f"sampling must be a Sampling(temperature, top_p, seed), got {sampling!r}")
    stop_strings = check_stop_strings(stop_strings)
    for used in (scorer, bounded.scorer if bounded else None):
        if used is not None:
            used.check_model(handle.info)  # a policy trained for another model is refused before any work
    prompts = [split_prompt(handle, c, q, answer_prefix) for c, q in zip(contexts, questions)]
    for context_ids, question_ids in prompts:  # every prompt checked before the first is prefilled
        check_room(handle, context_ids.shape[1] + question_ids.shape[1], max_new_tokens)
    prepared = [_prepare(handle, c, q, scorer, budget, protocol, prefill_chunk) for c, q in prompts]
    state = prepared[0].state if len(prepared) == 1 else stack_states([p.state for p in prepared], pad=True)
    per_row = on_token if batched or on_token is None else (lambda _row, token: on_token(token))
    clock = time.perf_counter()
    answers = decode_answers(handle, state, state.logits, max_new_tokens, bounded=bounded, sampling=sampling,
                             stop_strings=stop_strings, on_token=per_row, drop_finished=batched)
    decode_s = _seconds_since(handle, clock)
    results = []
    for row, answer in zip(prepared, answers):
        timings = row.timings | {"decode_s": decode_s,
                                 "decode_tokens_per_s": len(answer.tokens) / decode_s if decode_s else 0.0}
        results.append(GenerationResult(
            text=cut_at_stop(handle.decode(answer.tokens), stop_strings),
            token_ids=answer.tokens,
            protocol=protocol,
            scorer=scorer.identity() if scorer else None,
            budget=budget.label if budget else None,
            context_tokens=row.context_tokens,
            question_tokens=row.question_tokens,
            cache_tokens_full=row.full_tokens,
            cache_tokens_compressed=row.compressed_tokens,
            cache_bytes_full=row.full_bytes,
            cache_bytes_compressed=row.compressed_bytes,
            stop_reason=answer.stop_reason,
            sampling=sampling,
            timings=timings,
            budget_shortfall=budget.shortfall(row.full_tokens) if budget is not None else None,
            prefill_chunk=prefill_chunk,
            cache_tokens_peak=round(row.peak),
            batch_rows=len(prepared),
        ))
    return results if batched else results[0]

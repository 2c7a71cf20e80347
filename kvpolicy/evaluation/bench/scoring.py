"""Section a: the time to score and evict every layer, as a share of the prefill, for KVP and every baseline (each
with its own allocation: AdaKV's and PyramidKV's counts, KVzap's threshold).

Query-based scorers need the attention inputs of the prompt's last tokens (or all of them), which the prefill
records: that recording is part of their cost, so it is timed too and shown as its own share of the prefill.
KVP is also timed with a chunked prefill (`prefill_chunked`): every cut it makes between chunks and the final one,
as a share of the forward passes of that prefill.
The oracle's cost is a lookup of the true future utility; a random utility of the right shape times it.
"""

from __future__ import annotations

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import evict, prefill, prefill_chunked, rank
from kvpolicy.compression.catalog import CATALOG
from kvpolicy.compression.names import ALLOCATION_MODES, HEAD, with_mode
from kvpolicy.compression.scorers import Scorer, make_scorer
from kvpolicy.compression.scorers.allocated import Allocated
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.bench.timing import essay_ids, kept_budget, timed
from kvpolicy.models import ModelHandle
from kvpolicy.models.attention import ALL_QUERIES
from kvpolicy.progress import bar

WARM_UP_TOKENS = 256  # the warm-up prompt's length (shorter when every context is)


def bench_scorers(handle: ModelHandle, kvp: Scorer, contexts: list[int],
                  keep: float) -> tuple[dict[str, Scorer], dict[str, str]]:
    """(name -> scorer, name -> why it cannot run here): the KVP policy `kvp` (also with a per-layer and a
    model-wide budget, once calibrated) and every scorer of the catalog that can score this model (KVzap needs
    weights trained for it) and cut to the budgets of `contexts` (KVzap's thresholded form keeps 128 entries at
    least); the oracle with a random utility (L, H, the longest context)."""
    info = handle.info
    scorers: dict[str, Scorer] = {"kvp": kvp}
    refused: dict[str, str] = {}
    for mode in (m for m in ALLOCATION_MODES if m != HEAD):  # KVP's budget moved between layers and heads
        why = kvp.incomparable()
        if why is None:
            scorers[with_mode("kvp", mode)] = Allocated(kvp, mode)
        else:
            refused[with_mode("kvp", mode)] = why
    for name, entry in CATALOG.items():
        if entry.needs_utility:
            scorer = make_scorer(name, utility=torch.rand(info.n_layers, info.n_kv_heads, max(contexts)))
        else:
            scorer = make_scorer(name)
        try:
            scorer.check_model(info)
            scorer.check_budgets([kept_budget(context, keep) for context in contexts])
        except KVPError as err:
            refused[name] = str(err)
            continue
        scorers[name] = scorer
    return scorers, refused


def window_label(window: int) -> str:
    """How a prefill's recorded rows are named in the figures: 'none', 'all' or the number of last tokens."""
    return {0: "none", ALL_QUERIES: "all"}.get(window, str(window))


def time_chunked(handle: ModelHandle, scorer: Scorer, ids: torch.Tensor, budget: Budget, chunk: int,
                 repeats: int) -> dict:
    """The best over `repeats` chunked prefills of ids (1, T) cut to `budget` by `scorer` every `chunk` tokens: the
    seconds of every cut (those between chunks and the final one) and of the forward passes, and their ratio."""
    device, best = handle.model.device, None
    for _ in range(repeats):
        (state, done), seconds = timed(lambda: prefill_chunked(handle, ids, scorer, budget, chunk), device)
        _, final = timed(lambda state=state: evict(state, rank(handle, state, scorer), budget, scorer.allocation),
                         device)
        run = {"chunk": chunk, "cuts": done.chunks, "score_evict_s": done.cut_s + final,
               "prefill_s": seconds - done.cut_s}
        best = run if best is None or run["score_evict_s"] < best["score_evict_s"] else best
    return best | {"share_of_prefill": best["score_evict_s"] / best["prefill_s"]}


def time_context(handle: ModelHandle, scorers: dict[str, Scorer], windows: list[int], context: int, keep: float,
                 repeats: int, progress, chunk: int | None = None) -> dict:
    """One context's figures: the prefill time without and with each recording in `windows`, and per scorer the
    best time to rank every layer and evict to keep·context entries per head, as shares of the plain prefill; with
    `chunk`, KVP's cuts through a prefill in chunks of that many tokens too (`time_chunked`)."""
    device = handle.model.device
    ids, budget = essay_ids(handle, context), kept_budget(context, keep)
    prefill(handle, ids)  # warm-up: the first run at a new length sets up kernels
    states, prefill_s = {}, {}
    for window in windows:
        (states[window], _), prefill_s[window] = timed(
            lambda window=window: prefill(handle, ids, record_queries=window), device, repeats)
        progress.update(1)
    plain = prefill_s[0]
    rows = {}
    for name, scorer in scorers.items():
        state = states[scorer.query_window]
        _, seconds = timed(lambda state=state, scorer=scorer: evict(state, rank(handle, state, scorer), budget,
                                                                   scorer.allocation), device, repeats)
        rows[name] = {"recorded_queries": window_label(scorer.query_window), "score_evict_s": seconds,
                      "share_of_prefill": seconds / plain,
                      "recording_share_of_prefill": (prefill_s[scorer.query_window] - plain) / plain}
        progress.update(1)
    chunked = (time_chunked(handle, scorers["kvp"], ids, budget, chunk, repeats)
               if chunk is not None and chunk < context else None)
    return {"budget": budget.tokens, "prefill_s": plain,
            "prefill_recording_s": {window_label(w): prefill_s[w] for w in windows if w != 0}, "scorers": rows,
            "kvp_chunked": chunked}


def warm_up(handle: ModelHandle, scorers: dict[str, Scorer], context: int, budget: Budget) -> None:
    """Run every scorer once, untimed, on a `context`-token prompt cut to `budget` (one every scorer takes): first
    calls load and place what they need (the policy on the cache's device, kvpress's presses), which no later call
    repeats."""
    ids = essay_ids(handle, context)
    state, _ = prefill(handle, ids, record_queries=ALL_QUERIES)  # every row: enough for any query-based scorer
    for scorer in scorers.values():
        evict(state, rank(handle, state, scorer), budget, scorer.allocation)


def measure_scoring(handle: ModelHandle, scorers: dict[str, Scorer], contexts: list[int], keep: float,
                    repeats: int, chunk: int | None = None) -> dict[str, dict]:
    """`time_context` for every context, keyed by its length, after a warm-up of every scorer (with `chunk`, KVP
    through a chunked prefill too, at contexts longer than one chunk)."""
    windows = sorted({s.query_window for s in scorers.values()} | {0}, key=lambda w: (w == ALL_QUERIES, w))
    warm_up(handle, scorers, min(*contexts, WARM_UP_TOKENS), kept_budget(min(contexts), keep))
    with bar(desc="a) scoring", total=len(contexts) * (len(windows) + len(scorers)), unit="timing") as progress:
        return {str(c): time_context(handle, scorers, windows, c, keep, repeats, progress, chunk) for c in contexts}


def print_scoring(figures: dict[str, dict]) -> None:
    """One table per context: ms, share of the prefill, and the recording's share for query-based scorers."""
    for context, fig in figures.items():
        recorded = ", ".join(f"{'all tokens' if rows == 'all' else f'the last {rows}'} {seconds:.2f} s"
                             for rows, seconds in fig["prefill_recording_s"].items())
        print(f"   context {context}: prefill {fig['prefill_s']:.2f} s; recording the query inputs query-based scorers "
              f"need: {recorded}; evict to {fig['budget']} entries per head")
        print(f"   {'scorer':>20} {'score+evict ms':>15} {'% prefill':>10} {'+ recording %':>14}")
        for name, row in fig["scorers"].items():
            extra = f"{100 * row['recording_share_of_prefill']:>13.2f}%" if row["recorded_queries"] != "none" else ""
            print(f"   {name:>20} {1000 * row['score_evict_s']:>15.1f} {100 * row['share_of_prefill']:>9.2f}% {extra}")
        if (chunked := fig.get("kvp_chunked")) is not None:
            print(f"   kvp through a prefill in chunks of {chunked['chunk']} tokens: {chunked['cuts']} chunks, every "
                  f"cut {1000 * chunked['score_evict_s']:.1f} ms, {100 * chunked['share_of_prefill']:.2f}% of its "
                  f"forward passes ({chunked['prefill_s']:.2f} s)")

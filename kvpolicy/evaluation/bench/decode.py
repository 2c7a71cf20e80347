"""Section c: milliseconds per decoded token with the full cache and with one cut to a share of it.

Each step feeds one greedy token through the model on a branch of the prefilled state (the prefill itself is
not timed); the fastest step shows the machine's best, the median its typical pace. The cut's scorer does not
change the decode time. Two things make a naive timing read a difference that is not the cache's:
- the first step at each new cache length can cost far more than later ones at that length (on an H200, about
  57 against 20 ms per step, where attention ran through cuDNN, which plans per shape), so every step sequence is
  run once untimed and timed on its second pass, at lengths seen before;
- the machine's pace can drift, so the full and the compressed cache take turns step by step rather than one
  after the other, and a drift falls on both.
"""

from __future__ import annotations

import statistics

from kvpolicy.compression.engine import compress, prefill
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.compression.state import KVState
from kvpolicy.evaluation.bench.timing import CUT_SCORER, essay_ids, kept_budget, timed
from kvpolicy.models import ModelHandle
from kvpolicy.progress import bar


def step_ms(handle: ModelHandle, states: list[KVState], steps: int) -> list[list[float]]:
    """Per state, the milliseconds of each of `steps` greedy decode steps on a branch of it (left as it was); the
    states take turns step by step, on the second of two identical passes (the first warms every cache length)."""
    _turns(handle, states, steps)
    return _turns(handle, states, steps)


def _turns(handle: ModelHandle, states: list[KVState], steps: int) -> list[list[float]]:
    """One timed pass of `step_ms`: per state, the milliseconds of each step, the states taking turns."""
    work = [state.branch() for state in states]
    tokens = [state.logits.argmax(-1, keepdim=True) for state in states]
    times: list[list[float]] = [[] for _ in states]
    for _ in range(steps):
        for i, branch in enumerate(work):
            (_, logits), seconds = timed(lambda t=tokens[i], b=branch: prefill(handle, t, b), handle.model.device)
            tokens[i] = logits.argmax(-1, keepdim=True)
            times[i].append(1000 * seconds)
    return times


def summary(times: list[float]) -> dict[str, float]:
    """Fastest and median of step times (ms)."""
    return {"fastest_ms": min(times), "median_ms": statistics.median(times)}


def measure_decode(handle: ModelHandle, contexts: list[int], keep: float, steps: int) -> dict[str, dict]:
    """Per context: fastest and median ms/token over `steps` steps, full vs cut to keep·context entries per head,
    and the speed-up (full median / compressed median)."""
    figures = {}
    for context in bar(contexts, desc="c) decode", unit="context"):
        budget = kept_budget(context, keep)
        state, _ = prefill(handle, essay_ids(handle, context))
        small = compress(handle, state, make_scorer(CUT_SCORER), budget)
        full, compressed = map(summary, step_ms(handle, [state, small], steps))
        figures[str(context)] = {"budget": budget.tokens, "steps": steps, "full": full, "compressed": compressed,
                                 "speedup": full["median_ms"] / compressed["median_ms"]}
    return figures


def print_decode(figures: dict[str, dict]) -> None:
    """The table: per context fastest / median ms per token, full and compressed, and the speed-up."""
    first = next(iter(figures.values()))
    print(f"   fastest / median ms per token over {first['steps']} steps (the second of two passes, the caches taking "
          "turns); speed-up = full median / compressed median")
    print(f"   {'context':>8} {'budget':>7} {'full':>17} {'compressed':>17} {'speed-up':>9}")
    for context, fig in figures.items():
        full, small = fig["full"], fig["compressed"]
        print(f"   {context:>8} {fig['budget']:>7} {full['fastest_ms']:>8.1f} / {full['median_ms']:>6.1f} "
              f"{small['fastest_ms']:>8.1f} / {small['median_ms']:>6.1f} {fig['speedup']:>8.2f}x")

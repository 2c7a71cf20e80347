"""Section c: milliseconds per decoded token with the full cache and with one cut to a share of it.

Each step feeds one greedy token through the model on a branch of the prefilled state (the prefill itself is
not timed); the fastest step shows the machine's best, the median its typical pace. The cut's scorer does not
change the decode time. The full and the compressed cache take turns step by step: a small model's decode step
is bound by the host that launches its kernels (on an H200, SmolLM2's GPU work is 2.5 of about 20 ms), and
that host's pace can change for seconds at a time (measured: 20 ms then 55 ms per step for the same cache), which
timing one cache after the other would read as a difference between them.
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
    states take turns step by step."""
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
    print(f"   fastest / median ms per token over {first['steps']} steps; speed-up = full median / compressed median")
    print(f"   {'context':>8} {'budget':>7} {'full':>17} {'compressed':>17} {'speed-up':>9}")
    for context, fig in figures.items():
        full, small = fig["full"], fig["compressed"]
        print(f"   {context:>8} {fig['budget']:>7} {full['fastest_ms']:>8.1f} / {full['median_ms']:>6.1f} "
              f"{small['fastest_ms']:>8.1f} / {small['median_ms']:>6.1f} {fig['speedup']:>8.2f}x")

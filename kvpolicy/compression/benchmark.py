"""Benchmark of the compression engine: `python -m kvpolicy.compression.benchmark [--model M]`.

Prints (1) cache bytes before/after at budgets 256/512/1024 on a 2K-token prompt, (2) the time to score and
evict all layers as a percentage of the 2K prefill for every scorer, (3) decode ms/token with the full and a
compressed cache at 2K and 4K context. Text: the Paul Graham essays.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import evict, prefill, rank
from kvpolicy.compression.scorers import ALL_QUERIES, SCORERS, make_scorer
from kvpolicy.compression.state import KVState
from kvpolicy.data.essays import haystack_text
from kvpolicy.models import ModelHandle, load_model


def timed(fn: Callable, repeats: int = 1):
    """(result of the last call, best wall time in seconds over `repeats` calls)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def decode_ms_per_token(handle: ModelHandle, state: KVState, tokens: int) -> tuple[float, float]:
    """(fastest, median) milliseconds of one greedy decode step over `tokens` steps on a branch of `state`."""
    work, token, steps = state.branch(), state.logits.argmax(-1, keepdim=True), []
    for _ in range(tokens):
        (_, logits), seconds = timed(lambda token=token: prefill(handle, token, work))
        token = logits.argmax(-1, keepdim=True)
        steps.append(1000 * seconds)
    steps.sort()
    return steps[0], steps[len(steps) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens timed per decode measurement")
    parser.add_argument("--decode-budget", type=int, default=256, help="budget of the compressed decode runs")
    parser.add_argument("--checkpoint", help="also time a learned policy (kvp:CHECKPOINT)")
    parser.add_argument("--threads", type=int, help="torch threads (on a shared machine 1 avoids thread contention)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    handle = load_model(args.model)
    ids = handle.encode(haystack_text()[:40_000])[:, :4096]
    prefill(handle, ids[:, :64])  # warm-up
    print(f"model {handle.info.name}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; prompts from the Paul Graham essays; times are the best of repeats")

    (full, _), prefill_s = timed(lambda: prefill(handle, ids[:, :2048]), repeats=3)
    (recorded, _), recorded_s = timed(lambda: prefill(handle, ids[:, :2048], record_queries=ALL_QUERIES))
    print(f"\nprefill 2048 tokens: {prefill_s:.2f} s "
          f"({recorded_s:.2f} s while recording every query's attention inputs)")

    print("\n1) cache size on the 2048-token prompt (knorm ranking)")
    scores = rank(handle, full, make_scorer("knorm"))
    print(f"   {'budget':>8} {'bytes before':>14} {'bytes after':>14} {'after/before':>13} {'budget/2048':>12}")
    for b in (256, 512, 1024):
        small = evict(full, scores, Budget(tokens=b))
        before, after = full.nbytes(), small.nbytes()
        print(f"   {b:>8} {before:>14,} {after:>14,} {after / before:>13.4f} {b / 2048:>12.4f}")

    print("\n2) score + evict all layers (budget 512) as a share of the 2048-token prefill")
    names = [n for n in SCORERS if n != "oracle"] + ["oracle"] + ([f"kvp:{args.checkpoint}"] if args.checkpoint else [])
    print(f"   {'scorer':>20} {'ms':>9} {'% prefill':>10}")
    for name in names:
        if name == "oracle":  # the oracle's cost is a lookup; any utility tensor times it
            scorer = make_scorer(name, utility=torch.rand(handle.info.n_layers, handle.info.n_kv_heads, 2048))
        else:
            scorer = make_scorer(name)
        state = full if scorer.attention_free else recorded
        _, seconds = timed(
            lambda state=state, scorer=scorer: evict(state, rank(handle, state, scorer), Budget(tokens=512)), repeats=3
        )
        print(f"   {name:>20} {1000 * seconds:>9.1f} {100 * seconds / prefill_s:>9.2f}%")

    print(f"\n3) decode ms/token, full cache vs compressed to {args.decode_budget} (knorm), fastest / median of "
          f"{args.decode_tokens} steps")
    print(f"   {'context':>8} {'full':>17} {'compressed':>17}")
    for length in (2048, 4096):
        state = full if length == 2048 else prefill(handle, ids[:, :length])[0]
        small = evict(state, rank(handle, state, make_scorer("knorm")), Budget(tokens=args.decode_budget))
        full_best, full_mid = decode_ms_per_token(handle, state, args.decode_tokens)
        small_best, small_mid = decode_ms_per_token(handle, small, args.decode_tokens)
        print(f"   {length:>8} {full_best:>8.1f} / {full_mid:>6.1f} {small_best:>8.1f} / {small_mid:>6.1f}")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

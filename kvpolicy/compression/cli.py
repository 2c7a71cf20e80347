"""`kvp generate`: answer a prompt with a compressed KV cache and show how much the cache shrank."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpolicy.compression.names import LEARNED_PREFIX, SCORER_NAMES
    from kvpolicy.models.registry import DEFAULT_MODEL
    from kvpolicy.policy.config import RECENT, SINKS

    parser.add_argument("prompt", help="the context (or the whole prompt when no --question is given)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or HF directory (default {DEFAULT_MODEL})")
    scorers = ", ".join(n for n in SCORER_NAMES if n != "oracle")  # the oracle needs traces: sweeps only
    parser.add_argument("--scorer", default="knorm",
                        help=f"eviction scorer: {scorers}, or {LEARNED_PREFIX}CHECKPOINT (default knorm)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", type=int, help="entries kept per KV head (sinks and recent included)")
    size.add_argument("--ratio", type=float, help="fraction of entries removed instead (kvpress compression ratio)")
    parser.add_argument("--protocol", default="query-aware", choices=("query-aware", "question-agnostic"),
                        help="compress after the question (query-aware) or before reading it (question-agnostic)")
    parser.add_argument("--question", default="", help="question appended after the context")
    parser.add_argument("--answer-prefix", default="", help="text the answer starts with")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=SINKS, help=f"first positions always kept (default {SINKS})")
    parser.add_argument("--recent", type=int, default=RECENT, help=f"last positions always kept (default {RECENT})")
    parser.add_argument("--bounded-every", type=int, default=0, metavar="N",
                        help="also keep the cache within budget + N while decoding (attention-free scorers)")


def _size(tokens: int, nbytes: int) -> str:
    return f"{tokens} entries per KV head, {nbytes:,} bytes ({nbytes / 2**20:.2f} MiB)"


def run(args: argparse.Namespace) -> int:
    from kvpolicy.compression.budget import Budget
    from kvpolicy.compression.engine import BoundedDecoding, generate
    from kvpolicy.compression.scorers import make_scorer
    from kvpolicy.models import load_model

    from kvpolicy.errors import KVPError

    if args.max_new_tokens < 0:
        raise KVPError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (args.prompt + args.question).strip():
        raise KVPError("the prompt is empty: give the context as the first argument (and a --question)")
    scorer = make_scorer(args.scorer)
    budget = Budget(tokens=args.budget, ratio=args.ratio, sinks=args.sinks, recent=args.recent)
    bounded = BoundedDecoding(scorer, budget, args.bounded_every) if args.bounded_every else None
    handle = load_model(args.model)
    scorer.check_model(handle.info)
    result = generate(handle, args.prompt, args.question, scorer, budget, args.protocol, args.max_new_tokens,
                      args.answer_prefix, bounded)
    layers, heads = handle.info.n_layers, handle.info.n_kv_heads
    print(result.text)
    print(f"\nscorer {args.scorer}, budget {budget.label}, protocol {result.protocol}, "
          f"{result.context_tokens + result.question_tokens} prompt tokens ({layers} layers x {heads} KV heads)")
    print(f"cache before: {_size(result.cache_tokens_full, result.cache_bytes_full)}")
    print(f"cache after:  {_size(result.cache_tokens_compressed, result.cache_bytes_compressed)}")
    if result.budget_shortfall:
        print(f"note: {result.budget_shortfall}")
    return 0

"""`kvp generate`: answer a prompt with a compressed KV cache, streaming the answer, and show how much the cache
shrank (or print one JSON record with --json)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpolicy.compression.catalog import CATALOG
    from kvpolicy.compression.names import ALLOCATION_MODES, HEAD, LEARNED_PREFIX
    from kvpolicy.compression.protocols import PROTOCOLS, QUERY_AWARE
    from kvpolicy.models.placement import add_placement_arguments
    from kvpolicy.models.registry import DEFAULT_MODEL
    from kvpolicy.policy.config import RECENT, SINKS

    parser.add_argument("prompt", nargs="?",
                        help="the context (or the whole prompt when no --question is given); - reads it from stdin")
    parser.add_argument("--prompt-file", metavar="PATH", help="read the prompt from this UTF-8 text file instead")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or HF directory (default {DEFAULT_MODEL})")
    add_placement_arguments(parser)
    scorers = ", ".join(n for n, e in CATALOG.items() if not e.needs_utility)  # the oracle needs traces: sweeps only
    parser.add_argument("--scorer", default="knorm",
                        help=f"eviction scorer: {scorers}, kvp (the policy bundled for --model), "
                        f"{LEARNED_PREFIX}MODEL (a bundled policy) or {LEARNED_PREFIX}CHECKPOINT (default knorm)")
    parser.add_argument("--allocation", default=HEAD, choices=tuple(ALLOCATION_MODES),
                        help="how the budget spreads: head (every KV head keeps it; default), layer (a layer's heads "
                        "share one count, layers differ), model (each head its own count from one pool); always "
                        "the memory of the uniform cut (also as a --scorer suffix: NAME@model)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", type=int, help="entries kept per KV head (sinks and recent included)")
    size.add_argument("--ratio", type=float, help="fraction of entries removed instead (kvpress compression ratio)")
    parser.add_argument("--protocol", default=QUERY_AWARE, choices=tuple(PROTOCOLS),
                        help="; ".join(f"{name}: {what}" for name, what in PROTOCOLS.items())
                        + f" (default {QUERY_AWARE})")
    parser.add_argument("--question", default="", help="question appended after the context")
    parser.add_argument("--answer-prefix", default="", help="text the answer starts with")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 (default) picks the most likely token (greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="sample from the smallest set of likeliest tokens whose probability reaches P (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling, for a reproducible answer")
    parser.add_argument("--stop", action="append", default=[], metavar="STRING",
                        help="stop when the answer contains STRING, and cut it there (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (answer, tokens, cache sizes, timings) instead of streaming")
    parser.add_argument("--sinks", type=int, default=SINKS, help=f"first positions always kept (default {SINKS})")
    parser.add_argument("--recent", type=int, default=RECENT, help=f"last positions always kept (default {RECENT})")
    parser.add_argument("--bounded-every", type=int, default=0, metavar="N",
                        help="also keep the cache within budget + N while decoding (attention-free scorers)")
    parser.add_argument("--prefill-chunk", type=int, default=None, metavar="C",
                        help="prefill C tokens at a time and cut the cache back to the budget after each chunk: it "
                             "never holds more than budget + C entries per head (default: the whole prompt at once)")


def _size(tokens: int, nbytes: int) -> str:
    return f"{tokens} entries per KV head, {nbytes:,} bytes ({nbytes / 2**20:.2f} MiB)"


def _read_prompt(args: argparse.Namespace) -> str:
    """The context from exactly one source: the argument, stdin (argument `-`) or --prompt-file."""
    from kvpolicy.errors import KVPError
    from kvpolicy.io import read_text_file

    if args.prompt is not None and args.prompt_file is not None:
        raise KVPError("give the prompt either as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        return read_text_file(args.prompt_file, "prompt file", "give the path of a UTF-8 text file")
    if args.prompt is None:
        raise KVPError("no prompt: give it as an argument, - to read it from stdin, or --prompt-file PATH")
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    import json

    from kvpolicy.compression.budget import Budget
    from kvpolicy.compression.catalog import CATALOG
    from kvpolicy.compression.engine import BoundedDecoding, check_prefill_chunk, generate
    from kvpolicy.compression.names import HEAD, split_mode, with_mode
    from kvpolicy.compression.scorers import named_scorer
    from kvpolicy.errors import KVPError
    from kvpolicy.models import load_model
    from kvpolicy.models.decoding import Sampling, check_stop_strings
    from kvpolicy.models.text_stream import TextStream

    if args.max_new_tokens < 0:
        raise KVPError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    stops = check_stop_strings(args.stop)
    base, named = split_mode(args.scorer)  # `--scorer knorm@model` names its allocation too
    if HEAD not in (named, args.allocation) and named != args.allocation:
        raise KVPError(f"--scorer {args.scorer} asks for the {named} allocation and --allocation for "
                       f"{args.allocation}; give one")
    allocation = args.allocation if named == HEAD else named
    if (entry := CATALOG.get(base)) is not None and entry.needs_utility:
        raise KVPError(f"scorer '{base}' ranks by the true future utility, which only recorded traces hold: "
                       "kvp sweep runs it on traces, kvp generate cannot; choose another scorer")
    scorer = named_scorer(with_mode(base, allocation), args.model)  # plain "kvp": the policy bundled for --model
    budget = Budget(tokens=args.budget, ratio=args.ratio, sinks=args.sinks, recent=args.recent)
    bounded = BoundedDecoding(scorer, budget, args.bounded_every) if args.bounded_every else None
    if args.prefill_chunk is not None:
        check_prefill_chunk(scorer, budget, args.prefill_chunk)
    prompt = _read_prompt(args)
    if not (prompt + args.question).strip():
        raise KVPError("the prompt is empty: give the context (an argument, - for stdin, or --prompt-file PATH) "
                       "and/or a --question")
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    stream = None if args.json else TextStream(handle.decode, stops)
    on_token = None if stream is None else (lambda token: _write(stream.push(token)))
    result = generate(handle, prompt, args.question, scorer, budget, args.protocol, args.max_new_tokens,
                      args.answer_prefix, bounded, sampling, stops, on_token, args.prefill_chunk)
    if args.json:
        print(json.dumps({"model": handle.info.name, "allocation": allocation, **result.to_dict()}))
        return 0
    _write(stream.finish(result.text) + "\n")
    layers, heads = handle.info.n_layers, handle.info.n_kv_heads
    print(f"\nscorer {base}, budget {budget.label} ({allocation} allocation), protocol {result.protocol}, "
          f"{result.prompt_tokens} prompt tokens ({layers} layers x {heads} KV heads)")
    print(f"cache before: {_size(result.cache_tokens_full, result.cache_bytes_full)}")
    if result.prefill_chunk is not None:
        print(f"prefill in chunks of {result.prefill_chunk} tokens, cut after each: at most {result.cache_tokens_peak} "
              "entries per KV head held")
    print(f"cache after:  {_size(result.cache_tokens_compressed, result.cache_bytes_compressed)}")
    if bounded is not None:
        print(f"while decoding: at most {budget.tokens + bounded.every} entries per KV head, cut back to "
              f"{budget.tokens} every {bounded.every} tokens")
    print(f"decode: {len(result.token_ids)} tokens in {result.timings['decode_s']:.2f} s "
          f"({result.timings['decode_tokens_per_s']:.1f} tokens/s), stopped by {result.stop_reason}")
    if result.budget_shortfall:
        print(f"note: {result.budget_shortfall}")
    return 0

"""`kvp traces`: record future-utility training traces; under `torchrun --nproc_per_node K` the ranks split them.

    kvp traces --model smollm2-135m --source ruler --split train --n 64 --context 2048 --future-tokens 300 --out DIR
    torchrun --nproc_per_node 2 -m kvpolicy.cli -- traces ... --out DIR

(the "--" stops torchrun's own parser from taking `--n` for an abbreviation of its `--nnodes`/`--nproc-per-node`).

Each rank writes its own shards; once all ranks are done rank 0 writes the one manifest
(kvpolicy.traces.pipeline.record_on_every_rank). Re-running the same command resumes: complete shards are kept and
their samples skipped.
"""

from __future__ import annotations

import argparse

from kvpolicy.models.placement import add_placement_arguments
from kvpolicy.models.registry import DEFAULT_MODEL
from kvpolicy.traces.config import BASELINES, DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, DEFAULT_SHARD_SECONDS
from kvpolicy.traces.future import CUTS_AT, END, FUTURE_MODES, FutureConfig
from kvpolicy.traces.sources import SOURCES, TRACE_SPLITS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered model name or HF directory")
    parser.add_argument("--source", required=True, choices=SOURCES, help="training prompts: RULER-style tasks, "
                        "ShareGPT dialogues (stand-in for OASST2), long-dialogue (the same, cut from whole "
                        "conversations: prompts beyond ShareGPT's ~2K-token parts), plain essay continuation, plain "
                        "continuation of the Python standard library's sources, or mix (ruler, dialogue and essays "
                        "at 0.5x, 1x and 2x --context; with code, the general-purpose policy's recipe)")
    parser.add_argument("--split", default="train", choices=TRACE_SPLITS)
    parser.add_argument("--n", type=int, required=True, help="number of prompts (samples 0..n-1 of the split)")
    parser.add_argument("--context", type=int, default=2048, help="prompt length in the model's tokens")
    parser.add_argument("--future-tokens", type=int, default=300, help="future length F (paper: 300)")
    parser.add_argument("--future", default="greedy", choices=FUTURE_MODES,
                        help="greedy: the model's own continuation; reference: the data's, teacher-forced")
    parser.add_argument("--cut-at", default=END, choices=CUTS_AT,
                        help="where each trace's cache ends: the end of the prompt (the future is the "
                        "continuation; for a cache cut once after the prefill), or mid-prompt (at 1/4 to 3/4 of it, "
                        "drawn per sample; the future is the rest of the prompt, then the continuation: what a cut "
                        "between the chunks of a chunked prefill serves)")
    parser.add_argument("--seed", type=int, default=0, help="RULER generator seed (and the mid-prompt cuts')")
    parser.add_argument("--tasks", help="comma-separated RULER tasks (default: all)")
    parser.add_argument("--baselines", default="auto",
                        help=f"query-based baseline scores stored per sample for the ranking benchmark: a comma list "
                        f"of {', '.join(BASELINES)}, 'none', or 'auto' (all on val/test, none on train)")
    parser.add_argument("--hidden-states", action="store_true",
                        help="also store every layer's input hidden state of each prompt token (1.5x the keys and "
                             "values on SmolLM2, 3.5x on Qwen2.5-0.5B), for policies that read them (`kvp train "
                             "--hidden-states`)")
    parser.add_argument("--shard-mb", type=int, default=DEFAULT_SHARD_BYTES >> 20, help="target shard size in MiB")
    parser.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES,
                        help="write a shard after at most this many samples (a killed run keeps finished shards)")
    parser.add_argument("--shard-seconds", type=float, default=DEFAULT_SHARD_SECONDS,
                        help="write a shard at most this many seconds after its first sample")
    parser.add_argument("--out", required=True, help="output directory (resumable)")
    add_placement_arguments(parser)


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip() and t.strip() != "none")


def run(args: argparse.Namespace) -> int:
    from kvpolicy.models.placement import resolve_device, resolve_dtype
    from kvpolicy.traces.pipeline import TraceRunConfig, record_on_every_rank

    device = resolve_device(args.device)  # a CUDA request without CUDA, a bad dtype: one line before any work
    resolve_dtype(args.dtype, device)
    cfg = TraceRunConfig(
        source=args.source, split=args.split, n=args.n, context_tokens=args.context,
        future=FutureConfig(args.future, args.future_tokens, args.cut_at), seed=args.seed,
        tasks=_names(args.tasks) or None,
        baselines=None if args.baselines == "auto" else _names(args.baselines), shard_bytes=args.shard_mb << 20,
        shard_samples=args.shard_samples, shard_seconds=args.shard_seconds, hidden_states=args.hidden_states,
    )
    result = record_on_every_rank(args.model, cfg, args.out, device, args.dtype)
    if result.manifest is not None:
        m = result.manifest
        print(f"{m['n_samples']} traces ({m['prompt_tokens']} prompt tokens) of {result.model_name} in {args.out}: "
              f"{result.recorded} recorded now, {result.skipped} were already there; {m['generation_seconds']:.1f} s "
              f"of generation in total, {result.wall_seconds:.1f} s wall for this run")
    return 0

"""`kvp bench`: one command that prints kvpolicy's costs and savings, each a ratio of two figures measured side by
side in one run (sections a-e; the ranking section with --traces and --val), and writes them all with --json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from kvpolicy.evaluation.bench.config import LONG_RUNS, SECTIONS, BenchConfig

if TYPE_CHECKING:
    from kvpolicy.models import ModelHandle

_DEFAULTS = BenchConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpolicy.models.placement import add_placement_arguments
    from kvpolicy.models.registry import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or HF directory (default {DEFAULT_MODEL})")
    add_placement_arguments(parser)
    parser.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), metavar="S",
                        help="run only these: a (scoring cost), b (memory), c (decode speed), d (answers vs kvpress), "
                             "e (traces + training), f (peak memory of a chunked prefill), g (a needle in a long "
                             "prompt through a chunked prefill), h (model.generate on an EvictingCache, batched), "
                             "ranking; default a-e, plus ranking with --traces "
                             "and --val")
    parser.add_argument("--policy", metavar="CKPT",
                        help="the KVP policy sections a and d time (a `kvp train` checkpoint); default: the one "
                             "section e trains on its short traces (timing does not depend on its quality)")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(_DEFAULTS.contexts), metavar="T",
                        help="prompt lengths of sections a and c; d uses the first, b the longest (default "
                             f"{' '.join(map(str, _DEFAULTS.contexts))})")
    parser.add_argument("--keep", type=float, default=_DEFAULTS.keep,
                        help=f"share of the cache a compressed run keeps in a, c and d (default {_DEFAULTS.keep}: a "
                             f"{100 * _DEFAULTS.keep:.0f}%% budget, kvpress compression ratio {1 - _DEFAULTS.keep})")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(_DEFAULTS.budgets), metavar="B",
                        help="entries kept per KV head in section b and the ranking section (default "
                             f"{' '.join(map(str, _DEFAULTS.budgets))})")
    parser.add_argument("--allocation", nargs="+", default=list(_DEFAULTS.allocations), metavar="MODE",
                        help="allocation modes section b measures each budget in (default "
                             f"{' '.join(_DEFAULTS.allocations)}; see kvp generate --help)")
    parser.add_argument("--decode-tokens", type=int, default=_DEFAULTS.decode_tokens,
                        help=f"decode steps timed per cache in section c (default {_DEFAULTS.decode_tokens})")
    parser.add_argument("--answer-tokens", type=int, default=_DEFAULTS.answer_tokens,
                        help=f"max_new_tokens of section d's answers (default {_DEFAULTS.answer_tokens})")
    parser.add_argument("--repeats", type=int, default=_DEFAULTS.repeats,
                        help=f"timings are the best of this many runs (default {_DEFAULTS.repeats})")
    parser.add_argument("--trace-n", type=int, default=_DEFAULTS.trace_n,
                        help=f"training traces section e records (default {_DEFAULTS.trace_n})")
    parser.add_argument("--trace-context", type=int, default=_DEFAULTS.trace_context,
                        help=f"their prompt tokens (default {_DEFAULTS.trace_context})")
    parser.add_argument("--trace-future", type=int, default=_DEFAULTS.trace_future,
                        help=f"their greedy future's maximum tokens (default {_DEFAULTS.trace_future})")
    parser.add_argument("--train-steps", type=int, default=_DEFAULTS.train_steps,
                        help=f"training steps of section e (default {_DEFAULTS.train_steps})")
    parser.add_argument("--train-shape", nargs="+", default=[], metavar="LxHxD",
                        help="section e also times training for a model of this KV-cache shape (layers x KV heads x "
                             "head dim, e.g. 28x4x128 for Qwen2.5-7B) on synthetic traces, without that model")
    parser.add_argument("--peak-contexts", type=int, nargs="+", default=list(_DEFAULTS.peak_contexts), metavar="T",
                        help="section f's prompt lengths (default "
                             f"{' '.join(map(str, _DEFAULTS.peak_contexts))}; those the model has no positions for "
                             "are left out)")
    parser.add_argument("--peak-budget", type=int, default=_DEFAULTS.peak_budget,
                        help=f"section f's budget, entries per KV head (default {_DEFAULTS.peak_budget})")
    parser.add_argument("--prefill-chunk", type=int, default=_DEFAULTS.prefill_chunk, metavar="C",
                        help=f"chunk size of sections f and g, and of section a's chunked KVP row (default "
                             f"{_DEFAULTS.prefill_chunk})")
    parser.add_argument("--peak-reference", type=int, default=_DEFAULTS.peak_reference, metavar="T",
                        help="prompt length of section f's full-cache reference row (default "
                             f"{_DEFAULTS.peak_reference})")
    parser.add_argument("--batch-rows", type=int, default=_DEFAULTS.batch_rows, metavar="N",
                        help=f"prompts section h decodes in one batch (default {_DEFAULTS.batch_rows})")
    parser.add_argument("--long-context", type=int, default=_DEFAULTS.long_context, metavar="T",
                        help=f"section g's prompt length (default {_DEFAULTS.long_context})")
    parser.add_argument("--needle-depths", type=float, nargs="+", default=list(_DEFAULTS.needle_depths),
                        metavar="D", help="section g's needle depths, fractions of the prompt (default "
                                          f"{' '.join(map(str, _DEFAULTS.needle_depths))})")
    parser.add_argument("--long-runs", nargs="+", choices=LONG_RUNS, default=list(_DEFAULTS.long_runs), metavar="R",
                        help="how section g answers each long needle prompt: chunked (prefilled --prefill-chunk tokens "
                             "at a time, cut after each), compress-once (one cut after the whole prefill), full (the "
                             "full cache); the last two tell the length and the policy apart from the chunking "
                             f"(default {' '.join(_DEFAULTS.long_runs)})")
    parser.add_argument("--traces", metavar="DIR", help="ranking section: training traces (from `kvp traces`)")
    parser.add_argument("--val", metavar="DIR", help="ranking section: validation traces")
    parser.add_argument("--test", metavar="DIR", help="ranking section: held-out traces to report on (default --val)")
    parser.add_argument("--threads", type=int, help="torch threads (on a shared machine fewer avoid contention)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")


def _load_average() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def _section(section: str, handle: ModelHandle, config: BenchConfig, args: argparse.Namespace, policy: Path | None,
             work: Path) -> dict:
    """Measure one section, print its table and return its figures (policy: the KVP checkpoint a and d time)."""
    from kvpolicy.compression.scorers import LEARNED_PREFIX, make_scorer
    from kvpolicy.evaluation.bench import (answers, decode, generate_path, long_context, memory, ranking_quality,
                                           scoring, throughput)
    from kvpolicy.evaluation.bench.timing import kept_budget

    contexts = list(config.contexts)
    if section in ("a", "d"):
        origin = "--policy" if args.policy else "trained in section e; timing does not depend on its quality"
        print(f"   KVP policy: {policy} ({origin})")
        kvp = make_scorer(f"{LEARNED_PREFIX}{policy}", model=handle.info)
    if section == "a":
        scorers, refused = scoring.bench_scorers(handle, kvp, contexts, config.keep)
        for name, why in refused.items():
            print(f"   {name} left out: {why}")
        figures = scoring.measure_scoring(handle, scorers, contexts, config.keep, config.repeats, config.prefill_chunk)
        scoring.print_scoring(figures)
    elif section == "b":
        figures = memory.measure_memory(handle, max(contexts), list(config.budgets), config.allocations)
        memory.print_memory(figures)
    elif section == "c":
        figures = decode.measure_decode(handle, contexts, config.keep, config.decode_tokens)
        decode.print_decode(figures)
    elif section == "d":
        figures = answers.measure_answers(handle, kvp, contexts[0], 1 - config.keep, config.answer_tokens,
                                          config.repeats)
        answers.print_answers(figures)
    elif section == "f":
        figures = memory.measure_peak(handle, list(config.peak_contexts), config.peak_budget, config.prefill_chunk,
                                      config.peak_reference)
        memory.print_peak(figures)
    elif section == "g":
        scorer = f"{LEARNED_PREFIX}{policy or handle.info.name}"  # the bundled policy without --policy
        figures = long_context.measure_long_context(handle, scorer, config.long_context, list(config.needle_depths),
                                                    config.peak_budget, config.prefill_chunk, config.peak_reference,
                                                    config.long_runs)
        long_context.print_long_context(figures)
    elif section == "h":
        kvp = make_scorer(f"{LEARNED_PREFIX}{policy or handle.info.name}", model=handle.info)
        print(f"   KVP policy: {policy or 'bundled for ' + handle.info.name}")
        figures = generate_path.measure_generate_path(handle, kvp, contexts[0], kept_budget(contexts[0], config.keep),
                                                      config.answer_tokens, config.batch_rows, config.repeats)
        generate_path.print_generate_path(figures)
    elif section == "e":
        from kvpolicy.traces.store import TraceReader

        traces, device = work / "traces", handle.model.device.type
        figures = {
            "traces": throughput.measure_traces(handle, config.trace_n, config.trace_context, config.trace_future,
                                                traces),
            "training": throughput.measure_training(TraceReader(traces), config.train_steps, work / "kvp", device),
            "training_at_shape": [
                throughput.measure_training(throughput.synthetic_at_shape(shape), config.train_steps,
                                            work / f"kvp-{'x'.join(map(str, shape))}", device) | {"synthetic": True}
                for shape in config.train_shapes],
        }
        throughput.print_throughput(figures)
    else:
        figures = ranking_quality.measure_ranking(args.traces, args.val, args.test, args.policy and Path(args.policy),
                                          list(config.budgets), work)
        ranking_quality.print_ranking(figures)
    return figures


def run(args: argparse.Namespace) -> int:
    import os
    import tempfile
    import time
    from dataclasses import asdict

    import torch

    from kvpolicy.compression.scorers import LEARNED_PREFIX, make_scorer
    from kvpolicy.errors import KVPError
    from kvpolicy.evaluation.bench.config import parse_shape, plan_sections
    from kvpolicy.io import check_writable, write_json
    from kvpolicy.models import load_model

    config = BenchConfig(tuple(args.contexts), args.keep, tuple(args.budgets), args.decode_tokens, args.answer_tokens,
                         args.repeats, args.trace_n, args.trace_context, args.trace_future, args.train_steps,
                         tuple(parse_shape(s) for s in args.train_shape), tuple(args.allocation),
                         tuple(args.peak_contexts), args.peak_budget, args.prefill_chunk, args.peak_reference,
                         args.long_context, tuple(args.needle_depths), args.batch_rows, tuple(args.long_runs))
    if (args.traces is None) != (args.val is None):
        raise KVPError("the ranking section needs both --traces DIR and --val DIR")
    if args.threads is not None and args.threads < 1:
        raise KVPError(f"--threads must be >= 1, got {args.threads}")
    if args.json:
        check_writable(args.json, "the --json file")
    policy = Path(args.policy) if args.policy else None
    order = plan_sections(args.sections, args.traces is not None, policy is not None)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), _load_average()
    handle = load_model(args.model, device=args.device, dtype=args.dtype)
    if policy is not None:
        make_scorer(f"{LEARNED_PREFIX}{policy}", model=handle.info)  # a policy for another model: refused now
    dtype = handle.dtype_name
    machine = {"model": handle.info.name, "device": str(handle.model.device), "dtype": dtype,
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average_start": load_start}
    print(f"kvp bench: {handle.info.name} on {machine['device']} ({dtype}), torch {machine['torch_threads']} threads, "
          f"{machine['cpu_count']} CPUs, load average {' '.join(map(str, load_start))} (1, 5, 15 min)")
    print(f"sections {' '.join(order)}; prompts cut from the Paul Graham essays; times are the best of "
          f"{config.repeats} runs; progress on stderr")
    report = {"machine": machine, "config": asdict(config), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="kvp-bench-") as tmp:
        work = Path(tmp)
        for section in order:
            print(f"\n{section}) {SECTIONS[section]}")
            report["sections"][section] = _section(section, handle, config, args, policy, work)
            policy = policy or (work / "kvp" if section == "e" else None)
    machine["load_average_end"] = _load_average()
    machine["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\nload average at the end {' '.join(map(str, machine['load_average_end']))}; "
          f"bench took {machine['wall_s']:.0f} s")
    if args.json:
        write_json(args.json, report)
        print(f"figures written to {args.json}")
    return 0

"""`kvp sweep`: evaluate models × scorers × budgets × tasks × protocols into a resumable JSONL results file; under
`torchrun --nproc_per_node K` the ranks share the work (kvpolicy.evaluation.sweep). It then prints the results'
summary and, with --report, writes the report: it drives evaluation and report, so it sits on top of both."""

from __future__ import annotations

import argparse

from kvpolicy.errors import KVPError

EPILOG = ("Several processes share one sweep: run `torchrun --nproc_per_node K -m kvpolicy.cli -- sweep ...` (the "
          '"--" keeps torchrun from reading --n as one of its own options), or start several `kvp sweep` on one --out. '
          "Each rank starts with its own share of the work units, then takes over what no rank has begun; every "
          "result is written once into --out, and rank 0 alone shows progress, prints the summary and writes "
          "--report. Ranks on several nodes need --out on a filesystem they all share, with working POSIX locks.")


def _split(values: list[str]) -> list[str]:
    """Accept both `--budget 128 256` and `--budget 128,256`."""
    return [v for value in values for v in value.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpolicy.compression.catalog import SWEEP, default_lineup, needs_utility, scorer_names
    from kvpolicy.compression.names import ALLOCATION_MODES, HEAD, LEARNED_PREFIX
    from kvpolicy.evaluation.names import DEFAULT_EVERY, PROTOCOLS
    from kvpolicy.evaluation.tasks import task_help
    from kvpolicy.models.placement import add_placement_arguments
    from kvpolicy.models.registry import DEFAULT_MODEL

    parser.epilog = EPILOG
    parser.add_argument("--out", required=True, help="JSONL results file (created, or resumed when it exists)")
    parser.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], help="model names (kvp models)")
    parser.add_argument("--scorer", nargs="+", default=list(default_lineup(SWEEP)),
                        help=f"scorers: {' '.join(scorer_names())} ({', '.join(needs_utility())}: traces only) "
                        f"{LEARNED_PREFIX}CHECKPOINT (default: {' '.join(default_lineup(SWEEP))})")
    parser.add_argument("--allocation", nargs="+", default=[HEAD], choices=tuple(ALLOCATION_MODES),
                        help="allocation modes, each scorer in each (default head; see kvp generate --help); a "
                        "--scorer spec NAME@MODE names one directly")
    parser.add_argument("--budget", nargs="+", default=["128", "256", "512"],
                        help="tokens kept per KV head (256) or compression ratios (0.5 or r0.5)")
    parser.add_argument("--task", nargs="+", default=["ruler"], help=task_help())
    parser.add_argument("--protocol", nargs="+", default=[],
                        help=f"{', '.join(PROTOCOLS)} (default: each task's own)")
    parser.add_argument("--context", nargs="+", default=["2048"], help="context lengths in tokens (sized tasks)")
    parser.add_argument("--every", nargs="+", default=[str(DEFAULT_EVERY)], metavar="N",
                        help="longgen tasks: tokens fed between two cuts of the bounded cache (results for each N)")
    parser.add_argument("--prefill-chunk", nargs="+", default=[], metavar="C",
                        help="QA and dialogue (prompt-once) tasks: also prefill the prompt C tokens at a time, cut "
                             "back to the budget after each chunk (results for each C, beside compress-once)")
    parser.add_argument("--n", type=int, default=5, help="samples per task (and context length)")
    parser.add_argument("--seed", type=int, default=0, help="sample seed")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="cap on generated tokens (0: the task's own)")
    parser.add_argument("--no-full-cache", action="store_true", help="skip the uncompressed reference")
    parser.add_argument("--hub-local", nargs="*", default=[], metavar="NAME=FILE",
                        help="read a hub dataset from a local file in its schema (e.g. boolq=boolq.jsonl)")
    parser.add_argument("--report", metavar="DIR", help="also write the report into DIR when the sweep is done")
    add_placement_arguments(parser)


def _whole_numbers(option: str, values: list[str]) -> list[int]:
    """`--option 64 128` or `--option 64,128` as whole numbers of tokens."""
    try:
        return [int(v) for v in _split(values)]
    except ValueError:
        raise KVPError(f"{option} takes whole numbers of tokens, got {values}") from None


def _hub_local(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise KVPError(f"--hub-local takes NAME=FILE pairs, got '{pair}'")
        out[name] = path
    return out


def run(args: argparse.Namespace) -> int:
    from kvpolicy.compression.names import with_mode
    from kvpolicy.evaluation.sweep import SweepConfig, run_sweep
    from kvpolicy.io import check_writable
    from kvpolicy.report.summary import print_summary

    contexts, every = _whole_numbers("--context", args.context), _whole_numbers("--every", args.every)
    chunks = _whole_numbers("--prefill-chunk", args.prefill_chunk)
    config = SweepConfig(
        out=args.out, models=_split(args.model), budgets=_split(args.budget),
        scorers=[with_mode(spec, mode) for spec in _split(args.scorer) for mode in args.allocation],
        tasks=_split(args.task), protocols=_split(args.protocol), context_tokens=contexts, n_samples=args.n,
        seed=args.seed, max_new_tokens=args.max_new_tokens, full_cache=not args.no_full_cache,
        hub_local=_hub_local(args.hub_local), device=args.device, dtype=args.dtype, every=every,
        prefill_chunks=chunks,
    )
    if args.report:
        check_writable(args.report, "report directory", directory=True)  # before the sweep, not after it
    result = run_sweep(config)  # under torchrun: returns once every rank's results are in
    if result.rank:
        return 0
    by_rank = ", ".join(f"rank {r}: {n}" for r, n in enumerate(result.per_rank))
    shares = f" ({by_rank})" if len(result.per_rank) > 1 else ""
    print(f"sweep: {result.written} new results{shares}, {result.skipped} already done, {result.seconds:.0f}s -> "
          f"{result.path}")
    if not args.in_experiment:  # an experiment's report stage shows the results once, at the end
        print_summary(result.path)
    if args.report:
        from kvpolicy.report.render import write_report

        paths = write_report(result.path, args.report)
        print(f"report: {paths.html}")
    elif not args.in_experiment:
        print(f"next: kvp report {result.path} --out REPORT_DIR")
    return 0

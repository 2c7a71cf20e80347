"""`kvp fit --model MODEL --out DIR`: a KVP policy for any supported model in one resumable command. It is the
bundled policies' recipe (kvpolicy/presets/recipe.py; `kvp fit`'s sizes: presets/fit.py) run by the experiment's
runner: traces of the mix, training, held-out costs against every attention-free baseline and the oracle, a short
accuracy check, then the deployable policy folder DIR/policy, whose card shows the held-out costs and the recipe.

Before any stage it measures this model on this device for a few seconds and prints what each stage will take in
time and disk (kvpolicy/evaluation/bench/estimate.py); `--dry-run` prints that and the commands, and runs nothing.
DIR/stages.json records each finished stage, so a re-run skips them and a killed fit resumes.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from kvpolicy.models.placement import add_placement_arguments
from kvpolicy.presets.fit import DEFAULTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model name (kvp models), Hugging Face directory "
                        "or hub id")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory: traces, checkpoint, results "
                        "and the policy folder DIR/policy (re-running resumes)")
    parser.add_argument("--context", type=int, default=DEFAULTS.context,
                        help="prompt length in tokens; the mix also holds prompts of half and twice it (default "
                             f"{DEFAULTS.context})")
    parser.add_argument("--future-tokens", type=int, default=DEFAULTS.future_tokens,
                        help=f"greedy future tokens per trace (default {DEFAULTS.future_tokens})")
    parser.add_argument("--train-prompts", type=int, default=DEFAULTS.train_prompts,
                        help=f"training prompts of the mix (default {DEFAULTS.train_prompts})")
    parser.add_argument("--val-prompts", type=int, default=DEFAULTS.val_prompts,
                        help=f"validation prompts (default {DEFAULTS.val_prompts})")
    parser.add_argument("--test-prompts", type=int, default=DEFAULTS.test_prompts,
                        help=f"held-out test prompts, for the costs in the card (default {DEFAULTS.test_prompts})")
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"training steps (default {DEFAULTS.steps})")
    parser.add_argument("--code", action="store_true", help="also train on continuation of Python sources and "
                        "RULER-style needles in code, and measure on held-out code (the Qwen2.5-Coder recipe)")
    parser.add_argument("--check-samples", type=int, default=DEFAULTS.check_samples,
                        help="samples of the accuracy check: RULER-style niah_single_2 at two budgets, KVP against "
                             f"the attention-free heuristics (default {DEFAULTS.check_samples}; 0 skips it)")
    parser.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    add_placement_arguments(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the stages' commands and the estimate of their time and disk; run nothing")


def check_out(out: Path, model: str) -> None:
    """Refuse an --out that is not a directory, or that holds a fit (or any run recorded in its stage log) of another
    model; a fit of the same model is resumed."""
    from kvpolicy.errors import KVPError
    from kvpolicy.experiment import read_stage_log
    from kvpolicy.policy.checkpoint import has_checkpoint, read_config

    if out.exists() and not out.is_dir():
        raise KVPError(f"{out} exists and is not a directory; choose another --out")
    models = set()
    for record in read_stage_log(out / "stages.json").values():
        argv = record["argv"]
        if "--model" in argv[:-1]:
            models.add(argv[argv.index("--model") + 1])
    if has_checkpoint(out / "policy"):
        models.add(read_config(out / "policy")["model"]["name"])
    others = sorted(models - {model})
    if others:
        raise KVPError(f"{out} holds a fit of {others[0]}, not {model}: give another --out (or delete {out} to start "
                       "over)")


def print_plan(plan: list, estimate, commands: bool) -> None:
    """Each stage of `plan` with its estimated time and disk (a stage `estimate` leaves out is done), with its
    command when `commands`."""
    from kvpolicy.evaluation.bench.estimate import duration, size

    by_name = {s.name: s for s in estimate.stages}
    print(f"estimate, {estimate.rates.describe()}:")
    for stage in plan:
        guess = by_name.get(stage.name)
        cost = f"~{duration(guess.seconds):>7}  {size(guess.bytes):>7}" if guess else "done earlier"
        print(f"  {stage.name:16s} {guess.work if guess else '':52s} {cost}")
        if commands:
            print(f"      {shlex.join(('kvp', *stage.argv))}")
    print(f"  total of the stages to run: ~{duration(estimate.seconds)}, {size(estimate.bytes)} on disk")


def print_summary(out: Path, check_task: str) -> None:
    """What the fit measured: the held-out costs its policy's card holds, and the accuracy check's table."""
    from kvpolicy.evaluation.store import read_results
    from kvpolicy.policy.card import HELD_OUT, held_out_cost
    from kvpolicy.policy.checkpoint import read_config
    from kvpolicy.report.aggregate import curve_groups, distinct_labels
    from kvpolicy.report.tables import group_table

    held = read_config(out / "policy").get(HELD_OUT)
    if held:
        print(f"\nheld-out ranking cost of the policy: {held['unit']}")
        for row in held["corpora"]:
            print(f"  {row['corpus']:12s} {row['prompts']:3d} prompts  KVP {held_out_cost(row)}  best "
                  f"attention-free: {row['best_attention_free']} {row['best_attention_free_cost']:.3f}")
    checked = [r for r in read_results(out / "results.jsonl").records if r.task == check_task]
    for group in curve_groups(distinct_labels(checked)):
        table = group_table(group)
        print(f"\naccuracy check, {group.title()}\n{table.title}\n\n{table.text()}")


def run(args: argparse.Namespace) -> int:
    from kvpolicy.distributed import launched
    from kvpolicy.errors import KVPError
    from kvpolicy.evaluation.bench.estimate import estimate_plan, measure_rates
    from kvpolicy.experiment import finished, read_stage_log, run_stages
    from kvpolicy.models.loader import load_model
    from kvpolicy.models.registry import resolve_model
    from kvpolicy.presets.fit import fit_recipe
    from kvpolicy.presets.recipe import CHECK_TASK
    from kvpolicy.traces.sources import longest_context

    begin = time.perf_counter()
    recipe = fit_recipe(args.model, context=args.context, future_tokens=args.future_tokens,
                        train_prompts=args.train_prompts, val_prompts=args.val_prompts,
                        test_prompts=args.test_prompts, steps=args.steps, code=args.code,
                        check_samples=args.check_samples, compile=not args.no_compile, device=args.device,
                        dtype=args.dtype)
    resolve_model(args.model)  # an unknown name: one line, before anything else
    out = Path(args.out)
    check_out(out, args.model)
    plan = recipe.stages(out)
    done = read_stage_log(out / "stages.json")
    todo = [stage for stage in plan if not finished(stage, done)]
    rank, world = launched()
    main = rank == 0  # under torchrun, rank 0 prints; every rank runs the stages
    if main:
        print(f"kvp fit: {recipe.summary}; output in {out}", flush=True)
    if todo or args.dry_run:
        handle = load_model(args.model, args.device, args.dtype)  # refuses a model it cannot evict for, before weights
        longest = longest_context("mix", args.context) + args.future_tokens
        if longest > handle.info.max_positions:
            raise KVPError(f"--context {args.context} asks for mix prompts of {longest_context('mix', args.context)} "
                           f"tokens plus {args.future_tokens} future tokens, past {args.model}'s "
                           f"{handle.info.max_positions} positions; use a shorter --context")
        if main:
            rates = measure_rates(handle, args.device)
            print_plan(plan, estimate_plan(todo, rates, handle.info), commands=args.dry_run)
            if world > 1:
                print(f"  (for one process: under torchrun the traces, training and sweeps split their work over the "
                      f"{world} processes)")
    if args.dry_run:
        return 0
    code = run_stages(plan, out, device=args.device)
    if code or not main:
        return code
    policy = out / "policy"
    print(f"\nkvp fit finished in {time.perf_counter() - begin:.0f} s: the policy for {args.model} is {policy}")
    print(f"  use it as kvp.load_policy(\"{policy}\") or --scorer kvp:{policy}; its card: {policy / 'README.md'}")
    print_summary(out, CHECK_TASK)
    return 0

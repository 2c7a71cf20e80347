"""`kvp calibrate --policy CKPT --traces DIR [--held-out DIR] [--budget ...]`: give a trained policy scores on one
scale across heads (so that `--allocation layer|model` can move its budget between heads and layers), and print what
each allocation mode loses on held-out traces."""

from __future__ import annotations

import argparse
import shlex

DEFAULT_BUDGETS = ("64", "128", "256", "512", "r0.25", "r0.5", "r0.75", "r0.875")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="CKPT",
                        help="a `kvp train` checkpoint, or a model name for its bundled policy (calibrated in place)")
    parser.add_argument("--traces", required=True, nargs="+", metavar="DIR",
                        help="the traces to fit on (the policy's training traces; several sets are read as one)")
    parser.add_argument("--held-out", nargs="+", metavar="DIR",
                        help="traces to measure on (e.g. the test split); default: measure nothing")
    parser.add_argument("--budget", nargs="+", default=list(DEFAULT_BUDGETS),
                        help=f"budgets of the held-out measure (default {' '.join(DEFAULT_BUDGETS)})")


def _row(values: list[float]) -> str:
    from kvpolicy.intervals import bootstrap_ci

    mean = 100 * sum(values) / len(values)
    ci = bootstrap_ci(values)
    return f"{mean:5.2f}" + (f" [{100 * ci[0]:5.2f}, {100 * ci[1]:5.2f}]" if ci else "")


def _difference(a: list[float], b: list[float]) -> str:
    from kvpolicy.intervals import paired_difference_ci

    mean = 100 * sum(x - y for x, y in zip(a, b)) / len(a)
    ci = paired_difference_ci(a, b)
    return f"{mean:+5.2f}" + (f" [{100 * ci[0]:+5.2f}, {100 * ci[1]:+5.2f}]" if ci else "")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvpolicy.compression.allocation import MODES
    from kvpolicy.compression.names import HEAD
    from kvpolicy.evaluation.lineup import parse_budget
    from kvpolicy.io import check_writable
    from kvpolicy.policy.bundled import resolve_policy
    from kvpolicy.policy.checkpoint import check_model, load_checkpoint, save_calibration
    from kvpolicy.traces.union import open_traces
    from kvpolicy.evaluation.calibration.attention_lost import held_out_losses
    from kvpolicy.training.calibrate import fit_calibration

    budgets = [parse_budget(b) for b in args.budget]
    path = resolve_policy(args.policy)
    checkpoint = load_checkpoint(path)
    train = open_traces(args.traces)
    check_model(checkpoint.config, train.model, str(path))
    held_out = open_traces(args.held_out) if args.held_out else None
    if held_out is not None:
        check_model(checkpoint.config, held_out.model, str(path))
    check_writable(path / "config.json", "the policy's config.json, which keeps the calibration")  # before the fit
    command = ["kvp", "calibrate", "--policy", args.policy, "--traces", *args.traces]
    if args.held_out:
        command += ["--held-out", *args.held_out, "--budget", *args.budget]
    fit = {"command": shlex.join(command),
           "traces": {"dirs": list(args.traces), "manifest_hash": train.manifest_hash, "samples": len(train)}}
    calibration = fit_calibration(checkpoint.policy, train, fit)
    if held_out is not None:
        losses = held_out_losses(checkpoint.policy, calibration, held_out, budgets, MODES)
        calibration = replace(calibration, fit=fit | {"held_out": {
            "dirs": list(args.held_out), "manifest_hash": held_out.manifest_hash, "samples": len(held_out),
            "attention_lost": {row: {label: sum(v) / len(v) for label, v in by_budget.items()}
                               for row, by_budget in losses.items()}}})
    save_calibration(path, calibration)
    top = calibration.curve[..., 0]
    print(f"calibrated {path} on {len(train)} traces: per head, the future attention its top-ranked tokens get is "
          f"{float(top.min()):.3g}..{float(top.max()):.3g} x their uniform share")
    if held_out is not None:
        print(f"\nfuture attention lost (%, mean over {len(held_out)} held-out traces, 95% bootstrap CI), at the "
              "memory of the uniform cut")
        print(f"{'ranking (allocation)':<28}" + "".join(f"{b.label:>22}" for b in budgets))
        for row, by_budget in losses.items():
            print(f"{row:<28}" + "".join(f"{_row(by_budget[b.label]):>22}" for b in budgets))
        print("\npaired difference from KVP (head), points (negative: less attention lost)")
        for mode in (m for m in MODES if m != HEAD):
            moved, uniform = losses[f"KVP ({mode})"], losses[f"KVP ({HEAD})"]
            print(f"{'KVP (' + mode + ')':<28}" + "".join(
                f"{_difference(moved[b.label], uniform[b.label]):>22}" for b in budgets))
    return 0

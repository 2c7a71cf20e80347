"""`kvp export --policy CKPT --out DIR`: a trained policy as the folder a user deploys (config.json, model.safetensors,
README.md card; no resume state or training log), with what it was measured at: `--results` and `--traces` put its
held-out ranking cost per corpus, against the best attention-free heuristic, into its config and card
(report/held_out.py), and `--made-by` the commands that made it (the card's recipe). The last stage of `kvp fit`
and of the bundled recipes. It reads results (report) and writes a policy, so it sits on top of both."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="CKPT", help="the `kvp train` checkpoint to export")
    parser.add_argument("--out", required=True, metavar="DIR", help="the policy folder to write (replaced whole)")
    parser.add_argument("--results", metavar="FILE", help="a results file holding the policy's whole-ranking cost on "
                        "held-out traces (`kvp sweep --task traces:DIR --scorer kvp:CKPT knorm ...`)")
    parser.add_argument("--traces", nargs="+", metavar="DIR", default=[],
                        help="with --results: the held-out trace sets whose costs the card shows")
    parser.add_argument("--made-by", action="append", default=[], metavar="CMD",
                        help="a command that made the policy (repeat, in order; the last one ran the whole recipe "
                             "and measured the costs), shown in the card")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvpolicy.errors import KVPError
    from kvpolicy.policy.card import HELD_OUT, held_out_cost
    from kvpolicy.policy.checkpoint import load_checkpoint

    if bool(args.results) != bool(args.traces):
        raise KVPError("--results and --traces go together: the costs in the results file of the trace sets named")
    checkpoint = load_checkpoint(args.policy)
    config = dict(checkpoint.config)
    if args.made_by:
        config["recipe"] = {"commands": list(args.made_by)}
    if args.results:
        from kvpolicy.evaluation.store import read_results
        from kvpolicy.evaluation.tasks.traces import task_name
        from kvpolicy.report.held_out import held_out_section
        from kvpolicy.traces.store import TraceReader

        tasks = [task_name(d, TraceReader(d).manifest) for d in args.traces]
        command = args.made_by[-1] if args.made_by else f"kvp sweep --task {' '.join(tasks)}"
        config[HELD_OUT] = held_out_section(read_results(args.results).records, checkpoint.sha256,
                                            config["model"]["fingerprint"], tasks, command)
    out = replace(checkpoint, config=config).save_pretrained(args.out)
    print(f"exported {args.policy} -> {out}")
    for row in config.get(HELD_OUT, {}).get("corpora", []):
        print(f"  held-out {row['corpus']} ({row['prompts']} prompts): {held_out_cost(row)}, best "
              f"attention-free {row['best_attention_free']} {row['best_attention_free_cost']:.3f}")
    return 0

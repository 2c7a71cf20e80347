"""`kvp results pack RESULTS.jsonl [--out RESULTS.jsonl.gz]` and `kvp results unpack RESULTS.jsonl.gz --out
RESULTS.jsonl`: a results file's archive form, which a repository commits and `kvp report` reads as it is, and back
to the plain JSONL store that a sweep (or `kvp experiment`) resumes by appending to."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    pack = actions.add_parser("pack", help="pack a plain results file into RESULTS.jsonl.gz (scorer identities "
                              "once, gzip; every record kept)")
    pack.add_argument("results", help="JSONL results file written by `kvp sweep`")
    pack.add_argument("--out", help="the archive to write (default: RESULTS.gz beside it)")
    unpack = actions.add_parser("unpack", help="unpack RESULTS.jsonl.gz into a new plain results file a sweep "
                                "can resume")
    unpack.add_argument("results", help="results archive (.jsonl.gz) written by `kvp results pack`")
    unpack.add_argument("--out", required=True, help="the plain JSONL results file to write (must not exist)")


def run(args: argparse.Namespace) -> int:
    from kvpolicy.evaluation.store import pack_results, unpack_results

    if args.action == "pack":
        out = pack_results(args.results, args.out)
    else:
        out = unpack_results(args.results, args.out)
    print(f"{args.action}ed {args.results} into {out} ({out.stat().st_size:,} bytes)")
    return 0

"""`kvp report RESULTS --out DIR`: the HTML page and Markdown summary with figures from a results file, plain or
packed (RESULTS.jsonl.gz, read as it is)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results file: the JSONL `kvp sweep` writes, or its archive (.jsonl.gz) "
                        "that `kvp results pack` writes")
    parser.add_argument("--out", required=True, help="directory for report.html, report.md and figures/")


def run(args: argparse.Namespace) -> int:
    from kvpolicy.report.render import write_report

    paths = write_report(args.results, args.out)
    if paths.note:
        print(f"note: {paths.note}", file=sys.stderr)
    print(f"report: {paths.html}")
    print(f"summary: {paths.markdown} ({len(paths.figures)} figures in {paths.markdown.parent / 'figures'})")
    return 0

"""The results as plain-text tables for the terminal (what `kvp sweep` and `kvp demo` print)."""

from __future__ import annotations

import sys
from pathlib import Path

from kvpolicy.evaluation.result import Result
from kvpolicy.evaluation.store import read_results
from kvpolicy.report.aggregate import curve_groups, distinct_labels, head_maps, throughput
from kvpolicy.report.tables import group_table, head_map_tables, throughput_table


def summary_text(results: list[Result]) -> str:
    if not results:
        return "no results yet"
    results = distinct_labels(results)
    blocks = []
    for group in curve_groups(results):
        table = group_table(group)
        blocks.append(f"{group.title()}\n{group.caption()}\n\n{table.text()}")
    for head_map in head_maps(results):
        overall = head_map_tables(head_map)[0]
        blocks.append(f"{overall.title}\n\n{overall.text()}")
    speed = throughput_table(throughput(results))
    blocks.append(f"{speed.title}\n\n{speed.text()}")
    return "\n\n".join(blocks)


def print_summary(results: str | Path) -> None:
    """The summary on stdout; what the reader left out of the results as a note on stderr."""
    loaded = read_results(results)
    if loaded.note:
        print(f"note: {loaded.note}", file=sys.stderr)
    print(summary_text(loaded.records))

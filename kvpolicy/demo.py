"""`kvp demo`: the whole story on SmolLM2 in one command, about 10 minutes on a 2-core CPU. It is the demo preset of
`kvp experiment` (kvpolicy/presets/demo.py: its stages, sizes and measured times) run by the experiment's runner, so
a re-run skips every finished stage (OUT/stages.json) and a killed demo resumes; then it prints the tables and where
the report is. `--quick` runs the preset's smoke version, `kvp experiment --preset demo-quick`."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from kvpolicy.models.placement import add_placement_arguments
from kvpolicy.models.registry import DEFAULT_MODEL
from kvpolicy.presets import PRESETS
from kvpolicy.presets.demo import DEMO_OUT, DemoConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEMO_OUT, help="output directory (re-running reuses finished stages)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (kvp models)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of the same pipeline at tiny sizes")
    add_placement_arguments(parser)


def run_demo(cfg: DemoConfig, out: Path) -> int:
    """Run (or resume) every stage of `cfg` into `out`, then print the tables and where the report is; the exit
    status of the first stage that fails, else 0."""
    from kvpolicy.experiment import run_stages
    from kvpolicy.report.summary import print_summary

    begin = time.perf_counter()
    print(f"kvp demo: {cfg.summary}; output in {out}", flush=True)
    code = run_stages(cfg.stages(out), out)
    if code:
        return code
    print_summary(out / "results.jsonl")
    report = out / "report"  # what the report stage writes there: report.html, report.md, figures/
    print(f"\nkvp demo finished in {time.perf_counter() - begin:.0f} s.")
    print(f"Report: {(report / 'report.html').resolve()}  (Markdown: {(report / 'report.md').resolve()})")
    return 0


def run(args: argparse.Namespace) -> int:
    preset = PRESETS["demo-quick" if args.quick else "demo"]
    return run_demo(replace(preset, model=args.model, device=args.device, dtype=args.dtype), Path(args.out))

"""`kvp`: a thin command line over the library. Each subcommand lives in a module that defines
`add_arguments(parser)` and `run(args) -> int` (kvpolicy/commands.py lists the pipeline's); here are added the three
that run the others, `kvp demo`, `kvp experiment` and `kvp fit`."""

from __future__ import annotations

import argparse
import sys

from kvpolicy import commands
from kvpolicy.commands import EXIT_INTERRUPTED, STAGE_COMMANDS

__all__ = ["COMMANDS", "EXIT_INTERRUPTED", "build_parser", "main"]

# subcommand -> (module, one-line help); the module is imported only when its command runs
COMMANDS: dict[str, tuple[str, str]] = {
    **STAGE_COMMANDS,
    "demo": ("kvpolicy.demo", "the whole story on SmolLM2: traces, training, evaluation, report"),
    "experiment": ("kvpolicy.experiment", "a run the project reports, resumable (--preset): a study behind "
                   "docs/RESULTS.md, a bundled policy's recipe, the demo (--list shows them)"),
    "fit": ("kvpolicy.fit", "train a KVP policy for any supported model in one resumable command: traces, training, "
            "held-out costs, an accuracy check, the policy folder (estimates time and disk first; --dry-run)"),
}


def build_parser() -> argparse.ArgumentParser:
    return commands.build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Run one `kvp` command: 0 on success, 1 on an error, 2 on a usage error, 130 on an interrupt."""
    return commands.run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

"""`kvp`: a thin command line over the library. Each subcommand lives beside the code it drives, in a module
that defines `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import functools
import importlib
import signal
import sys
import warnings

from kvpolicy import __version__
from kvpolicy.errors import KVPError

# subcommand -> (module, one-line help); the module is imported only when its command runs
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("kvpolicy.models.cli", "list the known models (and load one with --load)"),
    "generate": ("kvpolicy.compression.cli", "answer a prompt with a compressed KV cache"),
    "traces": ("kvpolicy.traces.cli", "record future-utility training traces from real model runs"),
    "train": ("kvpolicy.training.cli", "train the per-head KVP eviction policies on traces"),
    "policies": ("kvpolicy.policy.cli", "list the KVP policies bundled with kvpolicy (--bundle CKPT ships one)"),
    "sweep": ("kvpolicy.evaluation.cli", "evaluate scorers x budgets x tasks into a resumable JSONL store"),
    "report": ("kvpolicy.report.cli", "write the HTML/Markdown report with figures from a results file"),
    "bench": ("kvpolicy.evaluation.bench.cli", "measure costs and savings side by side: scoring, memory, decode, "
              "answers vs kvpress, traces and training"),
    "demo": ("kvpolicy.demo", "the whole story on SmolLM2: traces, training, evaluation, report"),
    "experiment": ("kvpolicy.experiment", "every run behind docs/RESULTS.md for one model, resumable (--preset)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvp", description="Learned KV-cache eviction (KV Policy).")
    parser.add_argument("--version", action="version", version=f"kvp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(p)
    return parser


EXIT_INTERRUPTED = 130  # a command's exit status after Ctrl-C or `kill`, its progress saved


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _one_line_warning(command: str, message, category, filename, lineno, file=None, line=None) -> None:
    """A warning that reaches the command line, as one line like its errors (not Python's file:line and source)."""
    print(f"kvp {command}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 on success, 1 on an error (a KVPError or OSError), 2 on a usage error (argparse exits),
    130 on an interrupt. Library logging and warnings are quietened here, in the CLI only."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    from kvpolicy.progress import silence_libraries

    silence_libraries()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` saves progress as Ctrl-C does
    shown = warnings.showwarning
    warnings.showwarning = functools.partial(_one_line_warning, args.command)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KVPError as err:
        print(f"kvp {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # permission, disk full, not a directory... met after the up-front checks
        from kvpolicy.io import describe_os_error

        print(f"kvp {args.command}: error: {describe_os_error(err)}; free space or fix permissions, then re-run "
              "the same command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kvp {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())

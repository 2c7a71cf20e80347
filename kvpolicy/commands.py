"""The pipeline's `kvp` commands and how one command line runs: its parsing, exit status and one-line errors.

Each command lives in a module that defines `add_arguments(parser)` and `run(args) -> int`: a stage's cli.py beside
the code it drives, or a module on top when it drives several stages (sweep_cli.py, train_cli.py, export_cli.py).
kvpolicy/cli.py adds the commands that run other commands (demo, experiment, fit); `kvp experiment` runs its stages
through `run_command` here, so no command module imports the command line that loads it.
"""

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
STAGE_COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("kvpolicy.models.cli", "list the known models (and load one with --load)"),
    "generate": ("kvpolicy.compression.cli", "answer a prompt with a compressed KV cache"),
    "chat": ("kvpolicy.chat_cli", "chat on a cache cut back to the budget after every turn and while replying"),
    "traces": ("kvpolicy.traces.cli", "record future-utility training traces from real model runs"),
    "train": ("kvpolicy.train_cli", "train the per-head KVP eviction policies on traces"),
    "calibrate": ("kvpolicy.evaluation.calibration.cli", "put a trained policy's scores on one scale across heads, so "
                  "that --allocation layer|model can move its budget"),
    "train-kvzap": ("kvpolicy.kvzap.cli", "train KVzap's per-layer score predictors (linear, MLP) for a model on "
                    "the prompts KVP trains on"),
    "policies": ("kvpolicy.policy.cli", "list the KVP policies bundled with kvpolicy (--bundle CKPT ships one; "
                 "--convert CKPT rewrites a first-format policy folder)"),
    "export": ("kvpolicy.export_cli", "write a trained policy as a deployable folder (config, weights, model card) "
               "with its measured held-out costs and the commands that made it"),
    "sweep": ("kvpolicy.sweep_cli", "evaluate scorers x budgets x tasks into a resumable JSONL store"),
    "report": ("kvpolicy.report.cli", "write the HTML/Markdown report with figures from a results file"),
    "results": ("kvpolicy.evaluation.cli", "pack a results file into RESULTS.jsonl.gz, or unpack one to resume "
                "a sweep"),
    "bench": ("kvpolicy.evaluation.bench.cli", "measure costs and savings side by side: scoring, memory, decode, "
              "answers vs kvpress, traces and training"),
}

EXIT_INTERRUPTED = 130  # a command's exit status after Ctrl-C or `kill`, its progress saved


def build_parser(commands: dict[str, tuple[str, str]], in_experiment: bool = False) -> argparse.ArgumentParser:
    """The `kvp` parser for `commands` (name -> (module, help)); each module adds its own arguments. in_experiment:
    the command runs as a stage of `kvp experiment` (its args say so as `args.in_experiment`), which reports at
    the end, so a command leaves out what it prints for a user who runs it alone (the sweep's summary)."""
    parser = argparse.ArgumentParser(prog="kvp", description="Learned KV-cache eviction (KV Policy).")
    parser.add_argument("--version", action="version", version=f"kvp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name, in_experiment=in_experiment)
        importlib.import_module(module_name).add_arguments(p)
    return parser


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _one_line_warning(command: str, message, category, filename, lineno, file=None, line=None) -> None:
    """A warning that reaches the command line, as one line like its errors (not Python's file:line and source)."""
    print(f"kvp {command}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Run one command line: 0 on success, 1 on an error (a KVPError or OSError), 2 on a usage error (argparse
    exits), 130 on an interrupt. Library logging and warnings are quietened here, in the CLI only."""
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

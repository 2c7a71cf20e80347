"""`kvp experiment --preset NAME`: one of the project's runs (kvpolicy/presets: the studies, the bundled policies'
recipes, the demo) as one resumable command; `--list` shows the presets, or with `--preset` the stages.

A preset is a list of stages, each one `kvp` command into one output directory. Every command resumes what it
finished, so a killed run (or one spread over several sessions) continues where it stopped; a stage that completed is
skipped outright, unless what it wrote (its `--out`) is gone, as in a fresh checkout given only the results and the
stage log: then it runs again. `OUT/stages.json` records each finished stage's command, wall time and the load
average around it (the timings docs/RESULTS.md quotes); a damaged one is refused in one line (read_stage_log), never
guessed at.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

from kvpolicy.errors import KVPError
from kvpolicy.io import read_json_file, write_json
from kvpolicy.presets import PRESETS
from kvpolicy.presets.stage import Stage
from kvpolicy.schema import Optional, validate

# a finished stage in OUT/stages.json: what `run_stages` reads of it (argv, seconds) and what else it writes
STAGE_RECORD = {"argv": [str], "seconds": float, "load_start": Optional(float), "load_end": Optional(float),
                "finished_at": Optional(str)}
STAGE_LOG_FIX = ("delete it to run every stage again (each command resumes what it finished, so little is redone), "
                 "or fix it")


def read_stage_log(path: Path) -> dict[str, dict]:
    """The finished stages OUT/stages.json records, by name ({} when there is none yet), checked against
    STAGE_RECORD: a file that is not a regular file, not JSON or not a stage log is one KVPError naming it."""
    if not path.exists():
        return {}
    log = read_json_file(path, "stage log of `kvp experiment`", STAGE_LOG_FIX)
    schema = {name: STAGE_RECORD for name in log} if isinstance(log, dict) else {}
    validate(log, schema, f"{path} (the stage log of `kvp experiment`)", STAGE_LOG_FIX)
    return log


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=list(PRESETS), help="the run (`kvp experiment --list` says what each is)")
    parser.add_argument("--out", help="output directory (default: the preset's, as --list shows)")
    parser.add_argument("--stage", nargs="+", metavar="NAME", help="run only these stages (default: all, in order)")
    parser.add_argument("--list", action="store_true",
                        help="print the presets, or with --preset its stages' commands and what is done; run nothing")


def run_stage(argv: list[str]) -> int:
    """One stage's command, run as `kvp` runs it (same exit statuses and one-line errors); the parser knows the
    pipeline's commands only, so running a stage never loads this module again."""
    from kvpolicy.commands import STAGE_COMMANDS, build_parser, run_command

    return run_command(build_parser(STAGE_COMMANDS, in_experiment=True), argv)


def finished(stage: Stage, done: dict[str, dict]) -> bool:
    """Whether the stage log `done` (read_stage_log) records `stage` as finished with the same command, and what it
    wrote (its --out) is still there."""
    recorded = done.get(stage.name, {}).get("argv") == list(stage.argv)
    return recorded and (stage.output is None or stage.output.exists())


def run_stages(plan: list[Stage], out: Path, only: Sequence[str] = (), listing: bool = False,
               device: str | None = None) -> int:
    """Run `plan`'s stages (those named in `only`, if any) in order, skipping the ones OUT/stages.json records as
    finished with the same command; records each one that finishes, with its wall time. With `listing`, print
    every stage's command and state instead. Returns the first failing stage's exit status, else 0.

    Under torchrun every rank runs this: each collective stage (`Stage.collective`: traces, training, sweeps) on every
    rank, each doing its share, any other stage on rank 0 alone while the others wait for rank 0 to record it; rank 0
    prints and writes the stage log, and one process group serves every stage (`held_process_group`, on `device`'s
    backend: gloo for "cpu", else CUDA's where there is one). (A rank that fails ends the run: torchrun stops the
    others.)"""
    from kvpolicy.commands import EXIT_INTERRUPTED
    from kvpolicy.distributed import held_process_group, launched

    rank, world = launched()
    main, distributed = rank == 0, world > 1
    names = [s.name for s in plan]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise KVPError(f"unknown stage {', '.join(unknown)}; the stages are: {', '.join(names)}")
    log_path = out / "stages.json"
    done = read_stage_log(log_path)
    with contextlib.nullcontext() if listing else held_process_group(device):
        for stage in (s for s in plan if not only or s.name in only):
            recorded, complete = done.get(stage.name, {}).get("argv") == list(stage.argv), finished(stage, done)
            gone = f"done earlier, but its output {stage.output} is gone"
            if listing:
                state = (f"done in {done[stage.name]['seconds']:.0f} s" if complete
                         else f"{gone}; to run again" if recorded else "to run")
                print(f"{stage.name} ({state}): kvp {' '.join(stage.argv)}")
                continue
            say = print if main else (lambda *args, **kw: None)
            if complete:
                say(f"[{stage.name}] done earlier ({done[stage.name]['seconds']:.0f} s); skipped")
                continue
            if distributed and not main and not stage.collective:
                _wait_for(stage, log_path)  # rank 0 runs it alone
                continue
            if recorded:
                say(f"[{stage.name}] {gone}; running it again")
            say(f"[{stage.name}] kvp {' '.join(stage.argv)}", flush=True)
            load, start = os.getloadavg()[0], time.perf_counter()
            code = run_stage(list(stage.argv))
            if code:
                why = "interrupted;" if code == EXIT_INTERRUPTED else f"failed (exit {code}); fix the cause and"
                say(f"[{stage.name}] {why} re-run the same command to resume")
                return code
            if not main:
                continue
            seconds = round(time.perf_counter() - start, 1)
            done[stage.name] = {"argv": list(stage.argv), "seconds": seconds,
                                "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2),
                                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            out.mkdir(parents=True, exist_ok=True)
            write_json(log_path, done)
            print(f"[{stage.name}] done in {seconds:.0f} s", flush=True)
        return 0


def _wait_for(stage: Stage, log_path: Path, poll_s: float = 1.0) -> None:
    """Wait until rank 0 records `stage` as finished in the stage log (a rank other than 0, under torchrun)."""
    while read_stage_log(log_path).get(stage.name, {}).get("argv") != list(stage.argv):
        time.sleep(poll_s)


def run(args: argparse.Namespace) -> int:
    if not args.preset:
        if not args.list:
            raise KVPError("name a preset: kvp experiment --preset NAME (`kvp experiment --list` shows them)")
        for name, preset in PRESETS.items():
            print(f"{name:16s} {preset.summary} (--out {preset.default_out(name)})")
        return 0
    preset = PRESETS[args.preset]
    out = Path(args.out or preset.default_out(args.preset))
    return run_stages(preset.stages(out), out, args.stage or (), args.list)

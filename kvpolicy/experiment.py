"""`kvp experiment --preset NAME`: every run behind docs/RESULTS.md for one model, as one resumable command.

A preset is a list of stages, each one `kvp` command (traces, train, sweep, report) into one output directory:

1. traces   per-corpus training traces (RULER-style, dialogue) and held-out test traces of the mix
2. train    the paper's per-corpus policies: KVP-R on RULER-style traces, KVP-D on dialogue traces; and KVP-D-long,
            KVP-D's recipe on dialogues cut at up to the long-generation length (traces of their own)
3. costs    held-out ranking cost of every policy (the bundled KVP-mix among them) and baseline, per corpus
4. sweeps   RULER-style and evaluation-only needle accuracy at 3%–50% of a 2K context (token budgets), both protocols;
            the same at 4K and 8K by ratio (length transfer); dialogue perplexity, prompt-once and multi-turn;
            perplexity of long texts (essays, dialogues) streamed through a bounded cache re-ranked every N tokens,
            and the long dialogues again with KVP-D and KVP-D-long: does a policy trained at the streams' length rank
            better inside them?
5. report   the tables and figures, with 95% bootstrap intervals

Every command resumes what it finished, so a killed run (or one spread over several sessions) continues where it
stopped; a stage that completed is skipped outright, unless what it wrote (its `--out`) is gone, as in a fresh
checkout given only the results and the stage log: then it runs again. `OUT/stages.json` records each finished
stage's command, wall time and the load average around it (the timings docs/RESULTS.md quotes); a damaged one is
refused in one line (read_stage_log), never guessed at.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kvpolicy.errors import KVPError
from kvpolicy.compression.catalog import BENCH, STREAM, SWEEP, default_lineup, needs_utility
from kvpolicy.evaluation.names import MULTI_TURN, PROMPT_ONCE, QUERY_AWARE, QUESTION_AGNOSTIC
from kvpolicy.io import read_json_file, write_json
from kvpolicy.schema import Optional, validate

# the catalog's sweep baselines, then the bench's others (every baseline a trace can score); and those with a
# decoding form, for the long-generation stages
BASELINES = (*default_lineup(SWEEP), *[n for n in default_lineup(BENCH) if n not in default_lineup(SWEEP)])
STREAM_BASELINES = default_lineup(STREAM)


# a finished stage in OUT/stages.json: what `run` reads of it (argv, seconds) and what else it writes
STAGE_RECORD = {"argv": [str], "seconds": float, "load_start": Optional(float), "load_end": Optional(float),
                "finished_at": Optional(str)}
STAGE_LOG_FIX = ("delete it to run every stage again (each command resumes what it finished, so little is redone), "
                 "or fix it")


@dataclass(frozen=True)
class Stage:
    """One `kvp` command of a preset; `name` identifies it in OUT/stages.json and `--stage`."""

    name: str
    argv: tuple[str, ...]

    @property
    def output(self) -> Path:
        """What the stage writes: the path after `--out` (every stage has one)."""
        return Path(self.argv[self.argv.index("--out") + 1])


@dataclass(frozen=True)
class ExperimentConfig:
    """Sizes of a preset. budgets: entries per KV head at `context` (64–1024 of 2048 = 3.1%–50%); ratios: the
    shares 6.25%–50% kept as kvpress compression ratios (fraction removed), for the longer contexts.
    stream_samples: texts streamed per long-generation task; the essays' eval split holds only 5 windows of 6,144
    tokens (half-overlapping), so essays get 5 and long dialogues 10."""

    model: str
    context: int = 2048
    future_tokens: int = 128
    train_prompts: int = 32
    val_prompts: int = 8
    test_prompts: int = 30
    steps: int = 1000
    samples: int = 30
    budgets: tuple[str, ...] = ("64", "128", "256", "512", "1024")
    long_contexts: tuple[int, ...] = (4096, 8192)
    ratios: tuple[str, ...] = ("0.9375", "0.875", "0.75", "0.5")
    stream_context: int = 6144
    stream_samples: tuple[tuple[str, int], ...] = (("essays", 5), ("dialogue", 10))
    stream_every: tuple[int, ...] = (64, 256)
    stream_budgets: tuple[str, ...] = ("256", "512", "1024")
    corpora: tuple[str, ...] = ("ruler", "dialogue")

    def __post_init__(self):
        for name in ("context", "future_tokens", "train_prompts", "val_prompts", "test_prompts", "steps", "samples",
                     "stream_context"):
            if getattr(self, name) < 1:
                raise KVPError(f"experiment: {name} must be at least 1")
        if any(n < 1 for _, n in self.stream_samples):
            raise KVPError("experiment: stream_samples must be at least 1 per task")


PRESETS = {
    # SmolLM2 has 8,192 positions: its "8K" prompts leave room for the 16 answer tokens
    "smollm2": ExperimentConfig("smollm2-135m", long_contexts=(4096, 8176)),
    "qwen2.5": ExperimentConfig("qwen2.5-0.5b"),
}


def stages(cfg: ExperimentConfig, out: Path) -> list[Stage]:
    """The commands of a preset, in order."""
    common = ("--model", cfg.model)
    traces = out / "traces"
    result: list[Stage] = []
    policies = [f"kvp:{cfg.model}"]  # the bundled KVP-mix
    # (policy, trace source, traces name, prompt length): the paper's KVP-R and KVP-D, and KVP-D-long
    recipes = [(f"kvp-{corpus[0]}", corpus, corpus, cfg.context) for corpus in cfg.corpora]
    recipes.append(("kvp-d-long", "long-dialogue", "dialogue-long", cfg.stream_context))
    for _, source, name, context in recipes:
        for split, n in (("train", cfg.train_prompts), ("val", cfg.val_prompts)):
            result.append(Stage(f"traces-{name}-{split}", (
                "traces", *common, "--source", source, "--split", split, "--n", str(n), "--context", str(context),
                "--future-tokens", str(cfg.future_tokens), "--out", str(traces / f"{name}-{split}"))))
    result.append(Stage("traces-mix-test", (
        "traces", *common, "--source", "mix", "--split", "test", "--n", str(cfg.test_prompts), "--context",
        str(cfg.context), "--future-tokens", str(cfg.future_tokens), "--out", str(traces / "mix-test"))))
    for policy, _, name, _ in recipes:
        result.append(Stage(f"train-{policy}", (
            "train", "--traces", str(traces / f"{name}-train"), "--val", str(traces / f"{name}-val"),
            "--steps", str(cfg.steps), "--out", str(out / policy))))
    policies += [f"kvp:{out / policy}" for policy, _, _, context in recipes if context == cfg.context]
    store = ("--out", str(out / "results.jsonl"))
    sweep = ("sweep", *common, *store)
    result += [
        Stage("costs", (*sweep, "--task", f"traces:{traces / 'mix-test'}", "--n", str(cfg.test_prompts), "--budget",
                        *cfg.budgets, "--scorer", *policies, *BASELINES, *needs_utility())),
        Stage("ruler", (*sweep, "--task", "ruler:niah_single_2", "needles", "--max-new-tokens", "16",
                        *_qa(cfg, policies, (str(cfg.context),), cfg.budgets))),
        Stage("ruler-multivalue", (*sweep, "--task", "ruler:niah_multivalue", "--max-new-tokens", "48",
                                   *_qa(cfg, policies, (str(cfg.context),), cfg.budgets))),
        Stage("length-transfer", (*sweep, "--task", "ruler:niah_single_2", "needles", "--max-new-tokens", "16",
                                  *_qa(cfg, policies, tuple(map(str, cfg.long_contexts)), cfg.ratios))),
        Stage("dialogue", (*sweep, "--task", "dialogue", "--protocol", PROMPT_ONCE, MULTI_TURN, "--context",
                           str(cfg.context), "--n", str(cfg.samples), "--budget", *cfg.budgets, "--scorer", *policies,
                           *BASELINES)),
        *(Stage(f"long-generation-{text}", (*sweep, *_stream(cfg, text, n), "--scorer", policies[0], *STREAM_BASELINES))
          for text, n in cfg.stream_samples),
        *(Stage("long-generation-dialogue-kvp-d", (*sweep, *_stream(cfg, text, n), "--scorer", f"kvp:{out / 'kvp-d'}",
                                                   f"kvp:{out / 'kvp-d-long'}"))
          for text, n in cfg.stream_samples if text == "dialogue"),
        Stage("report", ("report", str(out / "results.jsonl"), "--out", str(out / "report"))),
    ]
    return result


def _stream(cfg: ExperimentConfig, text: str, n: int) -> tuple:
    return ("--task", f"longgen:{text}", "--context", str(cfg.stream_context), "--every", *map(str, cfg.stream_every),
            "--n", str(n), "--budget", *cfg.stream_budgets)


def _qa(cfg: ExperimentConfig, policies: list[str], contexts: tuple[str, ...], budgets: tuple[str, ...]) -> tuple:
    return ("--protocol", QUERY_AWARE, QUESTION_AGNOSTIC, "--context", *contexts, "--n", str(cfg.samples),
            "--budget", *budgets, "--scorer", *policies, *BASELINES)


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
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the model whose results to run")
    parser.add_argument("--out", help="output directory (default: runs/experiment-PRESET)")
    parser.add_argument("--stage", nargs="+", metavar="NAME", help="run only these stages (default: all, in order)")
    parser.add_argument("--list", action="store_true", help="print the stages' commands and what is done; run nothing")


def run_stage(argv: list[str]) -> int:
    """One stage's command, run as `kvp` runs it (same exit statuses and one-line errors); the parser knows the
    pipeline's commands only, so running a stage never loads this module again."""
    from kvpolicy.commands import STAGE_COMMANDS, build_parser, run_command

    return run_command(build_parser(STAGE_COMMANDS), argv)


def run(args: argparse.Namespace) -> int:
    from kvpolicy.commands import EXIT_INTERRUPTED

    out = Path(args.out or f"runs/experiment-{args.preset}")
    plan = stages(PRESETS[args.preset], out)
    names = [s.name for s in plan]
    unknown = sorted(set(args.stage or ()) - set(names))
    if unknown:
        raise KVPError(f"unknown stage {', '.join(unknown)}; the stages of {args.preset} are: {', '.join(names)}")
    log_path = out / "stages.json"
    done = read_stage_log(log_path)
    chosen = [s for s in plan if not args.stage or s.name in args.stage]
    for stage in chosen:
        recorded = done.get(stage.name, {}).get("argv") == list(stage.argv)
        finished = recorded and stage.output.exists()
        gone = f"done earlier, but its output {stage.output} is gone"
        if args.list:
            state = (f"done in {done[stage.name]['seconds']:.0f} s" if finished
                     else f"{gone}; to run again" if recorded else "to run")
            print(f"{stage.name} ({state}): kvp {' '.join(stage.argv)}")
            continue
        if finished:
            print(f"[{stage.name}] done earlier ({done[stage.name]['seconds']:.0f} s); skipped")
            continue
        if recorded:
            print(f"[{stage.name}] {gone}; running it again")
        print(f"[{stage.name}] kvp {' '.join(stage.argv)}", flush=True)
        load, start = os.getloadavg()[0], time.perf_counter()
        code = run_stage(list(stage.argv))
        if code:
            why = "interrupted;" if code == EXIT_INTERRUPTED else f"failed (exit {code}); fix the cause and"
            print(f"[{stage.name}] {why} re-run the same command to resume")
            return code
        done[stage.name] = {"argv": list(stage.argv), "seconds": round(time.perf_counter() - start, 1),
                            "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2),
                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        out.mkdir(parents=True, exist_ok=True)
        write_json(log_path, done)
    return 0

"""The study: every run behind docs/RESULTS.md for one model (`kvp experiment --preset smollm2`, `qwen2.5`).

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

The stage names and commands are those of the finished studies' stage logs (docs/results/*-study/stages.json): a
change to them would run those stages again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpolicy.compression.catalog import BENCH, STREAM, SWEEP, default_lineup, needs_utility
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.names import MULTI_TURN, PROMPT_ONCE, QUERY_AWARE, QUESTION_AGNOSTIC
from kvpolicy.presets.stage import Stage, traces_command

# the catalog's sweep baselines, then the bench's others (every baseline a trace can score); and those with a
# decoding form, for the long-generation stages
BASELINES = (*default_lineup(SWEEP), *[n for n in default_lineup(BENCH) if n not in default_lineup(SWEEP)])
STREAM_BASELINES = default_lineup(STREAM)


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of a study. budgets: entries per KV head at `context` (64–1024 of 2048 = 3.1%–50%); ratios: the
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

    @property
    def summary(self) -> str:
        return f"the study behind docs/RESULTS.md on {self.model}: per-corpus policies, sweeps, long generation"

    def default_out(self, name: str) -> str:
        return f"runs/experiment-{name}"

    def stages(self, out: Path) -> list[Stage]:
        traces = out / "traces"
        result: list[Stage] = []
        policies = [f"kvp:{self.model}"]  # the bundled KVP-mix
        # (policy, trace source, traces name, prompt length): the paper's KVP-R and KVP-D, and KVP-D-long
        recipes = [(f"kvp-{corpus[0]}", corpus, corpus, self.context) for corpus in self.corpora]
        recipes.append(("kvp-d-long", "long-dialogue", "dialogue-long", self.stream_context))
        for _, source, name, context in recipes:
            for split, n in (("train", self.train_prompts), ("val", self.val_prompts)):
                result.append(Stage(f"traces-{name}-{split}", traces_command(
                    self.model, source, split, n, context, self.future_tokens, traces / f"{name}-{split}")))
        result.append(Stage("traces-mix-test", traces_command(
            self.model, "mix", "test", self.test_prompts, self.context, self.future_tokens, traces / "mix-test")))
        for policy, _, name, _ in recipes:
            result.append(Stage(f"train-{policy}", (
                "train", "--traces", str(traces / f"{name}-train"), "--val", str(traces / f"{name}-val"),
                "--steps", str(self.steps), "--out", str(out / policy))))
        policies += [f"kvp:{out / policy}" for policy, _, _, context in recipes if context == self.context]
        sweep = ("sweep", "--model", self.model, "--out", str(out / "results.jsonl"))
        result += [
            Stage("costs", (*sweep, "--task", f"traces:{traces / 'mix-test'}", "--n", str(self.test_prompts),
                            "--budget", *self.budgets, "--scorer", *policies, *BASELINES, *needs_utility())),
            Stage("ruler", (*sweep, "--task", "ruler:niah_single_2", "needles", "--max-new-tokens", "16",
                            *self._qa(policies, (str(self.context),), self.budgets))),
            Stage("ruler-multivalue", (*sweep, "--task", "ruler:niah_multivalue", "--max-new-tokens", "48",
                                       *self._qa(policies, (str(self.context),), self.budgets))),
            Stage("length-transfer", (*sweep, "--task", "ruler:niah_single_2", "needles", "--max-new-tokens", "16",
                                      *self._qa(policies, tuple(map(str, self.long_contexts)), self.ratios))),
            Stage("dialogue", (*sweep, "--task", "dialogue", "--protocol", PROMPT_ONCE, MULTI_TURN, "--context",
                               str(self.context), "--n", str(self.samples), "--budget", *self.budgets, "--scorer",
                               *policies, *BASELINES)),
            *(Stage(f"long-generation-{text}", (*sweep, *self._stream(text, n), "--scorer", policies[0],
                                                *STREAM_BASELINES))
              for text, n in self.stream_samples),
            *(Stage("long-generation-dialogue-kvp-d", (*sweep, *self._stream(text, n), "--scorer",
                                                       f"kvp:{out / 'kvp-d'}", f"kvp:{out / 'kvp-d-long'}"))
              for text, n in self.stream_samples if text == "dialogue"),
            Stage("report", ("report", str(out / "results.jsonl"), "--out", str(out / "report"))),
        ]
        return result

    def _stream(self, text: str, n: int) -> tuple:
        return ("--task", f"longgen:{text}", "--context", str(self.stream_context), "--every",
                *map(str, self.stream_every), "--n", str(n), "--budget", *self.stream_budgets)

    def _qa(self, policies: list[str], contexts: tuple[str, ...], budgets: tuple[str, ...]) -> tuple:
        return ("--protocol", QUERY_AWARE, QUESTION_AGNOSTIC, "--context", *contexts, "--n", str(self.samples),
                "--budget", *budgets, "--scorer", *policies, *BASELINES)

"""The recipe of a bundled general-purpose policy, KVP-mix (`kvp experiment --preset bundled-smollm2`,
`bundled-qwen2.5`): train it, bundle it into the package, evaluate it.

1. traces   the mix (RULER-style tasks, ShareGPT dialogue, plain essay continuation at 0.5x/1x/2x the context):
            training, validation and held-out test prompts, greedy futures; with code_train > 0 also RULER-style
            needles in a code haystack (`--source ruler --tasks niah_code`) and plain continuation of Python sources
            (`--source code`) at the context, which training and validation read beside the mix
2. train    KVP-mix on every training prompt; the learning curve: policies on the first curve_prompts prompts and at
            curve_steps steps (none: no curve)
3. costs    the held-out ranking cost of each policy and every baseline (and the oracle), per test set
4. bundle   `kvp policies --bundle`: KVP-mix in fp16 as the model's bundled policy, recording the commands that
            made it, this preset's among them (`kvp policies` prints them)
5. sweeps   the bundled policy against every baseline: RULER-style needles and the evaluation-only needles, the
            multi-value needles, ShareGPT dialogue perplexity; `samples` per task on the eval split
6. report   the tables and figures of every result above
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpolicy.compression.catalog import BENCH, SWEEP, default_lineup, needs_utility
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.names import MULTI_TURN, PROMPT_ONCE
from kvpolicy.presets.stage import Stage, traces_command

# the ranking cost compares every baseline a trace can score, and the oracle; the sweeps every baseline
COST_BASELINES = (*default_lineup(BENCH), *needs_utility())
SWEEP_BASELINES = default_lineup(SWEEP, BENCH)
NEEDLES_IN_CODE = ("--tasks", "niah_code")


@dataclass(frozen=True)
class RecipeConfig:
    """Sizes of a bundled policy's recipe. preset: the `kvp experiment --preset` name that runs it, recorded in the
    bundle. *_prompts: prompts per trace set of the mix; code_*: prompts of Python source continuation and
    code_needles*: RULER-style needles hidden as comments in code (both only with code_train > 0). budgets: entries
    per KV head, for the ranking cost and the sweeps; samples: per sweep task; dialogue_protocols: the dialogue
    perplexity's protocols."""

    preset: str
    model: str
    context: int = 2048
    future_tokens: int = 128
    train_prompts: int = 64
    val_prompts: int = 16
    test_prompts: int = 20
    steps: int = 600
    code_train: int = 0
    code_val: int = 2
    code_test: int = 4
    code_needles: int = 12
    code_needles_val: int = 2
    curve_prompts: tuple[int, ...] = (8, 16, 32)
    curve_steps: tuple[int, ...] = (150, 300)
    budgets: tuple[str, ...] = ("64", "128", "256", "512")
    samples: int = 10
    dialogue_protocols: tuple[str, ...] = (PROMPT_ONCE, MULTI_TURN)

    def __post_init__(self):
        sizes = ("context", "future_tokens", "train_prompts", "val_prompts", "test_prompts", "steps", "samples")
        if self.code_train:
            sizes += ("code_val", "code_test", "code_needles", "code_needles_val")
        for name in sizes:
            if getattr(self, name) < 1:
                raise KVPError(f"recipe {self.preset}: {name} must be at least 1")
        if self.code_train < 0 or any(n < 1 for n in (*self.curve_prompts, *self.curve_steps)):
            raise KVPError(f"recipe {self.preset}: code_train must be >= 0 (0: no code) and every curve point >= 1")

    @property
    def summary(self) -> str:
        return f"the recipe of {self.model}'s bundled policy: traces, training, bundling, evaluation"

    def default_out(self, name: str) -> str:
        return f"runs/{self.model}"

    def stages(self, out: Path) -> list[Stage]:
        traces = out / "traces"
        # (trace set, source, split, prompts, extra arguments): the mix, then the code sets
        sets = [("train", "mix", "train", self.train_prompts, ()), ("val", "mix", "val", self.val_prompts, ()),
                ("test", "mix", "test", self.test_prompts, ())]
        if self.code_train:
            sets += [("niah-code-train", "ruler", "train", self.code_needles, NEEDLES_IN_CODE),
                     ("niah-code-val", "ruler", "val", self.code_needles_val, NEEDLES_IN_CODE),
                     ("code-train", "code", "train", self.code_train, ()),
                     ("code-val", "code", "val", self.code_val, ()),
                     ("code-test", "code", "test", self.code_test, ())]
        trace_stages = [Stage(f"traces-{name}", traces_command(
            self.model, source, split, n, self.context, self.future_tokens, traces / name, *extra))
            for name, source, split, n, extra in sets]
        reads = {split: [str(traces / s[0]) for s in sets if s[2] == split] for split in ("train", "val")}
        train = ("train", "--traces", *reads["train"], "--val", *reads["val"], "--out")
        mix = Stage("train-kvp-mix", (*train, str(out / "kvp-mix"), "--steps", str(self.steps)))
        curve = [*(Stage(f"train-curve-prompts-{n}", (*train, str(out / "curve" / f"prompts-{n}"), "--steps",
                                                      str(self.steps), "--prompts", str(n)))
                   for n in self.curve_prompts),
                 *(Stage(f"train-curve-steps-{n}", (*train, str(out / "curve" / f"steps-{n}"), "--steps", str(n)))
                   for n in self.curve_steps)]
        results = str(out / "results.jsonl")
        policies = [f"kvp:{stage.output}" for stage in (mix, *curve)]
        costs = [Stage(f"costs-{name}", (
            "sweep", "--model", self.model, "--out", results, "--task", f"traces:{traces / name}", "--n", str(n),
            "--budget", *self.budgets, "--scorer", *policies, *COST_BASELINES))
            for name, _, split, n, _ in sets if split == "test"]
        inputs = [stage for stage in trace_stages if str(stage.output) in reads["train"] + reads["val"]]
        made_by = [*(_as_recorded(s, out) for s in (*inputs, mix)), f"kvp experiment --preset {self.preset}"]
        bundle = Stage("bundle", ("policies", "--bundle", str(mix.output),
                                  *(arg for line in made_by for arg in ("--made-by", line))))
        sweep = ("sweep", "--model", self.model, "--out", results, "--context", str(self.context), "--n",
                 str(self.samples), "--budget", *self.budgets, "--scorer", f"kvp:{self.model}", *SWEEP_BASELINES)
        return [*trace_stages, mix, *curve, *costs, bundle,
                Stage("ruler", (*sweep, "--task", "ruler:niah_single_2", "needles", "--max-new-tokens", "16")),
                Stage("ruler-multivalue", (*sweep, "--task", "ruler:niah_multivalue", "--max-new-tokens", "48")),
                Stage("dialogue", (*sweep, "--task", "dialogue", "--protocol", *self.dialogue_protocols)),
                Stage("report", ("report", results, "--out", str(out / "report")))]


def _as_recorded(stage: Stage, out: Path) -> str:
    """A stage's command as a bundle records it: without its --out, and with paths inside `out` relative to it."""
    at = stage.argv.index("--out")
    argv = (*stage.argv[:at], *stage.argv[at + 2:])
    return " ".join(("kvp", *(arg.removeprefix(f"{out}/") for arg in argv)))

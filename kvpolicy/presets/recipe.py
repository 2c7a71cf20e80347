"""The recipe of a learned policy: the bundled general-purpose policies, KVP-mix (`kvp experiment --preset
bundled-smollm2`, `bundled-qwen2.5`), and `kvp fit --model MODEL --out DIR`, the same recipe for any supported model.
Both are one RecipeConfig: `kvp fit` runs its first stages (1-3, plus a short accuracy check), a bundled recipe all.

1. traces   the mix (RULER-style tasks, ShareGPT dialogue, plain essay continuation at 0.5x/1x/2x the context):
            training, validation and held-out test prompts, greedy futures; with code_train > 0 also RULER-style
            needles in a code haystack (`--source ruler --tasks niah_code`) and plain continuation of Python sources
            (`--source code`) at the context, which training and validation read beside the mix
2. train    KVP-mix on every training prompt; the learning curve: policies on the first curve_prompts prompts and at
            curve_steps steps (none: no curve)
3. costs    the held-out ranking cost of each policy and every baseline (and the oracle), per test set; with
            check_samples > 0 a short accuracy check: KVP-mix against the attention-free heuristics on a few
            RULER-style samples at two budgets
   policy   `kvp export`: KVP-mix as a deployable policy folder (OUT/policy), its card holding the held-out costs
            just measured and the commands that made it
4. bundle   `kvp policies --bundle`: KVP-mix in fp16 as the model's bundled policy, recording the commands that
            made it, this preset's among them (`kvp policies` prints them)
5. sweeps   the bundled policy against every baseline: RULER-style needles and the evaluation-only needles, the
            multi-value needles, ShareGPT dialogue perplexity; `samples` per task on the eval split
6. report   the tables and figures of every result above
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpolicy.compression.catalog import BENCH, SWEEP, attention_free, default_lineup, needs_utility
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.names import MULTI_TURN, PROMPT_ONCE, QUERY_AWARE
from kvpolicy.presets.stage import Stage, traces_command

# the ranking cost compares every baseline a trace can score, and the oracle; the sweeps every baseline
COST_BASELINES = (*default_lineup(BENCH), *needs_utility())
SWEEP_BASELINES = default_lineup(SWEEP, BENCH)
NEEDLES_IN_CODE = ("--tasks", "niah_code")
# the code sets the Qwen2.5-Coder policy was trained with (`kvp fit --code` adds them too)
CODE_SETS = {"code_train": 30, "code_needles": 24}
# the accuracy check: a RULER-style needle task SmolLM2 answers with the full cache, KVP-mix against the
# attention-free heuristics of the sweep's line-up (Random, a floor, left out), answers of up to 16 tokens
CHECK_TASK = "ruler:niah_single_2"
CHECK_BASELINES = tuple(s for s in default_lineup(SWEEP) if s in attention_free() and s != "random")
CHECK_ANSWER_TOKENS = 16
PLACEMENT = ("--device", "--dtype")  # left out of the commands a policy records: they do not change what it is


@dataclass(frozen=True)
class RecipeConfig:
    """Sizes of a policy's recipe. preset: the `kvp experiment --preset` name that runs it, recorded in the policy
    (`command`, when given, is recorded instead: `kvp fit`'s command line). *_prompts: prompts per trace set of the
    mix; code_*: prompts of Python source continuation and code_needles*: RULER-style needles hidden as comments in
    code (both only with code_train > 0). budgets: entries per KV head, for the ranking cost and the sweeps;
    samples: per sweep task; dialogue_protocols: the dialogue perplexity's protocols. check_samples: samples of the
    accuracy check at each of check_budgets (0: no check). bundled: bundle the policy into the package and evaluate
    it (stages 4-6); False is `kvp fit`. device, dtype: where the commands run the model (None: placement's
    defaults); compile: torch.compile the policy in training."""

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
    check_samples: int = 0
    check_budgets: tuple[str, ...] = ("128", "256")
    bundled: bool = True
    command: str = ""
    device: str | None = None
    dtype: str | None = None
    compile: bool = True

    def __post_init__(self):
        sizes = ("context", "future_tokens", "train_prompts", "val_prompts", "test_prompts", "steps", "samples")
        if self.code_train:
            sizes += ("code_val", "code_test", "code_needles", "code_needles_val")
        for name in sizes:
            if getattr(self, name) < 1:
                raise KVPError(f"recipe {self.preset}: {name} must be at least 1")
        if self.code_train < 0 or any(n < 1 for n in (*self.curve_prompts, *self.curve_steps)):
            raise KVPError(f"recipe {self.preset}: code_train must be >= 0 (0: no code) and every curve point >= 1")
        if self.check_samples < 0 or (self.check_samples and not self.check_budgets):
            raise KVPError(f"recipe {self.preset}: check_samples must be >= 0 (0: no accuracy check), with "
                           "check_budgets to check at")

    @property
    def summary(self) -> str:
        if not self.bundled:
            return (f"a KVP policy for {self.model}: traces, training, held-out costs"
                    f"{', an accuracy check' if self.check_samples else ''}, the policy folder")
        return f"the recipe of {self.model}'s bundled policy: traces, training, bundling, evaluation"

    def default_out(self, name: str) -> str:
        return f"runs/{self.model}"

    @property
    def made_by(self) -> str:
        """The command that runs the whole recipe, as the policy records it."""
        return self.command or f"kvp experiment --preset {self.preset}"

    def stages(self, out: Path) -> list[Stage]:
        """Every stage: `fit_stages`, then (for a bundled policy) bundling, the sweeps and the report."""
        fit = self.fit_stages(out)
        if not self.bundled:
            return fit
        results = str(out / "results.jsonl")
        mix = next(s for s in fit if s.name == "train-kvp-mix")
        inputs = self._recorded_inputs(fit, out)
        bundle = Stage("bundle", ("policies", "--bundle", str(mix.output),
                                  *(arg for line in inputs for arg in ("--made-by", line))))
        sweep = ("sweep", "--model", self.model, "--out", results, "--context", str(self.context), "--n",
                 str(self.samples), "--budget", *self.budgets, "--scorer", f"kvp:{self.model}", *SWEEP_BASELINES,
                 *self._placement())
        return [*fit, bundle,
                Stage("ruler", (*sweep, "--task", "ruler:niah_single_2", "needles", "--max-new-tokens", "16")),
                Stage("ruler-multivalue", (*sweep, "--task", "ruler:niah_multivalue", "--max-new-tokens", "48")),
                Stage("dialogue", (*sweep, "--task", "dialogue", "--protocol", *self.dialogue_protocols)),
                Stage("report", ("report", results, "--out", str(out / "report")))]

    def fit_stages(self, out: Path) -> list[Stage]:
        """The stages that make the policy and measure it: traces, training (and the learning curve), held-out
        costs, the accuracy check (check_samples > 0) and the deployable policy folder OUT/policy."""
        traces = out / "traces"
        placement = self._placement()
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
            self.model, source, split, n, self.context, self.future_tokens, traces / name, *extra, *placement))
            for name, source, split, n, extra in sets]
        reads = {split: [str(traces / s[0]) for s in sets if s[2] == split] for split in ("train", "val")}
        device = placement[:2] if self.device else ()  # `kvp train` takes --device only
        options = (*(() if self.compile else ("--no-compile",)), *device)
        train = ("train", "--traces", *reads["train"], "--val", *reads["val"], "--out")
        mix = Stage("train-kvp-mix", (*train, str(out / "kvp-mix"), "--steps", str(self.steps), *options))
        curve = [*(Stage(f"train-curve-prompts-{n}", (*train, str(out / "curve" / f"prompts-{n}"), "--steps",
                                                      str(self.steps), "--prompts", str(n), *options))
                   for n in self.curve_prompts),
                 *(Stage(f"train-curve-steps-{n}", (*train, str(out / "curve" / f"steps-{n}"), "--steps", str(n),
                                                    *options))
                   for n in self.curve_steps)]
        results = str(out / "results.jsonl")
        policies = [f"kvp:{stage.output}" for stage in (mix, *curve)]
        tests = [traces / name for name, _, split, _, _ in sets if split == "test"]
        costs = [Stage(f"costs-{name}", (
            "sweep", "--model", self.model, "--out", results, "--task", f"traces:{traces / name}", "--n", str(n),
            "--budget", *self.budgets, "--scorer", *policies, *COST_BASELINES, *placement))
            for name, _, split, n, _ in sets if split == "test"]
        check = [Stage("accuracy-check", (
            "sweep", "--model", self.model, "--out", results, "--task", CHECK_TASK, "--protocol", QUERY_AWARE,
            "--context", str(self.context), "--n", str(self.check_samples), "--budget", *self.check_budgets,
            "--max-new-tokens", str(CHECK_ANSWER_TOKENS), "--scorer", f"kvp:{mix.output}", *CHECK_BASELINES,
            *placement))] if self.check_samples else []
        plan = [*trace_stages, mix, *curve, *costs, *check]
        policy = Stage("policy", ("export", "--policy", str(mix.output), "--results", results, "--traces",
                                  *map(str, tests), "--out", str(out / "policy"),
                                  *(arg for line in self._recorded_inputs(plan, out) for arg in ("--made-by", line))))
        return [*plan, policy]

    def _placement(self) -> tuple[str, ...]:
        return (*(("--device", self.device) if self.device else ()), *(("--dtype", self.dtype) if self.dtype else ()))

    def _recorded_inputs(self, plan: list[Stage], out: Path) -> list[str]:
        """The commands a policy records as what made it: the trace sets it trained and validated on, its
        training, and the command that runs the whole recipe."""
        mix = next(s for s in plan if s.name == "train-kvp-mix")
        read = set(mix.argv[mix.argv.index("--traces") + 1:mix.argv.index("--out")]) - {"--val"}
        inputs = [stage for stage in plan if str(stage.output) in read]
        return [*(_as_recorded(s, out) for s in (*inputs, mix)), self.made_by]


def _as_recorded(stage: Stage, out: Path) -> str:
    """A stage's command as a policy records it: without its --out and placement, and with paths inside `out`
    relative to it."""
    flags = [i for i, arg in enumerate(stage.argv) if arg in ("--out", *PLACEMENT)]
    dropped = {*flags, *(i + 1 for i in flags)}  # each flag and its value
    argv = [arg for i, arg in enumerate(stage.argv) if i not in dropped]
    return " ".join(("kvp", *(arg.removeprefix(f"{out}/") for arg in argv)))

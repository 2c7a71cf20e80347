"""The comparison that decides whether to use KVP (`kvp experiment --preset compare-smollm2`, `compare-qwen2.5`):
KVP-mix against the methods users pick today, on a clean and complete RULER-style benchmark, for one model.

Seed 0 is what kvpolicy ships: the bundled KVP-mix (`kvp:MODEL`, made by the recipe `bundled-*`) and the shipped
KVzap weights (`kvzap_linear`, `kvzap_mlp`, made by `kvp train-kvzap` with the recipe's prompts and seed 0). Its
results therefore stay valid in any checkout, and the sweeps resume across sessions from the committed archive
(`kvp results unpack docs/results/MODEL-compare/results.jsonl.gz --out OUT/compare.jsonl`). The other seeds are
trained here.

1. sweeps   seed 0's KVP-mix and KVzap, KVzip, KVzip+, AdaKV (over ExpectedAttention and SnapKV), PyramidKV, both
            SnapKV windows, the heuristics and the full cache on the eleven RULER-style tasks and the evaluation-only
            needles, at 2K and 4K, at kvpress's leaderboard ratios (25, 50, 75 and 87.5% removed) and, at 2K, at the
            small token budgets of the other studies; query-aware and question-agnostic; `samples` prompts per task
            and point on the eval split. These need no training, so they come first
2. traces   the bundled recipe's own training and validation traces (the same stages: run into the recipe's output
            directory, the comparison reuses what the recipe recorded, and the reverse)
3. train    KVP-mix once per further seed, and KVzap's MLP on the same prompts and held-out split (`kvp train-kvzap
            --fit-seed`): its data collected once (into kvzap-data/) and shared by every seed, as KVP-mix's seeds share
            their traces; the ridge fit is closed-form, the same whatever the seed, so the linear model has seed 0 only
4. sweeps   the other seeds' KVP-mix and KVzap MLP at the same points, then KVzap's thresholded form (kvpress
            DMSPress's rule, its threshold calibrated per budget on the training prompts) of every seed, at the
            leaderboard ratios only (it keeps its 128 newest entries whatever the budget)
5. report   per task, the RULER average, seed means and spreads, Holm-marked paired differences

On the 2-core CPU this is days of compute (KVzip alone costs 4-5 prefills there): every stage resumes, so it runs
across sessions, or on a GPU in hours.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpolicy.compression.catalog import BENCH, SWEEP, default_lineup
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.names import QUERY_AWARE, QUESTION_AGNOSTIC
from kvpolicy.policy.config import KVZAP_KINDS
from kvpolicy.presets.recipe import RecipeConfig
from kvpolicy.presets.stage import Stage

QUERY_AGNOSTIC_METHODS = ("kvzip", "kvzip_plus")  # kvpress's strongest: scored by reconstructing the cached text
# kvpress's head- and layer-adaptive presses, each SnapKV-based one with both windows
ADAPTIVE_METHODS = ("adakv_expected_attention", "adakv_snapkv", "adakv_snapkv_w16", "pyramidkv", "pyramidkv_w16")


@dataclass(frozen=True)
class CompareConfig:
    """Sizes of the comparison for the model of `recipe` (whose traces and KVP-mix recipe it shares). seeds: training
    seeds of KVP-mix and KVzap (at least 3, to report a spread); contexts: prompt lengths of the sweeps; ratios:
    kvpress's leaderboard compression ratios (fraction removed); budgets: token budgets added at the recipe's
    context; samples: prompts per task and point."""

    recipe: RecipeConfig
    seeds: tuple[int, ...] = (0, 1, 2)
    contexts: tuple[int, ...] = (2048, 4096)
    ratios: tuple[str, ...] = ("0.25", "0.5", "0.75", "0.875")
    budgets: tuple[str, ...] = ("64", "128", "256")
    samples: int = 30

    def __post_init__(self):
        if len(self.seeds) < 3 or len(set(self.seeds)) != len(self.seeds) or 0 not in self.seeds:
            raise KVPError("compare: give at least 3 distinct seeds, 0 among them (what kvpolicy ships)")
        if self.samples < 1 or not self.contexts or not self.ratios:
            raise KVPError("compare: need samples >= 1, at least one context and at least one ratio")

    @property
    def model(self) -> str:
        return self.recipe.model

    @property
    def summary(self) -> str:
        return (f"KVP-mix against KVzap, KVzip and the heuristics on {self.model}: {len(self.seeds)} seeds, 11 "
                f"RULER-style tasks and the needles at {', '.join(map(str, self.contexts))} tokens")

    def default_out(self, name: str) -> str:
        return self.recipe.default_out(self.recipe.preset)  # the recipe's directory: its traces serve both

    def stages(self, out: Path) -> list[Stage]:
        planned = {s.name: s for s in self.recipe.stages(out)}
        mix = planned["train-kvp-mix"]
        reads = set(mix.argv)  # the trace directories KVP-mix trains and validates on
        traces = [s for s in planned.values() if s.name.startswith("traces-") and str(s.output) in reads]
        seeds = [seed for seed in self.seeds if seed]
        policies = [Stage(f"train-kvp-mix-s{seed}", (*_without_out(mix.argv), "--out", str(out / f"kvp-mix-s{seed}"),
                                                     "--seed", str(seed))) for seed in seeds]
        r = self.recipe
        kvzap = [Stage(f"train-kvzap-s{seed}", (
            "train-kvzap", "--model", self.model, "--source", "mix", "--split", "train", "--n", str(r.train_prompts),
            "--context", str(r.context), "--val-split", "val", "--val-n", str(r.val_prompts), "--kind", "mlp",
            "--seed", "0", "--fit-seed", str(seed), "--data", str(out / "kvzap-data"), "--out",
            str(out / f"kvzap-s{seed}"))) for seed in seeds]
        shipped = (f"kvp:{self.model}", *(f"kvzap_{kind}" for kind in KVZAP_KINDS), *QUERY_AGNOSTIC_METHODS,
                   *ADAPTIVE_METHODS, *default_lineup(SWEEP, BENCH))
        trained = (*(f"kvp:{s.output}" for s in policies), *(f"kvzap_mlp:{s.output}" for s in kvzap))
        thresholded = (*(f"kvzap_{kind}_threshold" for kind in KVZAP_KINDS),
                       *(f"kvzap_mlp_threshold:{s.output}" for s in kvzap))
        results = str(out / "compare.jsonl")
        ratios = tuple(f"r{ratio}" for ratio in self.ratios)

        def sweeps(name: str, scorers: tuple[str, ...], small: bool = True) -> list[Stage]:
            """One sweep of `scorers` per context; `small`: with the token budgets at the recipe's context."""
            return [Stage(f"{name}-{context}", self._sweep(results, context, (
                *ratios, *(self.budgets if small and context == r.context else ())), scorers))
                for context in self.contexts]

        report = Stage("report", ("report", results, "--out", str(out / "compare-report")))
        # what ships first (it needs no training, so its results come first), then the other seeds; KVzap's
        # thresholded form keeps its 128 newest entries whatever the budget: the leaderboard ratios only
        return [*sweeps("compare", shipped), *traces, *policies, *kvzap, *sweeps("seeds", trained),
                *sweeps("compare-threshold", thresholded, small=False), report]

    def _sweep(self, results: str, context: int, budgets: tuple[str, ...], scorers: tuple[str, ...]) -> tuple:
        """The `kvp sweep` of `scorers` at `budgets` on every task of the comparison at `context` tokens."""
        return ("sweep", "--model", self.model, "--out", results, "--task", "ruler", "needles", "--protocol",
                QUERY_AWARE, QUESTION_AGNOSTIC, "--context", str(context), "--n", str(self.samples), "--budget",
                *budgets, "--scorer", *scorers)


def _without_out(argv: tuple[str, ...]) -> tuple[str, ...]:
    """A command without its `--out DIR`."""
    at = argv.index("--out")
    return argv[:at] + argv[at + 2:]

"""The presets of `kvp experiment`: every run the project reports, each a config (a frozen dataclass of sizes) whose
`stages(out)` are the `kvp` commands that make it, into one output directory (stage.PresetConfig).

- study.py   the study behind docs/RESULTS.md, per model (`smollm2`, `qwen2.5`)
- recipe.py  the recipe of each bundled policy: traces, training, bundling, evaluation (`bundled-smollm2`,
             `bundled-qwen2.5`); its first stages are `kvp fit`'s (fit.py: the recipe for any model)
- demo.py    the demo `kvp demo` runs (`demo`), and its smoke version (`demo-quick`, `kvp demo --quick`)
- compare.py the comparison against KVzap, KVzip and the heuristics, per model (`compare-smollm2`,
             `compare-qwen2.5`), sharing the recipe's traces

Plain values only (no torch), so that `kvp --help` lists them at once.
"""

from __future__ import annotations

from kvpolicy.evaluation.names import PROMPT_ONCE
from kvpolicy.presets.compare import CompareConfig
from kvpolicy.presets.demo import QUICK, DemoConfig
from kvpolicy.presets.recipe import CODE_SETS, RecipeConfig
from kvpolicy.presets.stage import PresetConfig
from kvpolicy.presets.study import StudyConfig

# the sizes the shipped policies were made with (their bundle records the commands); the Qwen2.5-Coder policy also
# reads the code traces, has no learning curve, and its dialogue perplexity was measured prompt-once only
RECIPES = (
    RecipeConfig("bundled-smollm2", "smollm2-135m"),
    RecipeConfig("bundled-qwen2.5", "qwen2.5-0.5b", train_prompts=32, val_prompts=8, test_prompts=12, steps=2000,
                 **CODE_SETS, curve_prompts=(), curve_steps=(), dialogue_protocols=(PROMPT_ONCE,)),
)

PRESETS: dict[str, PresetConfig] = {
    # SmolLM2 has 8,192 positions: its "8K" prompts leave room for the 16 answer tokens
    "smollm2": StudyConfig("smollm2-135m", long_contexts=(4096, 8176)),
    "qwen2.5": StudyConfig("qwen2.5-0.5b"),
    **{recipe.preset: recipe for recipe in RECIPES},
    **{f"compare-{recipe.preset.removeprefix('bundled-')}": CompareConfig(recipe) for recipe in RECIPES},
    "demo": DemoConfig(),
    "demo-quick": QUICK,
}

"""`kvp fit --model MODEL --out DIR`: the bundled policies' recipe (recipe.py) for any supported model, without
bundling it into the package and, by default, without the learning curve; with a short accuracy check, and the
deployable policy folder OUT/policy as its last stage. At the default sizes its traces and training are
`bundled-smollm2`'s, so `kvp fit --model smollm2-135m` remakes the shipped SmolLM2 policy.

Plain values only (no torch), so that `kvp fit --help` shows the defaults at once.
"""

from __future__ import annotations

from kvpolicy.presets.recipe import CODE_SETS, RecipeConfig

DEFAULTS = RecipeConfig("fit", "MODEL", curve_prompts=(), curve_steps=(), check_samples=4, bundled=False)
SMALLEST_BUDGET = 32  # entries per head: the 4 sinks and 16 recent tokens every method keeps, and room to rank


def budgets(context: int) -> tuple[str, ...]:
    """The held-out costs' budgets at `context` tokens: 1/32, 1/16, 1/8 and 1/4 of it (64 to 512 at 2,048 tokens, the
    bundled recipes' budgets), none below SMALLEST_BUDGET."""
    return tuple(dict.fromkeys(str(max(SMALLEST_BUDGET, context // k)) for k in (32, 16, 8, 4)))


def check_budgets(context: int) -> tuple[str, ...]:
    """The accuracy check's two budgets: 1/16 and 1/8 of the context (128 and 256 at 2,048 tokens), where the
    heuristics and a learned policy differ most, none below SMALLEST_BUDGET."""
    return tuple(dict.fromkeys(str(max(SMALLEST_BUDGET * factor, context // k)) for factor, k in ((1, 16), (2, 8))))


def fit_recipe(model: str, context: int = DEFAULTS.context, future_tokens: int = DEFAULTS.future_tokens,
               train_prompts: int = DEFAULTS.train_prompts, val_prompts: int = DEFAULTS.val_prompts,
               test_prompts: int = DEFAULTS.test_prompts, steps: int = DEFAULTS.steps, code: bool = False,
               check_samples: int = DEFAULTS.check_samples, compile: bool = True, device: str | None = None,
               dtype: str | None = None) -> RecipeConfig:
    """The recipe `kvp fit` runs with these options; it records its own command line (all but --out and the
    placement) as the command that made the policy."""
    command = " ".join(["kvp fit", "--model", model, "--context", str(context), "--future-tokens", str(future_tokens),
                        "--train-prompts", str(train_prompts), "--val-prompts", str(val_prompts), "--test-prompts",
                        str(test_prompts), "--steps", str(steps), *(["--code"] if code else []), "--check-samples",
                        str(check_samples), *([] if compile else ["--no-compile"])])
    return RecipeConfig(
        "fit", model, context=context, future_tokens=future_tokens, train_prompts=train_prompts,
        val_prompts=val_prompts, test_prompts=test_prompts, steps=steps, **(CODE_SETS if code else {}),
        curve_prompts=(), curve_steps=(), budgets=budgets(context), check_samples=check_samples,
        check_budgets=check_budgets(context), bundled=False, command=command, device=device, dtype=dtype,
        compile=compile)


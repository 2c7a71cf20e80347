"""The demo (`kvp demo`, `kvp experiment --preset demo`): the whole story on SmolLM2 in about 7 minutes on a 2-core
CPU (measured; the stages' times are in DemoConfig).

1. traces   future-utility traces of RULER-style prompts (train split, plus a few held-out test prompts)
2. train    the 90 per-head KVP agents, with RL
3. sweeps   KVP (and, beside it, the policy bundled for the model, trained once on the general mix) against the
            sweep's default baselines (compression/catalog.py) at a few budgets: RULER-style accuracy (the "eval"
            split, never seen in training) at the trained context and at twice it, dialogue perplexity (ShareGPT, a
            corpus the agents were not trained on: the cross-corpus check) and the reward-level ranking cost on the
            held-out traces
4. report   the HTML/Markdown report (`kvp demo` then prints its tables)

Everything is real: the real model, real text, trained agents and measured numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpolicy.compression.catalog import SWEEP, default_lineup, needs_utility
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.names import MULTI_TURN, PROMPT_ONCE, QUERY_AWARE
from kvpolicy.models.registry import DEFAULT_MODEL
from kvpolicy.presets.stage import Stage, traces_command

DEMO_OUT = "kvp-demo"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of every stage. `kvp demo` with these took, on a 2-core CPU (load 1.9, the demo's own threads) with
    the model already converted and the bundled policy evaluated too: traces (28 prompts) 154 s, training 21 s,
    evaluation 224 s (569 results), 6 min 45 s in all, peak memory 2.3 GB (2026-12-07; 4 samples per RULER task, the
    multi-value task at 2K too and 3 dialogues took 9 min 46 s to 11 min 51 s).
    long_context_tokens: long_tasks (some of eval_tasks) again at this longer context than the traces' (0: skip),
    with long_samples samples per task. eval_tasks: (RULER task, answer-token cap) pairs: tasks SmolLM2 solves with the
    full cache at 1K, the multi-value one with room for its four values. device, dtype:
    kvpolicy.models.placement's defaults (CUDA + bf16 where available, else CPU + fp32) when None.
    `QUICK` is a smoke version of the same pipeline at tiny sizes."""

    model: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str | None = None
    context_tokens: int = 1024
    future_tokens: int = 48
    train_traces: int = 24
    test_traces: int = 4
    train_steps: int = 200
    train_compile: bool = True
    eval_tasks: tuple[tuple[str, int], ...] = (("ruler:niah_single_1", 16), ("ruler:niah_single_2", 16),
                                               ("ruler:niah_multivalue", 48))
    eval_samples: int = 3
    long_context_tokens: int = 2048
    long_samples: int = 2
    long_tasks: tuple[str, ...] = ("ruler:niah_single_1", "ruler:niah_single_2")
    dialogue_samples: int = 2
    budgets: tuple[str, ...] = ("64", "128", "256")
    baselines: tuple[str, ...] = default_lineup(SWEEP)

    def __post_init__(self):
        for name in ("context_tokens", "future_tokens", "train_traces", "test_traces", "train_steps", "eval_samples",
                     "long_samples", "dialogue_samples"):
            if getattr(self, name) < 1:
                raise KVPError(f"demo: {name} must be at least 1")
        if self.long_context_tokens and self.long_context_tokens <= self.context_tokens:
            raise KVPError("demo: long_context_tokens must exceed context_tokens (or be 0 to skip that check)")
        if not self.eval_tasks or any(cap < 1 for _, cap in self.eval_tasks):
            raise KVPError("demo: give at least one (task, answer-token cap >= 1) in eval_tasks")
        if self.long_context_tokens and not self.long_tasks or set(self.long_tasks) - {t for t, _ in self.eval_tasks}:
            raise KVPError("demo: long_tasks must be some of eval_tasks' tasks (at least one when long_context_tokens "
                           "is set)")
        if self.train_traces < 4:
            raise KVPError("demo: need at least 4 training traces (some are held out for validation)")

    @property
    def summary(self) -> str:
        return (f"the demo on {self.model}: traces of {self.train_traces} RULER-style prompts at {self.context_tokens} "
                f"tokens, {self.train_steps} RL steps, sweeps at budgets {', '.join(self.budgets)}, report")

    def default_out(self, name: str) -> str:
        return DEMO_OUT

    def stages(self, out: Path) -> list[Stage]:
        from kvpolicy.policy.bundled import bundled_policies  # imports torch: only once stages are asked for

        device = ("--device", self.device) if self.device else ()
        placement = (*device, *(("--dtype", self.dtype) if self.dtype else ()))
        traces, policy = out / "traces", out / "kvp-policy"
        result = [Stage(f"traces-{split}", traces_command(
            self.model, "ruler", split, n, self.context_tokens, self.future_tokens, traces / split, *placement))
            for split, n in (("train", self.train_traces), ("test", self.test_traces))]
        every = str(max(1, self.train_steps // 4))  # validate (on 4 held-out prompts) and checkpoint 4 times
        result.append(Stage("train", (
            "train", "--traces", str(traces / "train"), "--out", str(policy), "--steps", str(self.train_steps),
            "--warmup", str(min(100, self.train_steps // 5)), "--val-every", every, "--val-samples", "4",
            "--checkpoint-every", every, *(() if self.train_compile else ("--no-compile",)), *device)))
        bundled = [f"kvp:{self.model}"] if self.model in bundled_policies() else []  # what users get by default
        scorers = ("--scorer", f"kvp:{policy}", *bundled, *self.baselines)
        sweep = ("sweep", "--model", self.model, "--out", str(out / "results.jsonl"), "--budget", *self.budgets)
        runs = [(self.eval_samples, self.context_tokens, [t for t, _ in self.eval_tasks])]
        if self.long_context_tokens:
            runs.append((self.long_samples, self.long_context_tokens, list(self.long_tasks)))
        for n, context, names in runs:
            by_cap: dict[int, list[str]] = {}
            for task, cap in self.eval_tasks:
                if task in names:
                    by_cap.setdefault(cap, []).append(task)
            result += [Stage(f"ruler-{context}-answer{cap}", (
                *sweep, "--task", *tasks, "--protocol", QUERY_AWARE, "--context", str(context), "--n", str(n),
                "--max-new-tokens", str(cap), *scorers, *placement)) for cap, tasks in by_cap.items()]
        trained_at = ("--context", str(self.context_tokens))
        return [*result,
                Stage("dialogue", (*sweep, "--task", "dialogue", "--protocol", PROMPT_ONCE, MULTI_TURN, *trained_at,
                                   "--n", str(self.dialogue_samples), *scorers, *placement)),
                Stage("costs", (*sweep, "--task", f"traces:{traces / 'test'}", *trained_at, "--n",
                                str(self.test_traces), *scorers, *needs_utility(), *placement)),
                Stage("report", ("report", str(out / "results.jsonl"), "--out", str(out / "report")))]


QUICK = DemoConfig(context_tokens=256, future_tokens=8, train_traces=6, test_traces=2, train_steps=6,
                   train_compile=False,
                   eval_tasks=(("ruler:niah_single_1", 6),), eval_samples=1, long_context_tokens=384, long_samples=1,
                   long_tasks=("ruler:niah_single_1",),
                   dialogue_samples=1, budgets=("32", "64"))

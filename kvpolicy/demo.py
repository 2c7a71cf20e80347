"""`kvp demo`: the whole story on SmolLM2 in one command, about 10 minutes on a 2-core CPU (measured by running
`kvp demo`; the stages' times are in DemoConfig).

1. traces   record future-utility traces of RULER-style prompts (train split, plus a few held-out test prompts)
2. train    train the 90 per-head KVP agents on them with RL
3. evaluate KVP (and, beside it, the policy bundled for the model, trained once on the general mix) against
            the sweep's default baselines (compression/catalog.py) at a few budgets: RULER-style
            accuracy (the "eval" split, never seen in training) at the trained context and at twice it, dialogue
            perplexity (ShareGPT, a corpus the agents were not trained on: the cross-corpus check) and the
            reward-level ranking cost on the held-out traces
4. report   print the tables, write the HTML/Markdown report

Everything is real: the real model, real text, trained agents and measured numbers. Every stage writes into the
output directory and a re-run reuses what is finished (a killed demo resumes).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvpolicy.errors import KVPError
from kvpolicy.compression.catalog import SWEEP, default_lineup
from kvpolicy.models.placement import add_placement_arguments
from kvpolicy.models.registry import DEFAULT_MODEL


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of every stage. `kvp demo` with these took, on a 2-core CPU (load 1.5 at the start, 1.9 at the end)
    with the model already converted and the bundled policy evaluated too: traces (28 prompts) 141 s, training 30 s,
    evaluation 406 s (744 results), 9 min 46 s in all, peak memory 2.4 GB (5 and 3 samples per RULER task took
    10 min 38 s). long_context_tokens: the RULER-style tasks
    again at this longer context than the traces' (0: skip), with long_samples samples per task. eval_tasks:
    (RULER task, answer-token cap) pairs: tasks SmolLM2 solves with the full cache at 1K, the multi-value one with
    room for its four values.
    `QUICK` is a smoke version of the same pipeline at tiny sizes."""

    out: str = "kvp-demo"
    model: str = DEFAULT_MODEL
    device: str | None = None  # kvpolicy.models.placement's defaults: CUDA + bf16 where available, else CPU + fp32
    dtype: str | None = None
    context_tokens: int = 1024
    future_tokens: int = 48
    train_traces: int = 24
    test_traces: int = 4
    train_steps: int = 200
    train_compile: bool = True
    eval_tasks: tuple[tuple[str, int], ...] = (("ruler:niah_single_1", 16), ("ruler:niah_single_2", 16),
                                               ("ruler:niah_multivalue", 48))
    eval_samples: int = 4
    long_context_tokens: int = 2048
    long_samples: int = 2
    dialogue_samples: int = 3
    budgets: tuple[str, ...] = ("64", "128", "256")
    baselines: tuple[str, ...] = field(default_factory=lambda: default_lineup(SWEEP))

    def __post_init__(self):
        for name in ("context_tokens", "future_tokens", "train_traces", "test_traces", "train_steps", "eval_samples",
                     "long_samples", "dialogue_samples"):
            if getattr(self, name) < 1:
                raise KVPError(f"demo: {name} must be at least 1")
        if self.long_context_tokens and self.long_context_tokens <= self.context_tokens:
            raise KVPError("demo: long_context_tokens must exceed context_tokens (or be 0 to skip that check)")
        if not self.eval_tasks or any(cap < 1 for _, cap in self.eval_tasks):
            raise KVPError("demo: give at least one (task, answer-token cap >= 1) in eval_tasks")
        if self.train_traces < 4:
            raise KVPError("demo: need at least 4 training traces (some are held out for validation)")


QUICK = DemoConfig(context_tokens=256, future_tokens=8, train_traces=6, test_traces=2, train_steps=6,
                   train_compile=False,
                   eval_tasks=(("ruler:niah_single_1", 6),), eval_samples=1, long_context_tokens=384, long_samples=1,
                   dialogue_samples=1, budgets=("32", "64"))


@dataclass
class DemoPaths:
    root: Path

    @property
    def train_traces(self) -> Path:
        return self.root / "traces" / "train"

    @property
    def test_traces(self) -> Path:
        return self.root / "traces" / "test"

    @property
    def checkpoint(self) -> Path:
        return self.root / "kvp-policy"

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report"


def _stage(number: int, title: str) -> float:
    print(f"\n[{number}/4] {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    print(f"      {what} ({time.perf_counter() - start:.0f} s)", flush=True)


def record_demo_traces(handle, cfg: DemoConfig, paths: DemoPaths) -> None:
    from kvpolicy.traces.pipeline import TraceRunConfig, record_traces
    from kvpolicy.traces.future import FutureConfig

    future = FutureConfig("greedy", cfg.future_tokens)
    splits = (("train", cfg.train_traces, paths.train_traces), ("test", cfg.test_traces, paths.test_traces))
    for split, n, out in splits:
        run = TraceRunConfig(source="ruler", split=split, n=n, context_tokens=cfg.context_tokens, future=future)
        manifest = _finished_traces(out, run)
        if manifest is None:  # (re)record: a killed run resumes from its complete shards
            manifest = record_traces(handle, run, out)
        print(f"      {split}: {manifest['n_samples']} prompts, {manifest['prompt_tokens']} prompt tokens, "
              f"{manifest['generation_seconds']:.0f} s of model time in total -> {out}")


def _finished_traces(out: Path, run) -> dict | None:
    """The manifest of a finished trace set recorded with `run`'s settings, else None. Reusing it untouched keeps
    its hash, so the policy trained on it is reused too."""
    from kvpolicy.traces.store import TraceReader

    try:
        manifest = TraceReader(out).manifest
    except KVPError:
        return None
    same = (manifest.get("n_samples") == run.n and manifest.get("context_tokens") == run.context_tokens
            and manifest.get("split") == run.split
            and manifest.get("future", {}).get("max_tokens") == run.future.max_tokens)
    return manifest if same else None


def train_demo_policy(cfg: DemoConfig, paths: DemoPaths) -> None:
    from kvpolicy.distributed import DistContext
    from kvpolicy.models.placement import resolve_device
    from kvpolicy.traces.store import TraceReader
    from kvpolicy.training.trainer import TrainConfig, Trainer

    every = max(1, cfg.train_steps // 4)
    config = TrainConfig(steps=cfg.train_steps, val_every=every, checkpoint_every=every, val_samples=4,
                         warmup=min(100, cfg.train_steps // 5), compile=cfg.train_compile)
    trainer = Trainer(TraceReader(paths.train_traces), paths.checkpoint, config=config,
                      ctx=DistContext(device=resolve_device(cfg.device)))
    result = trainer.run()
    print(f"      {result.steps} steps, {result.n_parameters:,} parameters; best validation reward "
          f"{result.best_val_reward:.3f} at step {result.best_step} (-1 = oracle) -> {paths.checkpoint}")


def evaluate_demo(cfg: DemoConfig, paths: DemoPaths):
    from kvpolicy.evaluation.names import MULTI_TURN, PROMPT_ONCE, QUERY_AWARE
    from kvpolicy.evaluation.sweep import SweepConfig, run_sweep
    from kvpolicy.policy.bundled import bundled_policies

    bundled = [f"kvp:{cfg.model}"] if cfg.model in bundled_policies() else []  # the policy users get by default
    scorers = [f"kvp:{paths.checkpoint}", *bundled, *cfg.baselines]
    by_cap: dict[int, list[str]] = {}
    for task, cap in cfg.eval_tasks:
        by_cap.setdefault(cap, []).append(task)
    ruler_runs = [(cfg.eval_samples, cfg.context_tokens)]
    if cfg.long_context_tokens:
        ruler_runs.append((cfg.long_samples, cfg.long_context_tokens))
    # (tasks, samples per task, protocols, context length, extra scorers, answer-token cap (0: the task's own))
    blocks = [(tasks, n, [QUERY_AWARE], context, [], cap)
              for n, context in ruler_runs for cap, tasks in by_cap.items()]
    blocks += [(["dialogue"], cfg.dialogue_samples, [PROMPT_ONCE, MULTI_TURN], cfg.context_tokens, [], 0),
               ([f"traces:{paths.test_traces}"], cfg.test_traces, [], cfg.context_tokens, ["oracle"], 0)]
    written = 0
    for tasks, n, protocols, context, extra, cap in blocks:
        result = run_sweep(SweepConfig(
            out=str(paths.results), models=[cfg.model], scorers=scorers + extra, budgets=list(cfg.budgets),
            tasks=tasks, n_samples=n, protocols=protocols, context_tokens=[context], seed=0, max_new_tokens=cap,
            device=cfg.device, dtype=cfg.dtype))
        written += result.written
    return written


def run_demo(cfg: DemoConfig) -> Path:
    """Run (or resume) every stage; returns the report's HTML path."""
    from kvpolicy.models import load_model
    from kvpolicy.report.render import write_report
    from kvpolicy.report.summary import print_summary

    paths = DemoPaths(Path(cfg.out))
    paths.root.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    handle = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    print(f"kvp demo: {handle.info.name} ({handle.info.n_agents} agents = {handle.info.n_layers} layers x "
          f"{handle.info.n_kv_heads} KV heads) on {handle.model.device} in {handle.dtype_name}, context "
          f"{cfg.context_tokens} tokens, output in {paths.root}")

    start = _stage(1, f"traces: {cfg.train_traces} train + {cfg.test_traces} held-out test RULER-style prompts, "
                      f"futures of up to {cfg.future_tokens} greedy tokens")
    record_demo_traces(handle, cfg, paths)
    _done(start, "traces ready")

    start = _stage(2, f"train the KVP agents ({cfg.train_steps} RL steps)")
    train_demo_policy(cfg, paths)
    _done(start, "policy ready")

    longer = f" and {cfg.long_context_tokens}" if cfg.long_context_tokens else ""
    start = _stage(3, f"evaluate KVP (and the bundled policy, if any) vs {', '.join(cfg.baselines)} at budgets "
                      f"{', '.join(cfg.budgets)} "
                      f"(RULER-style tasks at {cfg.context_tokens}{longer} tokens, dialogue, held-out traces)")
    written = evaluate_demo(cfg, paths)
    _done(start, f"{written} new results in {paths.results}")

    start = _stage(4, "results")
    print_summary(paths.results)
    report = write_report(paths.results, paths.report)
    _done(start, "report written")
    print(f"\nkvp demo finished in {time.perf_counter() - begin:.0f} s.")
    print(f"Report: {report.html.resolve()}  (Markdown: {report.markdown.resolve()})")
    return report.html


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DemoConfig.out, help="output directory (re-running reuses finished stages)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (kvp models)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of the same pipeline at tiny sizes")
    add_placement_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = replace(QUICK if args.quick else DemoConfig(), out=args.out, model=args.model, device=args.device,
                  dtype=args.dtype)
    run_demo(cfg)
    return 0

"""What the presets of `kvp experiment` run: the studies' commands are those their finished stage logs record, each
bundled policy's recipe makes exactly the commands its shipped policy records (and `kvp policies` names the preset),
and the demo's commands build the very configs the demo ran before it became a preset."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvpolicy.cli import main
from kvpolicy.errors import KVPError
from kvpolicy.experiment import PRESETS
from kvpolicy.policy.bundled import BUNDLED_DIR
from kvpolicy.presets import RECIPES
from kvpolicy.presets.demo import QUICK, DemoConfig

DOCS = Path(__file__).parents[1] / "docs" / "results"
BASELINES = ("random", "streaming_llm", "knorm", "keydiff", "lagkv", "tova", "snapkv", "snapkv_w16")


def _stage(preset: str, name: str, out: Path) -> tuple[str, ...]:
    return next(s.argv for s in PRESETS[preset].stages(out) if s.name == name)


def _made_by(argv: tuple[str, ...]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--made-by"]


def test_the_study_commands_are_unchanged():
    out = Path("runs/experiment-smollm2")
    assert _stage("smollm2", "train-kvp-r", out) == (
        "train", "--traces", "runs/experiment-smollm2/traces/ruler-train", "--val",
        "runs/experiment-smollm2/traces/ruler-val", "--steps", "1000", "--out", "runs/experiment-smollm2/kvp-r")
    assert _stage("smollm2", "long-generation-essays", out) == (
        "sweep", "--model", "smollm2-135m", "--out", "runs/experiment-smollm2/results.jsonl", "--task",
        "longgen:essays", "--context", "6144", "--every", "64", "256", "--n", "5", "--budget", "256", "512", "1024",
        "--scorer", "kvp:smollm2-135m", "streaming_llm", "knorm", "keydiff", "tova", "h2o")


def _split_scorers(argv: list[str]) -> tuple[list[str], set[str]]:
    """(the command without its --scorer list, the scorers it lists)."""
    if "--scorer" not in argv:
        return argv, set()
    start = argv.index("--scorer") + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return argv[:start] + argv[end:], set(argv[start:end])


@pytest.mark.parametrize("log", sorted(DOCS.glob("*-study/stages.json")), ids=lambda p: p.parent.name)
def test_the_finished_studies_stages_are_still_its_stages(log):
    """Every stage a finished study recorded is still a stage of its preset with the same command, up to scorers
    added to its line-up since (a re-run resumes that sweep and runs only the added ones)."""
    recorded = json.loads(log.read_text())
    preset = "smollm2" if "smollm2" in log.parent.name else "qwen2.5"
    train = recorded["train-kvp-r"]["argv"]
    plan = {s.name: list(s.argv) for s in PRESETS[preset].stages(Path(train[train.index("--out") + 1]).parent)}
    assert set(recorded) <= set(plan)
    for name, stage in recorded.items():
        (ran, ran_scorers), (planned, planned_scorers) = _split_scorers(stage["argv"]), _split_scorers(plan[name])
        assert ran == planned and ran_scorers <= planned_scorers, name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.preset)
def test_a_recipe_records_the_commands_its_shipped_policy_records(recipe):
    assert PRESETS[recipe.preset] is recipe
    bundle = _stage(recipe.preset, "bundle", Path(recipe.default_out(recipe.preset)))
    shipped = json.loads((BUNDLED_DIR / recipe.model / "config.json").read_text())["bundle"]["commands"]
    assert _made_by(bundle) == shipped and shipped[-1] == f"kvp experiment --preset {recipe.preset}"


def test_the_recipes_sizes_are_those_the_shipped_policies_were_made_with(tmp_path):
    smollm = [s.name for s in PRESETS["bundled-smollm2"].stages(tmp_path)]
    assert smollm == ["traces-train", "traces-val", "traces-test", "train-kvp-mix", "train-curve-prompts-8",
                      "train-curve-prompts-16", "train-curve-prompts-32", "train-curve-steps-150",
                      "train-curve-steps-300", "costs-test", "policy", "bundle", "ruler", "ruler-multivalue",
                      "dialogue", "report"]
    assert _made_by(_stage("bundled-smollm2", "bundle", tmp_path)) == [
        "kvp traces --model smollm2-135m --source mix --split train --n 64 --context 2048 --future-tokens 128",
        "kvp traces --model smollm2-135m --source mix --split val --n 16 --context 2048 --future-tokens 128",
        "kvp train --traces traces/train --val traces/val --steps 600", "kvp experiment --preset bundled-smollm2"]
    assert _stage("bundled-smollm2", "costs-test", tmp_path) == (
        "sweep", "--model", "smollm2-135m", "--out", f"{tmp_path}/results.jsonl", "--task",
        f"traces:{tmp_path}/traces/test", "--n", "20", "--budget", "64", "128", "256", "512", "--scorer",
        *(f"kvp:{tmp_path}/{p}" for p in ("kvp-mix", "curve/prompts-8", "curve/prompts-16", "curve/prompts-32",
                                          "curve/steps-150", "curve/steps-300")), *BASELINES, "oracle")
    assert _stage("bundled-smollm2", "dialogue", tmp_path) == (
        "sweep", "--model", "smollm2-135m", "--out", f"{tmp_path}/results.jsonl", "--context", "2048", "--n", "10",
        "--budget", "64", "128", "256", "512", "--scorer", "kvp:smollm2-135m", *BASELINES, "--task", "dialogue",
        "--protocol", "prompt-once", "multi-turn")
    qwen = PRESETS["bundled-qwen2.5"].stages(tmp_path)
    assert [s.name for s in qwen] == [
        "traces-train", "traces-val", "traces-test", "traces-niah-code-train", "traces-niah-code-val",
        "traces-code-train", "traces-code-val", "traces-code-test", "train-kvp-mix", "costs-test", "costs-code-test",
        "policy", "bundle", "ruler", "ruler-multivalue", "dialogue", "report"]
    argv = {s.name: s.argv for s in qwen}
    assert argv["traces-test"][argv["traces-test"].index("--n") + 1] == "12"
    assert argv["traces-code-test"][argv["traces-code-test"].index("--n") + 1] == "4"
    assert argv["dialogue"][-2:] == ("--protocol", "prompt-once")


def test_kvp_policies_names_the_preset_that_made_each_policy(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    for recipe in RECIPES:
        assert f"$ kvp experiment --preset {recipe.preset}\n" in out


def test_a_recipe_lists_its_stages(tmp_path, capsys):
    assert main(["experiment", "--preset", "bundled-qwen2.5", "--out", str(tmp_path), "--list"]) == 0
    listed = capsys.readouterr().out
    assert ("traces-niah-code-train (to run): kvp traces --model qwen2.5-0.5b --source ruler --split train --n 24"
            in listed)
    assert "bundle (to run): kvp policies --bundle" in listed
    assert "--made-by kvp experiment --preset bundled-qwen2.5" in listed


def test_the_demo_commands(tmp_path):
    out = Path("kvp-demo")
    lineup = ("--scorer", "kvp:kvp-demo/kvp-policy", "kvp:smollm2-135m", *BASELINES[:4], "tova", "snapkv_w16")
    sweep = ("sweep", "--model", "smollm2-135m", "--out", "kvp-demo/results.jsonl", "--budget", "64", "128", "256")
    ruler = ("--protocol", "query-aware")
    assert [(s.name, s.argv) for s in DemoConfig().stages(out)] == [
        ("traces-train", ("traces", "--model", "smollm2-135m", "--source", "ruler", "--split", "train", "--n", "24",
                          "--context", "1024", "--future-tokens", "48", "--out", "kvp-demo/traces/train")),
        ("traces-test", ("traces", "--model", "smollm2-135m", "--source", "ruler", "--split", "test", "--n", "4",
                         "--context", "1024", "--future-tokens", "48", "--out", "kvp-demo/traces/test")),
        ("train", ("train", "--traces", "kvp-demo/traces/train", "--out", "kvp-demo/kvp-policy", "--steps", "200",
                   "--warmup", "40", "--val-every", "50", "--val-samples", "4", "--checkpoint-every", "50")),
        ("ruler-1024-answer16", (*sweep, "--task", "ruler:niah_single_1", "ruler:niah_single_2", *ruler, "--context",
                                 "1024", "--n", "3", "--max-new-tokens", "16", *lineup)),
        ("ruler-1024-answer48", (*sweep, "--task", "ruler:niah_multivalue", *ruler, "--context", "1024", "--n", "3",
                                 "--max-new-tokens", "48", *lineup)),
        ("ruler-2048-answer16", (*sweep, "--task", "ruler:niah_single_1", "ruler:niah_single_2", *ruler, "--context",
                                 "2048", "--n", "2", "--max-new-tokens", "16", *lineup)),
        ("dialogue", (*sweep, "--task", "dialogue", "--protocol", "prompt-once", "multi-turn", "--context", "1024",
                      "--n", "2", *lineup)),
        ("costs", (*sweep, "--task", "traces:kvp-demo/traces/test", "--context", "1024", "--n", "4", *lineup,
                   "oracle")),
        ("report", ("report", "kvp-demo/results.jsonl", "--out", "kvp-demo/report")),
    ]


@pytest.mark.parametrize("cfg", [DemoConfig(), QUICK], ids=["demo", "quick"])
def test_the_demo_commands_build_the_configs_the_demo_ran_before(cfg, tmp_path, monkeypatch, capsys):
    """Before it was a preset, kvpolicy/demo.py called the library itself; these are the configs it built (traces:
    ruler prompts with greedy futures; training validating and checkpointing 4 times on 4 held-out prompts, warm-up a
    fifth of the steps, the trainer's default policy; one sweep per (context, answer cap), dialogue and the held-out
    traces), so the demo's results are the same."""
    from kvpolicy.evaluation import sweep as sweep_module
    from kvpolicy.evaluation.bench import ranking_quality
    from kvpolicy.evaluation.sweep import SweepConfig
    from kvpolicy.experiment import run_stage
    from kvpolicy.policy.config import PolicyConfig
    from kvpolicy.report import render
    from kvpolicy.traces import pipeline, union
    from kvpolicy.traces.future import FutureConfig
    from kvpolicy.traces.pipeline import TraceRunConfig
    from kvpolicy.training import trainer
    from kvpolicy.training.config import TrainConfig

    ran = []
    model = SimpleNamespace(n_layers=30, n_kv_heads=3, head_dim=64, n_agents=90, name="smollm2-135m")

    class Trainer:
        def __init__(self, train, out, val=None, policy=None, config=None, ctx=None, resume=True):
            ran.append(("train", train, str(out), val, policy, config))
            self.step, self.val_source, self.val_ids = 0, val, []

        def run(self):
            return SimpleNamespace(steps=0, seconds=0, steps_per_s=0, tokens_per_s=0, best_val_reward=0, best_step=0,
                                   skipped_batches=0, n_parameters=0)

    monkeypatch.setattr(pipeline, "record_on_every_rank", lambda name, run, out, device, dtype: ran.append(
        ("traces", name, run, str(out), dtype)) or SimpleNamespace(manifest=None))
    monkeypatch.setattr(union, "open_traces", lambda dirs: SimpleNamespace(model=model, lengths=[100], dirs=dirs))
    monkeypatch.setattr(trainer, "Trainer", Trainer)
    monkeypatch.setattr(ranking_quality, "best_attention_free", lambda reader, samples, sinks, recent: ("KNorm", 2.0))
    monkeypatch.setattr(sweep_module, "run_sweep", lambda config: ran.append(("sweep", config)) or SimpleNamespace(
        rank=1))
    monkeypatch.setattr(render, "write_report", lambda results, out: ran.append(("report", str(results), str(out)))
                        or SimpleNamespace(note=None, html="", markdown=Path(out), figures=[]))
    for stage in cfg.stages(tmp_path):
        assert run_stage(list(stage.argv)) == 0, capsys.readouterr().err

    every = max(1, cfg.train_steps // 4)
    scorers = [f"kvp:{tmp_path}/kvp-policy", "kvp:smollm2-135m", *cfg.baselines]
    runs = [(cfg.eval_samples, cfg.context_tokens, [t for t, _ in cfg.eval_tasks]),
            (cfg.long_samples, cfg.long_context_tokens, cfg.long_tasks)]

    def sweep(tasks, n, protocols, context, extra=(), cap=0):
        return ("sweep", SweepConfig(out=f"{tmp_path}/results.jsonl", models=["smollm2-135m"], scorers=scorers + [
            *extra], budgets=list(cfg.budgets), tasks=tasks, n_samples=n, protocols=protocols, context_tokens=[context],
            seed=0, max_new_tokens=cap))

    assert ran == [
        *(("traces", "smollm2-135m", TraceRunConfig(source="ruler", split=split, n=n, context_tokens=cfg.context_tokens,
                                                    future=FutureConfig("greedy", cfg.future_tokens)),
           f"{tmp_path}/traces/{split}", None)
          for split, n in (("train", cfg.train_traces), ("test", cfg.test_traces))),
        ("train", ran[2][1], f"{tmp_path}/kvp-policy", None, PolicyConfig(30, 3, 64, max_position=100), TrainConfig(
            steps=cfg.train_steps, val_every=every, checkpoint_every=every, val_samples=4,
            warmup=min(100, cfg.train_steps // 5), compile=cfg.train_compile)),
        *(sweep(tasks, n, ["query-aware"], context, cap=cap) for n, context, names in runs
          for cap, tasks in {cap: [t for t, c in cfg.eval_tasks if c == cap and t in names]
                             for t, cap in cfg.eval_tasks if t in names}.items()),
        sweep(["dialogue"], cfg.dialogue_samples, ["prompt-once", "multi-turn"], cfg.context_tokens),
        sweep([f"traces:{tmp_path}/traces/test"], cfg.test_traces, [], cfg.context_tokens, ["oracle"]),
        ("report", f"{tmp_path}/results.jsonl", f"{tmp_path}/report"),
    ]
    assert ran[2][1].dirs == [f"{tmp_path}/traces/train"]


@pytest.mark.parametrize("change, message", [
    ({"train_traces": 3}, "at least 4 training traces"),
    ({"long_context_tokens": 512}, "long_context_tokens must exceed"),
    ({"eval_tasks": ()}, "at least one (task"),
    ({"long_tasks": ("ruler:vt",)}, "long_tasks must be some of eval_tasks"),
    ({"long_tasks": ()}, "long_tasks must be some of eval_tasks"),
])
def test_a_demo_config_that_cannot_run_is_refused(change, message):
    with pytest.raises(KVPError, match=re.escape(message)):
        DemoConfig(**change)
    DemoConfig(long_context_tokens=0, long_tasks=())  # no long-context check: no tasks needed


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.preset)
def test_the_comparison_shares_the_recipes_traces_and_compares_every_strong_method(recipe, tmp_path):
    compare = PRESETS[f"compare-{recipe.preset.removeprefix('bundled-')}"]
    stages = compare.stages(tmp_path)
    plan = {s.name: s.argv for s in stages}
    recipe_plan = {s.name: s.argv for s in recipe.stages(tmp_path)}
    assert compare.default_out("x") == recipe.default_out(recipe.preset)
    shared = [name for name in plan if name.startswith("traces-")]
    assert shared and all(plan[name] == recipe_plan[name] for name in shared)  # a recipe's run serves both
    assert "traces-test" not in plan  # the comparison evaluates on the eval split only
    # seed 0 is what ships (the bundled KVP-mix, the shipped KVzap): nothing to train, and its sweeps come first
    assert list(plan)[:2] == ["compare-2048", "compare-4096"]
    assert [n for n in plan if n.startswith("train-")] == [
        "train-kvp-mix-s1", "train-kvp-mix-s2", "train-kvzap-s1", "train-kvzap-s2"]
    mix = recipe_plan["train-kvp-mix"]
    assert plan["train-kvp-mix-s2"] == (*mix[:mix.index("--out")], *mix[mix.index("--out") + 2:], "--out",
                                        f"{tmp_path}/kvp-mix-s2", "--seed", "2")  # the recipe, another seed
    sweep = plan["compare-4096"]
    scorers = sweep[sweep.index("--scorer") + 1:]
    assert {"kvzip", "kvzip_plus", "snapkv", "snapkv_w16", "tova", "knorm", "keydiff", "streaming_llm", "random",
            "lagkv", "adakv_expected_attention", "adakv_snapkv", "adakv_snapkv_w16", "pyramidkv",
            "pyramidkv_w16"} <= set(scorers)
    assert scorers[:3] == (f"kvp:{recipe.model}", "kvzap_linear", "kvzap_mlp")
    assert plan["compare-2048"][plan["compare-2048"].index("--scorer") + 1:] == scorers  # both lengths, same scorers
    seeds = plan["seeds-2048"]
    assert seeds[seeds.index("--scorer") + 1:] == (f"kvp:{tmp_path}/kvp-mix-s1", f"kvp:{tmp_path}/kvp-mix-s2",
                                                   f"kvzap_mlp:{tmp_path}/kvzap-s1", f"kvzap_mlp:{tmp_path}/kvzap-s2")
    assert seeds[:seeds.index("--scorer")] == plan["compare-2048"][:plan["compare-2048"].index("--scorer")]
    threshold = plan["compare-threshold-2048"]
    assert threshold[threshold.index("--budget") + 1: threshold.index("--scorer")] == ("r0.25", "r0.5", "r0.75",
                                                                                      "r0.875")
    assert threshold[threshold.index("--scorer") + 1:] == ("kvzap_linear_threshold", "kvzap_mlp_threshold", *(
        f"kvzap_mlp_threshold:{tmp_path}/kvzap-s{seed}" for seed in (1, 2)))
    # KVzap's seeds share one data directory (collected with seed 0, as the shipped weights' was) and differ in the
    # MLP's fit alone; the ridge fit is deterministic given the data, so the linear model has seed 0 only
    for seed in (1, 2):
        argv = plan[f"train-kvzap-s{seed}"]
        assert argv[argv.index("--seed") + 1] == "0" and argv[argv.index("--fit-seed") + 1] == str(seed)
        assert argv[argv.index("--data") + 1] == str(tmp_path / "kvzap-data")
        assert argv[argv.index("--kind") + 1:argv.index("--seed")] == ("mlp",)
        assert next(s for s in stages if s.name == f"train-kvzap-s{seed}").output == \
            tmp_path / f"kvzap-s{seed}"  # what `kvp experiment` checks to skip a finished stage
    budgets = sweep[sweep.index("--budget") + 1:sweep.index("--scorer")]
    assert budgets == ("r0.25", "r0.5", "r0.75", "r0.875")  # kvpress's leaderboard ratios
    assert plan["compare-2048"][plan["compare-2048"].index("--budget") + 5:][:3] == ("64", "128", "256")
    assert sweep[sweep.index("--task") + 1:sweep.index("--protocol")] == ("ruler", "needles")
    with pytest.raises(KVPError, match="at least 3 distinct seeds"):
        type(compare)(recipe, seeds=(0, 1))

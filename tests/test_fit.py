"""`kvp fit`: the bundled recipe's stages for any model (one definition for both), its plan and estimate printed
before any work (--dry-run: nothing else), bad input refused in one line before any work, and a tiny fit end to end
that leaves a loadable policy folder whose card holds the held-out costs, then resumes by skipping every stage."""

from __future__ import annotations

import json

import pytest

from kvpolicy.cli import main
from kvpolicy.evaluation.bench.estimate import Rates
from kvpolicy.experiment import PRESETS
from kvpolicy.policy.bundled import BUNDLED_DIR
from kvpolicy.presets.fit import budgets, check_budgets, fit_recipe
from kvpolicy.presets.recipe import CHECK_BASELINES, CHECK_TASK

TINY = ["--context", "160", "--future-tokens", "4", "--train-prompts", "3", "--val-prompts", "2", "--test-prompts",
        "2", "--steps", "4", "--check-samples", "1", "--no-compile"]
RATES = Rates(device="cpu", prefill_tokens_per_s=500.0, decode_step_s=0.05, train_steps_per_s=5.0,
              policy_parameters=737_370)


def test_a_fit_is_the_bundled_recipe_without_bundling_or_learning_curve(tmp_path):
    bundled = PRESETS["bundled-smollm2"]
    fit = fit_recipe("smollm2-135m").stages(tmp_path)
    names = [s.name for s in fit]
    assert names == ["traces-train", "traces-val", "traces-test", "train-kvp-mix", "costs-test", "accuracy-check",
                     "policy"]
    recipe = {s.name: s.argv for s in bundled.stages(tmp_path)}
    for stage in fit[:4]:  # at the default sizes, the shipped SmolLM2 policy's traces and training
        assert stage.argv == recipe[stage.name]
    # the bundled preset is its own fit stages, then bundling, the sweeps and the report
    assert bundled.stages(tmp_path)[:len(bundled.fit_stages(tmp_path))] == bundled.fit_stages(tmp_path)
    assert [s.name for s in bundled.stages(tmp_path)][len(bundled.fit_stages(tmp_path)):] == [
        "bundle", "ruler", "ruler-multivalue", "dialogue", "report"]
    check = dict(zip(names, (s.argv for s in fit)))["accuracy-check"]
    assert check[check.index("--task") + 1] == CHECK_TASK and check[check.index("--n") + 1] == "4"
    assert check[check.index("--scorer") + 1:] == (f"kvp:{tmp_path}/kvp-mix", *CHECK_BASELINES)
    policy = fit[-1].argv
    assert policy[:2] == ("export", "--policy") and fit[-1].output == tmp_path / "policy"
    made_by = [policy[i + 1] for i, arg in enumerate(policy) if arg == "--made-by"]
    assert made_by[-1] == ("kvp fit --model smollm2-135m --context 2048 --future-tokens 128 --train-prompts 64 "
                           "--val-prompts 16 --test-prompts 20 --steps 600 --check-samples 4")
    shipped = json.loads((BUNDLED_DIR / "smollm2-135m" / "config.json").read_text())["bundle"]["commands"]
    assert made_by[:-1] == shipped[:-1]  # the shipped policy's traces and training; then `kvp fit`, not its preset
    coded = {s.name: s.argv for s in fit_recipe("qwen2.5-0.5b", code=True, device="cuda", dtype="bfloat16").stages(
        tmp_path)}
    assert "traces-code-train" in coded and "costs-code-test" in coded
    assert coded["train-kvp-mix"][-2:] == ("--device", "cuda") and coded["traces-train"][-2:] == ("--dtype",
                                                                                                  "bfloat16")
    assert "--device" not in " ".join(coded["policy"])  # the recorded commands leave the placement out


def test_budgets_follow_the_context():
    assert budgets(2048) == ("64", "128", "256", "512") and check_budgets(2048) == ("128", "256")
    assert budgets(160) == ("32", "40") and check_budgets(160) == ("32", "64")  # never below sinks + recent


@pytest.mark.model
def test_a_dry_run_prints_the_plan_and_the_estimate_and_writes_nothing(smollm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kvpolicy.evaluation.bench.estimate.measure_rates", lambda handle, device: RATES)
    out = tmp_path / "fit"
    assert main(["fit", "--model", "smollm2-135m", "--out", str(out), "--dry-run", *TINY]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert RATES.describe() in printed and "total of the stages to run" in printed
    for name in ("traces-train", "traces-val", "traces-test", "train-kvp-mix", "costs-test", "accuracy-check",
                 "policy"):
        assert f"  {name} " in printed
    assert f"kvp traces --model smollm2-135m --source mix --split train --n 3 --context 160 --future-tokens 4 " \
           f"--out {out}/traces/train" in printed
    assert f"kvp export --policy {out}/kvp-mix" in printed
    # prompts (the mix's at twice the context) and futures past the model's positions: one line, before any work
    assert main(["fit", "--model", "smollm2-135m", "--out", str(out), "--context", "4096", "--dry-run"]) == 1
    assert "past smollm2-135m's 8192 positions; use a shorter --context" in capsys.readouterr().err
    assert not out.exists()


def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kvpolicy.models.loader.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["fit", "--model", "no-such-model", "--out", str(tmp_path / "a")]) == 1
    assert "kvp fit: error: unknown model 'no-such-model'" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    stage = fit_recipe("qwen2.5-0.5b").stages(other)[0]
    (other / "stages.json").write_text(json.dumps({stage.name: {"argv": list(stage.argv), "seconds": 1.0}}))
    assert main(["fit", "--model", "smollm2-135m", "--out", str(other)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"kvp fit: error: {other} holds a fit of qwen2.5-0.5b, not smollm2-135m: give another --out (or "
                   f"delete {other} to start over)")
    (tmp_path / "file").write_text("")
    assert main(["fit", "--model", "smollm2-135m", "--out", str(tmp_path / "file")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["fit", "--model", "smollm2-135m", "--out", str(tmp_path / "b"), "--steps", "0"]) == 1
    assert "steps must be at least 1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "other"]


def test_a_model_sliding_in_every_layer_is_refused_before_any_work(tmp_path, capsys):
    from transformers import Qwen2Config

    model = tmp_path / "windowed"
    Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, use_sliding_window=True, sliding_window=8,
                max_window_layers=0).save_pretrained(model)
    assert main(["fit", "--model", str(model), "--out", str(tmp_path / "fit")]) == 1
    err = capsys.readouterr().err.strip()
    assert "sliding-window attention in every layer" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "fit").exists()


@pytest.mark.model
def test_a_tiny_fit_end_to_end_then_resumed(smollm, tmp_path, monkeypatch, capsys, one_thread):
    import kvpolicy as kvp

    out = tmp_path / "fit"
    assert main(["fit", "--model", "smollm2-135m", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "estimate, measured now on cpu" in printed and "kvp fit finished" in printed
    assert "held-out ranking cost of the policy" in printed and "accuracy check" in printed
    assert kvp.load_policy(str(out / "policy"), model=smollm) is not None
    config = json.loads((out / "policy" / "config.json").read_text())
    assert sorted(p.name for p in (out / "policy").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    commands = config["recipe"]["commands"]
    assert commands[-1].startswith("kvp fit --model smollm2-135m --context 160") and commands[0].startswith(
        "kvp traces --model smollm2-135m --source mix --split train --n 3")
    rows = config["held_out"]["corpora"]
    assert [row["corpus"] for row in rows] == ["RULER-style", "dialogue"]  # the mix's first two test prompts
    assert config["held_out"]["command"] == commands[-1]
    card = (out / "policy" / "README.md").read_text()
    assert "## Held-out ranking cost" in card and f"| RULER-style | 1 | {rows[0]['kvp']:.3f}" in card
    assert commands[-1] in card
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    checked = {r["scorer_label"] for r in results if r["task"] == CHECK_TASK}
    assert checked == {"KVP", "KNorm", "KeyDiff", "StreamingLLM", "full cache"}
    # a re-run skips every finished stage, and measures nothing as nothing is left to run
    monkeypatch.setattr("kvpolicy.experiment.run_stage", lambda argv: pytest.fail(f"ran {argv}"))
    monkeypatch.setattr("kvpolicy.evaluation.bench.estimate.measure_rates", lambda *a: pytest.fail("measured"))
    assert main(["fit", "--model", "smollm2-135m", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 7 and "estimate" not in printed

"""The estimate of a plan's time and disk (evaluation/bench/estimate.py): its arithmetic on given rates, and the
measurement of the rates at a tiny size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvpolicy.evaluation.bench.estimate import (
    COMPILE_SECONDS,
    COST_SECONDS,
    Rates,
    checkpoint_bytes,
    estimate_plan,
    measure_rates,
    trace_bytes,
    trace_seconds,
)
from kvpolicy.models.handle import ModelIdentity
from kvpolicy.presets.fit import fit_recipe
from kvpolicy.presets.recipe import CHECK_BASELINES, COST_BASELINES
from kvpolicy.traces.config import BASELINES
from kvpolicy.traces.sources import mix_plan

RATES = Rates(device="cpu", prefill_tokens_per_s=1000.0, decode_step_s=0.1, train_steps_per_s=4.0,
              policy_parameters=1000)
SMOLLM = ModelIdentity("smollm2-135m", "abc", n_layers=30, n_kv_heads=3, head_dim=64)


def test_one_trace():
    assert trace_seconds(RATES, 2048, 128) == pytest.approx((2048 + 128) / 1000 + 128 * 0.1)
    # 90 heads x 2,048 tokens x (64 x 2 x 2 bytes of fp16 keys and values + 4 of fp32 utility): 47.9 MB
    assert trace_bytes(SMOLLM, 2048, 0) == 47_923_200
    assert trace_bytes(SMOLLM, 2048, 3) - trace_bytes(SMOLLM, 2048, 0) == 90 * 2048 * 12
    assert checkpoint_bytes(1000) == 24_000  # weights + raw, EMA, best EMA and two moments in the resume state


def test_the_plan_of_a_fit(tmp_path):
    recipe = fit_recipe("smollm2-135m", context=1024, future_tokens=64, train_prompts=12, val_prompts=3,
                        test_prompts=5, steps=100, check_samples=2)
    estimate = estimate_plan(recipe.stages(tmp_path), RATES, SMOLLM)
    by_name = {s.name: s for s in estimate.stages}
    assert list(by_name) == ["traces-train", "traces-val", "traces-test", "train-kvp-mix", "costs-test",
                             "accuracy-check", "policy"]
    train_lengths = [length for _, _, length in mix_plan(12, 1024)]  # 0.5x, 1x and 2x the context
    assert sorted(set(train_lengths)) == [512, 1024, 2048]
    assert by_name["traces-train"].seconds == pytest.approx(sum(trace_seconds(RATES, t, 64) for t in train_lengths))
    assert by_name["traces-train"].bytes == sum(trace_bytes(SMOLLM, t, 0) for t in train_lengths)
    test_lengths = [length for _, _, length in mix_plan(5, 1024)]
    assert by_name["traces-test"].bytes == sum(trace_bytes(SMOLLM, t, len(BASELINES)) for t in test_lengths)
    assert by_name["train-kvp-mix"].seconds == pytest.approx(100 / 4.0 + COMPILE_SECONDS)
    assert by_name["train-kvp-mix"].bytes == checkpoint_bytes(1000)
    scorers = 1 + len(COST_BASELINES)  # the policy, every baseline and the oracle
    assert by_name["costs-test"].seconds == pytest.approx(sum(test_lengths) * 90 * scorers * COST_SECONDS)
    # per sample: a prefill of the context, then the full cache's answer and one per budget, 16 tokens each
    assert by_name["accuracy-check"].seconds == pytest.approx(2 * (1024 / 1000 + 3 * 16 * 0.1))
    assert by_name["accuracy-check"].work == f"2 samples x 2 budgets x {1 + len(CHECK_BASELINES)} scorers"
    assert by_name["policy"].bytes == 4000 and by_name["policy"].seconds == 0
    assert estimate.seconds == pytest.approx(sum(s.seconds for s in estimate.stages))
    assert estimate.bytes == sum(s.bytes for s in estimate.stages)
    uncompiled = fit_recipe("smollm2-135m", compile=False).stages(Path("x"))
    assert estimate_plan(uncompiled, RATES, SMOLLM).stages[3].seconds == pytest.approx(600 / 4.0)


@pytest.mark.model
def test_the_rates_are_measured_on_the_model(smollm, one_thread):
    rates = measure_rates(smollm, "cpu", context=24, decode=2, train_steps=1)
    assert rates.device == "cpu" and rates.policy_parameters == 737_370  # SmolLM2's 90 agents, default width
    for value in (rates.prefill_tokens_per_s, rates.decode_step_s, rates.train_steps_per_s):
        assert math.isfinite(value) and value > 0
    assert "prefill" in rates.describe()

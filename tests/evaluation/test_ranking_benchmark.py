"""The ranking benchmark's evaluation, and one cost for one policy: training's validation, the benchmark and the
evaluation's trace costs agree."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.evaluation import costs
from kvpolicy.evaluation.lineup import make_contenders
from kvpolicy.evaluation.ranking_benchmark import evaluate, scorer_method
from kvpolicy.evaluation.result import WHOLE_RANKING
from kvpolicy.compression.budget import Budget
from kvpolicy.policy.network import PolicyConfig
from kvpolicy.traces.store import TraceReader
from kvpolicy.training.synthetic import SyntheticTraces, write_synthetic_traces
from kvpolicy.training.trainer import TrainConfig, Trainer

SHAPE = dict(n_layers=2, n_kv_heads=2, head_dim=16)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_benchmark_evaluation_ranks_methods_consistently():
    """The benchmark's evaluation: the oracle scores exactly 1, per-budget shares fall with the budget, and a
    method that sees the true utility through noise sits between the oracle and random."""
    source = SyntheticTraces(3, length=96, **SHAPE)
    noisy = lambda trace, sample: trace.utility.float() + 0.02 * torch.randn(trace.utility.shape)  # noqa: E731
    (random,) = make_contenders(["random"])
    results = evaluate(source, {"Noisy": noisy, "Random": scorer_method(source, random)}, budgets=[24, 48, 200])
    assert results["Oracle"]["normalized_cost"] == pytest.approx(1.0)
    assert 1.0 < results["Noisy"]["normalized_cost"] < results["Random"]["normalized_cost"]
    for r in results.values():
        shares = list(r["evicted_share"].values())
        assert shares[0] >= shares[1] >= shares[2] == 0.0  # 200 >= length: nothing evicted
        assert len(r["per_layer"]) == SHAPE["n_layers"]


def test_one_policy_has_one_cost_in_validation_benchmark_and_trace_costs(tmp_path):
    """The deployed policy's validation cost (trainer), its cost in the ranking benchmark and in the evaluation's
    trace costs are one number, and so are the benchmark's and the trace costs' per-budget shares."""
    train = TraceReader(write_synthetic_traces(tmp_path / "train", SyntheticTraces(8, length=64, **SHAPE, seed=0)))
    val = TraceReader(write_synthetic_traces(tmp_path / "val", SyntheticTraces(3, length=64, **SHAPE, seed=1)))
    config = TrainConfig(steps=6, batch=4, tokens=16, samples=2, warmup=2, ema_start=2, val_every=6,
                         checkpoint_every=6, val_samples=3, compile=False, bf16=False)
    result = Trainer(train, tmp_path / "ckpt", val=val, policy=PolicyConfig(**SHAPE, hidden=8, max_position=64),
                     config=config, progress=False).run()
    validation = -result.best_val_reward

    (kvp,) = make_contenders([f"kvp:{tmp_path / 'ckpt'}"])
    benchmark = evaluate(val, {"KVP": scorer_method(val, kvp)}, budgets=[24, 40])["KVP"]
    outcomes = [o for i in range(len(val))
                for o in costs.trace_costs(val, i, [kvp], [Budget(tokens=24), Budget(tokens=40)], lambda *_: True)]
    by_budget = {label: [o.fields for o in outcomes if o.budget == label] for label in ("b24", "b40", WHOLE_RANKING)}
    trace_cost = sum(f["value"] for f in by_budget[WHOLE_RANKING]) / len(val)

    assert 1.0 < validation < 10.0
    assert benchmark["normalized_cost"] == pytest.approx(validation, rel=1e-4)
    assert trace_cost == pytest.approx(validation, rel=1e-4)
    for budget in (24, 40):
        lost = sum(f["lost"] for f in by_budget[f"b{budget}"]) / len(val)
        assert benchmark["evicted_share"][budget] == pytest.approx(lost, rel=1e-4)

"""Each policy bundled with kvpolicy, on its own model: fresh held-out traces of every corpus of the mix (test split,
prompts no training trace used), where it must rank the cache better than every attention-free heuristic."""

from __future__ import annotations

from collections import defaultdict

import pytest

from kvpolicy.cli import main
from kvpolicy.evaluation.result import WHOLE_RANKING
from kvpolicy.evaluation.store import read_results
from kvpolicy.evaluation.sweep import SweepConfig, run_sweep
from kvpolicy.policy.bundled import bundled_policies

ATTENTION_FREE = ["streaming_llm", "knorm", "keydiff", "lagkv", "random"]

pytestmark = pytest.mark.model


@pytest.mark.parametrize("model", sorted(bundled_policies()) or [pytest.param("none", marks=pytest.mark.skip(
    reason="this install bundles no policy"))])
def test_the_bundled_policy_beats_every_attention_free_heuristic(model, tmp_path):
    traces = tmp_path / "test"
    assert main(["traces", "--model", model, "--source", "mix", "--split", "test", "--n", "3", "--context", "384",
                 "--future-tokens", "32", "--baselines", "none", "--out", str(traces)]) == 0
    out = tmp_path / "costs.jsonl"
    run_sweep(SweepConfig(out=str(out), models=[model], scorers=[f"kvp:{model}", *ATTENTION_FREE], budgets=["64"],
                          tasks=[f"traces:{traces}"], full_cache=False))
    cost: dict[str, list[float]] = defaultdict(list)
    for r in read_results(out).records:
        if r.budget == WHOLE_RANKING:
            cost[r.scorer].append(r.value)
    mean = {scorer: sum(v) / len(v) for scorer, v in cost.items()}
    best = min(ATTENTION_FREE, key=mean.__getitem__)
    assert mean[f"kvp:{model}"] < mean[best], mean

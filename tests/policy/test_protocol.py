"""The inference protocol's ranking costs: a hand-computed example, and the fast functions against their slow
references (sinks and recent tokens never ranked, budgets counting them)."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.policy import protocol as P
from kvpolicy.policy import ranking as R


def test_a_hand_computed_example():
    """Six tokens, one sink, one recent: positions 1..4 are ranked. The scores rank them 1, 2, 3, 4 (utilities
    0.1, 0.4, 0.2, 0.3): cost 1·0.1 + 2·0.4 + 3·0.2 + 4·0.3 = 2.7; the oracle's order 0.4, 0.3, 0.2, 0.1 costs
    2.0. The sink's and the recent token's large utilities count for neither."""
    utility = torch.tensor([9.0, 0.1, 0.4, 0.2, 0.3, 5.0])
    scores = torch.tensor([0.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert P.evictable_range(6, 1, 1) == (1, 5)
    assert P.evictable_cost(scores, utility, sinks=1, recent=1).item() == pytest.approx(1.35)
    # budgets keep the 2 protected tokens first: rooms 0, 1, 2, 4 for the evictable ones (total utility 1.0)
    lost, oracle = P.evicted_shares(scores, utility, [2, 3, 4, 6], sinks=1, recent=1)
    torch.testing.assert_close(lost, torch.tensor([1.0, 0.9, 0.5, 0.0]))
    torch.testing.assert_close(oracle, torch.tensor([1.0, 0.6, 0.3, 0.0]))
    # ranking every token instead would reward keeping the sink: a different number
    assert R.normalized_cost(utility, R.argsort_desc(scores)).item() != pytest.approx(1.35)


@pytest.mark.parametrize("length, sinks, recent", [(40, 4, 16), (25, 0, 0), (12, 3, 5), (15, 4, 16), (30, 40, 0)])
def test_fast_functions_match_their_references(length, sinks, recent):
    g = torch.Generator().manual_seed(length + sinks + recent)
    utility = torch.rand(2, 3, length, generator=g) ** 3
    scores = torch.randn(2, 3, length, generator=g)
    scores[0, 0, :5] = 0.5  # ties break by position, as argsort_desc does
    torch.testing.assert_close(P.evictable_cost(scores, utility, sinks, recent),
                               P.evictable_cost_reference(scores, utility, sinks, recent))
    budgets = [0, 1, sinks + recent, sinks + recent + 3, length - 1, length, length + 10]
    fast = P.evicted_shares(scores, utility, budgets, sinks, recent)
    slow = P.evicted_shares_reference(scores, utility, budgets, sinks, recent)
    for f, s in zip(fast, slow):
        assert f.shape == (2, 3, len(budgets))
        torch.testing.assert_close(f, s)


def test_the_oracle_costs_one_and_keeping_everything_loses_nothing():
    g = torch.Generator().manual_seed(3)
    utility = torch.rand(4, 50, generator=g)
    torch.testing.assert_close(P.evictable_cost(utility, utility), torch.ones(4))
    lost, oracle = P.evicted_shares(torch.randn(4, 50, generator=g), utility, [P.SINKS + P.RECENT, 50])
    assert torch.allclose(lost[:, 0], torch.ones(4)) and (lost[:, 1] == 0).all() and (oracle <= lost + 1e-6).all()

"""The ranking maths against slow references: values, gradients, and the properties the method relies on."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kvpolicy.policy import ranking as R


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gumbel_sort_is_a_permutation_and_follows_scores():
    s = torch.randn(3, 4, 50, generator=_gen())
    perm = R.gumbel_sort(s, generator=_gen(1))
    assert perm.shape == s.shape and perm.dtype == torch.int64
    assert torch.equal(perm.sort(-1).values, torch.arange(50).expand_as(perm))
    many = R.gumbel_sort(s, n_samples=7, generator=_gen(2))
    assert many.shape == (3, 4, 7, 50)
    assert not torch.equal(many[..., 0, :], many[..., 1, :])  # samples differ
    # huge score gaps: the noise cannot reorder them
    sharp = torch.arange(20, dtype=torch.float32).flip(0) * 100
    assert torch.equal(R.gumbel_sort(sharp, n_samples=5, generator=_gen(3)), torch.arange(20).expand(5, 20))


def test_gumbel_sort_matches_plackett_luce_probabilities():
    """Gumbel-max sampling draws each of the 3! rankings with its Plackett–Luce probability."""
    s = torch.tensor([1.0, 0.0, -0.5])
    n = 60000
    perms = R.gumbel_sort(s, n_samples=n, generator=_gen(4))
    for p in itertools.permutations(range(3)):
        freq = (perms == torch.tensor(p)).all(-1).float().mean().item()
        prob = R.plackett_luce_logprob(s, torch.tensor(p)).exp().item()
        assert abs(freq - prob) < 0.01, (p, freq, prob)


def test_plackett_luce_probabilities_sum_to_one():
    s = torch.randn(5, generator=_gen(5))
    perms = torch.tensor(list(itertools.permutations(range(5))))
    assert math.isclose(R.plackett_luce_logprob(s, perms).exp().sum().item(), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 17, 200])
def test_plackett_luce_logprob_matches_reference_values_and_gradients(n):
    g = _gen(n)
    scores = (torch.randn(2, 3, 1, n, generator=g) * 3).requires_grad_(True)
    perm = R.gumbel_sort(scores.squeeze(2), n_samples=4, generator=g)  # (2, 3, 4, n)
    fast = R.plackett_luce_logprob(scores, perm)
    slow = R.plackett_luce_logprob_reference(scores, perm)
    assert fast.shape == (2, 3, 4)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-4)
    weights = torch.randn(2, 3, 4, generator=g)
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), scores)
    (g_slow,) = torch.autograd.grad((R.plackett_luce_logprob_reference(scores, perm) * weights).sum(), scores)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spread", [1.0, 50.0, 500.0])  # 500: beyond the linear-domain fast path
def test_plackett_luce_is_stable_for_large_scores(spread):
    g = _gen(int(spread))
    scores = (torch.randn(3, 1, 40, generator=g) * spread).requires_grad_(True)
    perm = R.gumbel_sort(scores.squeeze(1), n_samples=5, generator=g)
    fast = R.plackett_luce_logprob(scores, perm)
    torch.testing.assert_close(fast, R.plackett_luce_logprob_reference(scores, perm), rtol=1e-5, atol=1e-3)
    (g_fast,) = torch.autograd.grad(fast.sum(), scores)
    (g_slow,) = torch.autograd.grad(R.plackett_luce_logprob_reference(scores, perm).sum(), scores)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-4, atol=1e-3)
    s = torch.tensor([1000.0, -1000.0, 0.0, 500.0])
    lp = R.plackett_luce_logprob(s, R.argsort_desc(s))
    assert torch.isfinite(lp) and lp.item() > -1e-6  # the argmax ranking has probability ~1


def test_ranking_cost_matches_reference_and_oracle_is_minimal():
    g = _gen(7)
    u = torch.rand(4, 5, 30, generator=g) ** 4
    perm = R.gumbel_sort(torch.randn(4, 5, 30, generator=g), generator=g)
    torch.testing.assert_close(R.ranking_cost(u, perm), R.ranking_cost_reference(u, perm))
    oracle = R.argsort_desc(u)
    torch.testing.assert_close(R.normalized_cost(u, oracle), torch.ones(4, 5))
    torch.testing.assert_close(R.reward(u, oracle), -torch.ones(4, 5))
    assert (R.normalized_cost(u, perm) >= 1 - 1e-6).all()
    # the worst ranking (ascending utility) is worse than any random one
    worst = R.argsort_desc(-u)
    assert (R.normalized_cost(u, worst) >= R.normalized_cost(u, perm) - 1e-6).all()


def test_normalized_cost_exhaustive_minimum_and_zero_utility():
    u = torch.tensor([0.1, 0.7, 0.0, 0.2])
    perms = torch.tensor(list(itertools.permutations(range(4))))
    costs = R.ranking_cost(u, perms)
    assert costs.min().item() == pytest.approx(R.oracle_cost(u).item())
    assert torch.equal(R.normalized_cost(torch.zeros(6), torch.arange(6)), torch.tensor(1.0))
    # scale-free
    perm = torch.tensor([2, 0, 3, 1])
    assert R.normalized_cost(u * 1000, perm).item() == pytest.approx(R.normalized_cost(u, perm).item())


@pytest.mark.parametrize("k", [1, 4])
def test_rloo_advantages_match_reference(k):
    rewards = -1 - torch.rand(3, 6, k, generator=_gen(k)) * 2
    adv = R.rloo_advantages(rewards)
    torch.testing.assert_close(adv, R.rloo_advantages_reference(rewards), rtol=1e-5, atol=1e-5)
    assert adv.abs().max() <= 2.0
    # standardized per agent (clipping aside, mean 0)
    assert adv.mean(dim=(1, 2)).abs().max() < 0.2


def test_rloo_advantages_sign_and_clip():
    rewards = torch.tensor([-1.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0]).reshape(1, 10, 1)
    adv = R.rloo_advantages(rewards)
    assert adv[0, 0, 0] == 2.0  # best episode, clipped
    assert (adv[0, 1:, 0] < 0).all()
    with pytest.raises(ValueError):
        R.rloo_advantages(torch.zeros(2, 1, 1))


def test_evicted_fraction_matches_reference_and_relative_loss_is_at_least_one():
    g = _gen(9)
    u = torch.rand(2, 3, 40, generator=g) ** 3
    s = torch.randn(2, 3, 40, generator=g)
    budgets = [0, 1, 5, 20, 39, 40, 100]
    fast = R.evicted_fraction(s, u, budgets)
    torch.testing.assert_close(fast, R.evicted_fraction_reference(s, u, budgets))
    assert torch.allclose(fast[..., 0], torch.ones(2, 3)) and (fast[..., -2:] == 0).all()
    oracle = R.evicted_fraction(u, u, budgets)
    curve = R.relative_loss(fast, oracle)
    assert curve.shape == (2, 3, len(budgets)) and (curve >= 1 - 1e-5).all()
    torch.testing.assert_close(R.relative_loss(oracle, oracle), torch.ones(2, 3, len(budgets)))


def test_ranking_cost_is_sum_of_per_budget_evictions():
    """cost(σ) / total utility = Σ_b evicted_fraction(b) over b = 0..n−1: the two views agree."""
    g = _gen(11)
    u = torch.rand(5, 25, generator=g)
    s = torch.randn(5, 25, generator=g)
    per_budget = R.evicted_fraction(s, u, range(25)).sum(-1)
    torch.testing.assert_close(per_budget, R.ranking_cost(u, R.argsort_desc(s)) / u.sum(-1))

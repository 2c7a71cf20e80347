"""The inference protocol a policy is trained and judged under, and the ranking costs measured under it.

At inference the first `sinks` positions (attention sinks) and the last `recent` (the local window) are always
kept, by every method, the oracle included (`Budget` keeps them); only the tokens between them compete for the
rest of the budget. So a ranking is judged on those evictable tokens only: ranks that inference never uses do not
count, and the sink's huge future utility does not dominate every cost. Training, validation, the ranking
benchmark and the evaluation's trace costs all measure rankings with the two functions here.

- `evictable_range`: [start, stop) of the evictable positions of a prompt.
- `evictable_cost`: the whole-ranking normalized cost cost(σ)/cost(sorted u) of the evictable tokens (1 = oracle).
- `evicted_shares`: per budget (entries kept per head, sinks and recent included, as `Budget` counts them), the
  share of the evictable future utility a ranking evicts, and the least share any ranking evicts (the oracle's).
Each has an obviously-correct slow `*_reference` beside it that the tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpolicy.policy.config import RECENT, SINKS
from kvpolicy.policy.ranking import argsort_desc, evicted_fraction, normalized_cost
_TINY = 1e-12  # below this a total utility counts as zero (as in ranking.py)


def evictable_range(length: int, sinks: int = SINKS, recent: int = RECENT) -> tuple[int, int]:
    """[start, stop) of the positions a budget can evict in a prompt of `length` tokens (empty when sinks and
    recent cover it)."""
    start = min(sinks, length)
    return start, max(start, length - recent)


def evictable_cost(
    scores: torch.Tensor, utility: torch.Tensor, sinks: int = SINKS, recent: int = RECENT
) -> torch.Tensor:
    """Normalized ranking cost of `scores` (higher = keep) against the future `utility`, ranking only the evictable
    tokens: cost(σ)/cost(sorted u) with cost(σ) = Σ_k k·u_σk. scores, utility: (..., T) over a whole prompt of T
    tokens at positions 0..T−1. Returns (...); 1.0 = oracle, and for a head with no evictable utility."""
    start, stop = evictable_range(scores.shape[-1], sinks, recent)
    return normalized_cost(utility[..., start:stop], argsort_desc(scores[..., start:stop]))


def evictable_cost_reference(
    scores: torch.Tensor, utility: torch.Tensor, sinks: int = SINKS, recent: int = RECENT
) -> torch.Tensor:
    """Slow reference: per head, order the positions i with sinks <= i < T − recent by score (ties: earlier first)
    and by utility, and divide Σ_k k·u of the first order by that of the second."""
    *lead, length = scores.shape
    out = []
    for s, u in zip(scores.reshape(-1, length).tolist(), utility.reshape(-1, length).tolist()):
        evictable = [i for i in range(length) if sinks <= i < length - recent]
        ranked = sorted(evictable, key=lambda i: (-s[i], i))
        best = sorted(evictable, key=lambda i: -u[i])
        cost = sum(k * u[i] for k, i in enumerate(ranked, start=1))
        least = sum(k * u[i] for k, i in enumerate(best, start=1))
        out.append(cost / least if least > _TINY else 1.0)
    return torch.tensor(out, dtype=torch.float32).reshape(lead)


def evicted_shares(
    scores: torch.Tensor,
    utility: torch.Tensor,
    budgets: Sequence[int],
    sinks: int = SINKS,
    recent: int = RECENT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a ranking evicts at each budget, and what the oracle evicts.

    A cache of b entries per head holds the always-kept positions first; the room left goes to the best-ranked
    evictable tokens and the others are evicted. scores, utility: (..., T) over a whole prompt; budgets: entries
    kept per head, sinks and recent included. Returns (lost, oracle), each (..., len(budgets)) in [0, 1]: the share
    of the evictable future utility evicted by `scores`' ranking and by the utility's own (the least possible).
    Heads with no evictable utility lose 0.
    """
    length = scores.shape[-1]
    start, stop = evictable_range(length, sinks, recent)
    always = length - (stop - start)
    room = [max(int(b) - always, 0) for b in budgets]
    s, u = scores[..., start:stop], utility[..., start:stop].float()
    return evicted_fraction(s, u, room), evicted_fraction(u, u, room)


def evicted_shares_reference(
    scores: torch.Tensor,
    utility: torch.Tensor,
    budgets: Sequence[int],
    sinks: int = SINKS,
    recent: int = RECENT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: per head and budget, keep the sinks, the recent tokens and then evictable tokens in ranking
    order until b are kept, and add up the evictable utility left out."""
    *lead, length = scores.shape

    def lost(order: list[int], u: list[float], budget: int) -> float:
        protected = [i for i in range(length) if i < sinks or i >= length - recent]
        kept = set((protected + order)[: max(budget, len(protected))])
        total = sum(u[i] for i in order)
        return sum(u[i] for i in order if i not in kept) / total if total > _TINY else 0.0

    shares, oracle = [], []
    for s, u in zip(scores.reshape(-1, length).tolist(), utility.reshape(-1, length).tolist()):
        evictable = [i for i in range(length) if sinks <= i < length - recent]
        ranked = sorted(evictable, key=lambda i: (-s[i], i))
        best = sorted(evictable, key=lambda i: -u[i])
        shares.append([lost(ranked, u, int(b)) for b in budgets])
        oracle.append([lost(best, u, int(b)) for b in budgets])
    shape = (*lead, len(budgets))
    return torch.tensor(shares).reshape(shape), torch.tensor(oracle).reshape(shape)

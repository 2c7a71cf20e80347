"""The maths of learning to rank cached tokens (KVP paper, "Policy and training"), as pure tensor functions.

A ranking σ lists token indices from most to least worth keeping. Every function is batched over any leading
axes (typically (agents, batch, ...)) with tokens on the last axis, and each fast version has an obviously
correct slow `*_reference` beside it that the tests compare against.

- `gumbel_sort`: draw a full Plackett–Luce ranking in one shot, σ = argsort_desc(s + Gumbel noise).
- `plackett_luce_logprob`: log π(σ) = Σ_i [s_σi − log Σ_{j≥i} exp s_σj], O(n) with a reversed logcumsumexp.
- `ranking_cost`: Σ_k k·u_σk (k = 1..n) = the future attention evicted, summed over every budget.
- `normalized_cost`, `reward`: cost(σ)/cost(sort u) ≥ 1 (1 = oracle) and its negative, the RL reward.
- `rloo_advantages`: leave-one-out baselines, standardized per agent, clipped to ±2.
- `evicted_fraction`, `relative_loss`: the per-budget view of the same cost.

protocol.py applies these to the tokens inference may evict (sinks and recent tokens are always kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_TINY = 1e-12  # below this a total utility counts as zero
_LINEAR_SPAN = 60.0  # score spans below which exp(s - max) cannot underflow float32 (e^-60 >> 1e-38)


def argsort_desc(scores: torch.Tensor) -> torch.Tensor:
    """Deterministic ranking (..., n) -> (..., n) int64, best first; ties broken by lower index (stable)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def gumbel_sort(
    scores: torch.Tensor, n_samples: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample Plackett–Luce rankings: argsort_desc(s + g), g ~ Gumbel(0, 1) i.i.d.

    scores: (..., n). Returns (..., n) int64, or (..., n_samples, n) when `n_samples` is given (several
    permutations of the same scores, e.g. K RLOO episodes sharing one forward pass).
    """
    s = scores.detach()
    if n_samples is not None:
        s = s.unsqueeze(-2).expand(*s.shape[:-1], n_samples, s.shape[-1])
    noise_device = generator.device if generator is not None else s.device
    u = torch.rand(s.shape, generator=generator, dtype=torch.float32, device=noise_device).to(s.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    return argsort_desc(s.float() + gumbel)


def plackett_luce_logprob(scores: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """log π(σ | s) of rankings under the Plackett–Luce model, differentiable in `scores`.

    scores: (..., n) (broadcast against perm's leading axes, e.g. (A, B, 1, n) with perm (A, B, K, n));
    perm: (..., n) int64 rankings, best first. Returns (...).

    The suffix log-sum-exps log Σ_{j≥i} exp s_σj for every i come from ONE reversed cumulative sum: O(n) after
    the gather. Where a row's scores span less than `_LINEAR_SPAN` it is summed as exp(s − max) in float32 (a
    reversed cumsum, whose backward is another cumsum: over 6x cheaper on a CPU thread than torch.logcumsumexp's,
    see the note below); rows of a wider span would underflow that, so then the whole batch takes
    torch.logcumsumexp in log space.
    """
    # Timed (forward + backward at a training step's shape, one thread): 8 ms linear vs 124 ms in log space with
    #   python -m timeit -s "import torch; torch.set_num_threads(1); s = torch.randn(90, 16, 32, 32,
    #   requires_grad=True)" "s.exp().cumsum(-1).log().sum().backward()"
    # and the same with "torch.logcumsumexp(s, -1).sum().backward()".
    s = scores.float().expand(*perm.shape[:-1], scores.shape[-1]).gather(-1, perm)
    top = s.detach().amax(-1, keepdim=True)
    if s.numel() and bool((top - s.detach().amin(-1, keepdim=True) < _LINEAR_SPAN).all()):
        suffix_lse = torch.log((s - top).exp().flip(-1).cumsum(-1).flip(-1)) + top
    else:
        suffix_lse = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    return (s - suffix_lse).sum(-1)


def plackett_luce_logprob_reference(scores: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """O(n²) reference for `plackett_luce_logprob`: pick the best remaining token, one position at a time."""
    s = scores.float().expand(*perm.shape[:-1], scores.shape[-1]).gather(-1, perm)
    n = s.shape[-1]
    terms = [s[..., i] - torch.logsumexp(s[..., i:], dim=-1) for i in range(n)]
    return torch.stack(terms, -1).sum(-1)


def ranking_cost(utility: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """cost(σ) = Σ_k k · u_σk, k = 1..n: each token's future utility times its rank.

    Equals Σ_b (utility evicted at budget b) over b = 0..n−1, so one number scores a ranking at every budget.
    utility: (..., n) broadcast against perm (..., n). Returns (...).
    """
    u = utility.float().expand(*perm.shape[:-1], utility.shape[-1]).gather(-1, perm)
    ranks = torch.arange(1, u.shape[-1] + 1, dtype=u.dtype, device=u.device)
    return (u * ranks).sum(-1)


def ranking_cost_reference(utility: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Slow reference: add up the utility evicted at every budget b = 0..n−1."""
    u = utility.float().expand(*perm.shape[:-1], utility.shape[-1]).gather(-1, perm)
    n = u.shape[-1]
    return torch.stack([u[..., b:].sum(-1) for b in range(n)], -1).sum(-1)


def oracle_cost(utility: torch.Tensor) -> torch.Tensor:
    """The minimum cost over all rankings: utility sorted descending (rearrangement inequality). (...)."""
    return ranking_cost(utility, argsort_desc(utility))


def normalized_cost(utility: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """cost(σ) / cost(sorted u): 1.0 for the oracle ranking, larger is worse; scale-free across heads and
    prompts. A head with zero total utility has nothing to lose: every ranking gets 1.0. Returns (...)."""
    best = oracle_cost(utility).expand(perm.shape[:-1])
    cost = ranking_cost(utility, perm)
    zero = best <= _TINY
    return torch.where(zero, torch.ones_like(cost), cost / best.clamp_min(_TINY))


def reward(utility: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """R(σ) = −cost(σ)/cost(sorted u) ≤ −1; exactly −1 for the oracle ranking. (...)."""
    return -normalized_cost(utility, perm)


def rloo_advantages(rewards: torch.Tensor, clip: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE leave-one-out advantages, standardized per agent and clipped.

    rewards: (A, B, K) for A agents, B prompts, K sampled rankings per prompt. With K > 1 the baseline of an
    episode is the mean reward of the other K−1 rankings of the same prompt (the paper's K samples per
    prompt); with K == 1 it is the mean of the other B−1 episodes of the agent's batch (the released
    training). Advantages are then standardized over each agent's B·K episodes and clipped to [−clip, clip].
    Returns (A, B, K).
    """
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be (agents, batch, samples), got shape {tuple(rewards.shape)}")
    a, b, k = rewards.shape
    group = rewards if k > 1 else rewards.reshape(a, 1, b)
    n = group.shape[-1]
    if n < 2:
        raise ValueError("leave-one-out needs at least 2 episodes per group (batch > 1 or samples > 1)")
    baseline = (group.sum(-1, keepdim=True) - group) / (n - 1)
    adv = (group - baseline).reshape(a, b, k)
    flat = adv.reshape(a, -1)
    adv = (adv - flat.mean(-1)[:, None, None]) / (flat.std(-1)[:, None, None] + eps)
    return adv.clamp(-clip, clip)


def rloo_advantages_reference(rewards: torch.Tensor, clip: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Slow reference for `rloo_advantages`: explicit loops over agents and episodes."""
    a, b, k = rewards.shape
    out = torch.empty(a, b, k)
    for ai in range(a):
        groups = [list(rewards[ai, bi].tolist()) for bi in range(b)] if k > 1 else [rewards[ai, :, 0].tolist()]
        raw = []
        for g in groups:
            raw.append([g[i] - sum(g[:i] + g[i + 1 :]) / (len(g) - 1) for i in range(len(g))])
        values = torch.tensor(raw, dtype=torch.float32).reshape(b, k)
        out[ai] = ((values - values.mean()) / (values.std() + eps)).clamp(-clip, clip)
    return out


def evicted_fraction(scores: torch.Tensor, utility: torch.Tensor, budgets: Sequence[int]) -> torch.Tensor:
    """Share of the total future utility lost when only the top-b tokens by `scores` are kept.

    scores, utility: (..., n). budgets: absolute token counts (≥ n keeps everything: 0 lost).
    Returns (..., len(budgets)) in [0, 1]; heads with zero total utility lose 0.
    """
    u = utility.float().gather(-1, argsort_desc(scores))
    n = u.shape[-1]
    tail = u.flip(-1).cumsum(-1).flip(-1)  # tail[..., k] = Σ_{j ≥ k} u_σj = what is lost keeping the first k
    tail = torch.cat([tail, tail.new_zeros(*tail.shape[:-1], 1)], -1)  # keeping all n loses 0 (also for n = 0)
    idx = torch.tensor([min(max(int(b), 0), n) for b in budgets], dtype=torch.long, device=u.device)  # [] too
    lost = tail.index_select(-1, idx)
    total = tail[..., :1]
    return torch.where(total > _TINY, lost / total.clamp_min(_TINY), torch.zeros_like(lost))


def evicted_fraction_reference(scores: torch.Tensor, utility: torch.Tensor, budgets: Sequence[int]) -> torch.Tensor:
    """Slow reference: for each budget, mask out the top-b tokens and add up what remains."""
    order = argsort_desc(scores)
    u = utility.float()
    out = []
    for b in budgets:
        kept = torch.zeros_like(u, dtype=torch.bool).scatter(-1, order[..., : max(int(b), 0)], True)
        total = u.sum(-1)
        lost = (u * ~kept).sum(-1)
        out.append(torch.where(total > _TINY, lost / total.clamp_min(_TINY), torch.zeros_like(lost)))
    return torch.stack(out, -1)


def relative_loss(lost: torch.Tensor, best: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """Per-budget cost relative to the oracle: `lost`, the share of the utility a ranking evicts at a budget, over
    `best`, the least share any ranking evicts there (`evicted_fraction` of the utility itself); any shape.

    1.0 = as good as keeping the truly most-attended tokens. Where the oracle loses (almost) nothing, the ratio is
    taken on shares floored at `floor`, so it stays finite. This is the per-head view; for averaging over prompts
    prefer ratios of mean shares.
    """
    return lost.clamp_min(floor) / best.clamp_min(floor)

"""Calibrating a policy's scores onto one scale across heads (policy/calibration.py), and measuring on held-out
traces what that buys: the future attention each allocation mode loses at the memory of the uniform cut.

- `fit_curve`: per head, the mean future attention of the tokens at each relative rank of its scores (binned, made
  non-increasing); `fit_curve_reference` bins every token one by one.
- `attention_lost`: the share of a prompt's future attention (its utility, summed over every head) that a cut
  evicts, when `keys` rank the entries and an allocation spreads the budget; `attention_lost_reference` keeps
  each head's entries one by one.
- `fit_calibration` / `held_out_losses`: both over trace sets, a bar each.

Why total attention: a head whose future attention sits on the sinks loses little whatever it evicts, and one that
reads the whole prompt loses much; the attention the model no longer sees, summed over heads, is what an
allocation that moves budget between heads can lower, and what the per-head costs (normalized per head) cannot
show.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpolicy.compression.allocation import Allocation
from kvpolicy.compression.budget import Budget, protected_scores
from kvpolicy.errors import KVPError
from kvpolicy.policy.calibration import Calibration, rank_edges, relative_ranks
from kvpolicy.policy.config import RECENT, SINKS
from kvpolicy.policy.network import PolicyNet
from kvpolicy.policy.protocol import evictable_range
from kvpolicy.progress import bar
from kvpolicy.traces.store import TraceSample


def fit_curve(scores: Sequence[torch.Tensor], utilities: Sequence[torch.Tensor], edges: torch.Tensor,
              sinks: int = SINKS, recent: int = RECENT) -> torch.Tensor:
    """Per head, the mean utility x entries of its evictable tokens in each relative-rank bin (ranks among all the
    head's tokens, by score), made non-increasing (each bin at most the one above it; an empty bin takes the value
    of the nearest one above, or below for the top bins). scores, utilities: per sample (L, H, T) (T may differ).
    Returns (L, H, B) float32."""
    L, H = scores[0].shape[:2]
    sums = torch.zeros(L, H, len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    for s, u in zip(scores, utilities):
        T = s.shape[-1]
        start, stop = evictable_range(T, sinks, recent)
        bins = torch.bucketize(relative_ranks(s)[..., start:stop].contiguous(), edges[1:-1], right=True)
        sums.scatter_add_(-1, bins, u[..., start:stop].double() * T)
        counts.scatter_add_(-1, bins, torch.ones_like(bins, dtype=torch.float64))
    if not bool((counts.sum(-1) > 0).all()):
        raise KVPError("a calibration needs evictable tokens in every head: give longer traces")
    mean = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)
    for b in range(1, mean.shape[-1]):  # empty bins take the bin above
        mean[..., b] = torch.where(counts[..., b] > 0, mean[..., b], mean[..., b - 1])
    for b in range(mean.shape[-1] - 2, -1, -1):  # empty top bins take the first filled one below
        mean[..., b] = torch.where(mean[..., b].isnan(), mean[..., b + 1], mean[..., b])
    return mean.cummin(dim=-1).values.float()


def fit_curve_reference(scores: Sequence[torch.Tensor], utilities: Sequence[torch.Tensor], edges: torch.Tensor,
                        sinks: int = SINKS, recent: int = RECENT) -> torch.Tensor:
    """Slow `fit_curve`: per head, sort each sample's tokens by score, put every evictable one in the bin of its
    (rank + 0.5) / T, average, fill the empty bins from above (or below), then lower each bin to the least above."""
    L, H = scores[0].shape[:2]
    bins = len(edges) - 1
    curve = torch.zeros(L, H, bins)
    for layer in range(L):
        for head in range(H):
            values: list[list[float]] = [[] for _ in range(bins)]
            for s, u in zip(scores, utilities):
                T = s.shape[-1]
                order = sorted(range(T), key=lambda i: -float(s[layer, head, i]))
                for rank, i in enumerate(order):
                    if sinks <= i < T - recent:
                        q = (rank + 0.5) / T
                        b = max(k for k in range(bins) if float(edges[k]) <= q)
                        values[b].append(float(u[layer, head, i]) * T)
            means = [sum(v) / len(v) if v else None for v in values]
            for b in range(1, bins):
                means[b] = means[b] if means[b] is not None else means[b - 1]
            for b in range(bins - 2, -1, -1):
                means[b] = means[b] if means[b] is not None else means[b + 1]
            for b in range(bins):
                curve[layer, head, b] = min(means[: b + 1])
    return curve


def attention_lost(keys: torch.Tensor, utility: torch.Tensor, budget: Budget, allocation: Allocation) -> float:
    """The share of the future attention (Σ utility over every layer, head and token) a cut evicts. keys: (L, H, T)
    scores, higher = keep (on one scale across heads when the allocation moves budget); utility: (L, H, T); the
    budget's sinks and recent tokens are kept in every head, as the engine keeps them."""
    L, H, T = keys.shape
    positions = torch.arange(T).expand(1, H, T)
    guarded = [protected_scores(k[None], positions, budget, T) for k in keys]  # (1, H, T), protected on top
    always = (positions < budget.sinks) | (positions >= T - budget.recent)
    counts = allocation.counts([g.masked_fill(always, torch.inf) for g in guarded], budget.kept(T))
    lost = 0.0
    for key, count, u in zip(guarded, counts, utility):
        rank = key[0].argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = the head's best entry
        lost += float(u.double()[rank >= count[0][:, None]].sum())
    return lost / max(float(utility.double().sum()), 1e-12)


def attention_lost_reference(keys: torch.Tensor, utility: torch.Tensor, budget: Budget,
                             allocation: Allocation) -> float:
    """Slow `attention_lost`: each head keeps its sinks, its recent tokens, then its best-keyed entries one at a
    time until its count; the utility of the rest is added up."""
    L, H, T = keys.shape
    protected = [i for i in range(T) if i < budget.sinks or i >= T - budget.recent]
    guarded = [keys[layer].clone()[None] for layer in range(L)]
    for g in guarded:
        g[..., protected] = torch.inf
    counts = allocation.counts(guarded, budget.kept(T))
    lost = 0.0
    for layer in range(L):
        for head in range(H):
            sinks = sorted(i for i in protected if i < budget.sinks)
            recent = sorted((i for i in protected if i >= budget.sinks), reverse=True)
            rest = sorted((i for i in range(T) if i not in protected), key=lambda i: -float(keys[layer, head, i]))
            kept = set((sinks + recent + rest)[: int(counts[layer][0, head])])
            lost += sum(float(utility[layer, head, i]) for i in range(T) if i not in kept)
    return lost / max(float(utility.double().sum()), 1e-12)


def policy_scores(policy: PolicyNet, trace: TraceSample) -> torch.Tensor:
    """The policy's raw scores (L, H, T) float32 of one trace's cache."""
    L, H, T = trace.utility.shape
    positions = torch.as_tensor(trace.positions).view(1, 1, T).expand(1, H, T)
    with torch.no_grad():
        return torch.stack([policy.score_layer(layer, trace.keys[layer][None].float(),
                                               trace.values[layer][None].float(), positions)[0].float()
                            for layer in range(L)])


def fit_calibration(policy: PolicyNet, traces, fit: dict, sinks: int = SINKS, recent: int = RECENT) -> Calibration:
    """The calibration of `policy` fitted on every trace of `traces` (a TraceReader or TraceUnion), from the
    evictable tokens only (the sinks and recent tokens are never evicted, so their value is never compared); `fit`
    is what it records of itself."""
    scores, utilities = [], []
    for index in bar(range(len(traces)), desc="calibrate: fit", total=len(traces), unit="trace"):
        trace = traces.read_layers(index)
        scores.append(policy_scores(policy, trace))
        utilities.append(trace.utility.float())
    edges = rank_edges()
    return Calibration(edges, fit_curve(scores, utilities, edges, sinks, recent), fit)


def held_out_losses(policy: PolicyNet, calibration: Calibration, traces, budgets: Sequence[Budget],
                    allocations: dict[str, Allocation]) -> dict[str, dict[str, list[float]]]:
    """Per ranking ("KVP", "KVP uncalibrated", "oracle") and allocation mode, per budget label, the attention lost
    on each held-out trace: KVP's raw scores in the uniform mode (its calibrated ones rank each head alike), its
    calibrated ones and, to show what the calibration does, its raw ones when the budget moves; the oracle ranks by
    the true utility."""
    losses: dict[str, dict[str, list[float]]] = {}
    for index in bar(range(len(traces)), desc="calibrate: held out", total=len(traces), unit="trace"):
        trace = traces.read_layers(index)
        raw = policy_scores(policy, trace)
        calibrated = torch.stack([calibration.apply(layer, raw[layer][None])[0] for layer in range(raw.shape[0])])
        utility = trace.utility.float()
        for mode, allocation in allocations.items():
            rankings = {"KVP": calibrated, "oracle": utility}
            if mode != "head":
                rankings["KVP uncalibrated"] = raw
            for name, keys in rankings.items():
                row = losses.setdefault(f"{name} ({mode})", {})
                for budget in budgets:
                    row.setdefault(budget.label, []).append(attention_lost(keys, utility, budget, allocation))
    return losses

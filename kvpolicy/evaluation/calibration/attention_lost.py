"""What a budget moved between heads and layers buys, measured on held-out traces: the future attention a cut
evicts, summed over every head, when an allocation (compression/allocation.py) spreads the budget.

- `attention_lost`: that share for one trace, when `keys` rank the entries; `attention_lost_reference` keeps each
  head's entries one by one.
- `held_out_losses`: KVP's calibrated and raw scores and the oracle in each allocation mode, over a trace set.

Why total attention: a head whose future attention sits on the sinks loses little whatever it evicts, and one that
reads the whole prompt loses much; the attention the model no longer sees, summed over heads, is what an
allocation that moves budget between heads can lower, and what the per-head trace costs (costs.py, normalized per
head) cannot show.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpolicy.compression.allocation import Allocation
from kvpolicy.compression.budget import Budget
from kvpolicy.compression.names import HEAD
from kvpolicy.policy.calibration import Calibration
from kvpolicy.policy.network import PolicyNet
from kvpolicy.progress import bar
from kvpolicy.training.calibrate import policy_scores


def attention_lost(keys: torch.Tensor, utility: torch.Tensor, budget: Budget, allocation: Allocation) -> float:
    """The share of the future attention (Σ utility over every layer, head and token) a cut evicts. keys: (L, H, T)
    scores, higher = keep (on one scale across heads when the allocation moves budget); utility: (L, H, T); the
    budget's sinks and recent tokens are kept in every head, as the engine keeps them."""
    L, H, T = keys.shape
    positions = torch.arange(T).expand(1, H, T)
    selection, counts = allocation.select([k[None] for k in keys], [positions] * L, budget, T)  # as the engine cuts
    lost = 0.0
    for key, count, u in zip(selection, counts, utility):
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


def held_out_losses(policy: PolicyNet, calibration: Calibration, traces, budgets: Sequence[Budget],
                    allocations: dict[str, Allocation]) -> dict[str, dict[str, list[float]]]:
    """Per ranking ("KVP", "KVP uncalibrated", "oracle") and allocation mode, per budget label, the attention lost
    on each held-out trace: KVP's calibrated scores in every mode (in the uniform one they rank each head as its raw
    scores do) and, to show what the calibration does, its raw ones when the budget moves; the oracle ranks by the
    true utility."""
    losses: dict[str, dict[str, list[float]]] = {}
    for index in bar(range(len(traces)), desc="calibrate: held out", total=len(traces), unit="trace"):
        trace = traces.read_layers(index)
        raw = policy_scores(policy, trace)
        calibrated = torch.stack([calibration.apply(layer, raw[layer][None])[0] for layer in range(raw.shape[0])])
        utility = trace.utility.float()
        for mode, allocation in allocations.items():
            rankings = {"KVP": calibrated, "oracle": utility}
            if mode != HEAD:
                rankings["KVP uncalibrated"] = raw
            for name, keys in rankings.items():
                row = losses.setdefault(f"{name} ({mode})", {})
                for budget in budgets:
                    row.setdefault(budget.label, []).append(attention_lost(keys, utility, budget, allocation))
    return losses

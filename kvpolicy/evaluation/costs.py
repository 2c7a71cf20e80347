"""Reward-level evaluation on held-out traces: how much future attention each scorer's ranking evicts.

Per (layer, KV head) of each trace, a scorer ranks the prompt's tokens from the stored keys, values and positions
(TOVA and SnapKV, which need the question's queries, use the scores the traces stored for them; the oracle ranks
by the true future utility). At budget b the evicted tokens are those ranked below b, and
−R_b = (utility evicted by the scorer at b) / (the least utility any b-token subset evicts): 1 = oracle. The
budget 'all' holds the paper's whole-ranking cost, cost(σ) / cost(sorted u), per head.
"""

from __future__ import annotations

from typing import Iterator

import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.scorers.base import LayerView
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.outcome import Clock, Outcome, Wanted
from kvpolicy.evaluation.scorers import ScorerEntry
from kvpolicy.evaluation.store import WHOLE_RANKING
from kvpolicy.models import ModelHandle
from kvpolicy.traces.store import TraceReader
from kvpolicy.policy.ranking import argsort_desc, budget_cost_curve, evicted_fraction, normalized_cost


def trace_scorable(entry: ScorerEntry, reader: TraceReader) -> bool:
    """Attention-free scorers, the learned policy and the oracle rank any trace; query-based ones only where the
    traces stored their scores."""
    return entry.kind in ("oracle", "learned") or entry.query_window == 0 or entry.spec in reader.baselines


def trace_scores(handle: ModelHandle, reader: TraceReader, index: int, entry: ScorerEntry,
                 keys: torch.Tensor, values: torch.Tensor, utility: torch.Tensor) -> torch.Tensor:
    """(L, H, T) scores of one trace, higher = keep. keys, values: (L, H, T, d); utility: (L, H, T)."""
    if entry.kind == "oracle":
        return utility
    if entry.query_window != 0 and entry.kind != "learned":
        if entry.spec not in reader.baselines:
            raise KVPError(f"traces in {reader.directory} store no '{entry.spec}' scores; record them with "
                           f"`kvp traces --baselines {entry.spec}` or leave the scorer out")
        return torch.stack([reader.read_baseline(index, layer, entry.spec) for layer in range(reader.n_layers)])
    n_layers, heads, length = utility.shape
    positions = reader.positions(index).view(1, 1, length).expand(1, heads, length)
    rotary = handle.model.model.rotary_emb
    with torch.no_grad():
        return torch.stack([
            entry.scorer.score(LayerView(layer_idx=layer, keys=keys[layer][None].float(), values=values[layer][None].float(),
                                         positions=positions, module=handle.layers[layer].self_attn,
                                         rotary_emb=rotary))[0].float()
            for layer in range(n_layers)
        ])


def cost_fields(scores: torch.Tensor, utility: torch.Tensor, kept: int | None) -> dict:
    """Record fields for one budget (kept tokens per head) or, with kept=None, the whole-ranking cost.

    value: the sample's cost over all heads (ratio of mean evicted utility to the oracle's); lost / best: those
    means, so samples pool as Σ lost / Σ best; per_head: (L, H) per-head cost (floored ratio, as the training
    curves use)."""
    if kept is None:
        per_head = normalized_cost(utility, argsort_desc(scores))
        return {"value": float(per_head.mean()), "per_head": per_head.round(decimals=4).tolist()}
    lost = evicted_fraction(scores, utility, [kept])[..., 0]
    best = evicted_fraction(utility, utility, [kept])[..., 0]
    per_head = budget_cost_curve(scores, utility, [kept])[..., 0]
    lost_mean, best_mean = float(lost.mean()), float(best.mean())
    return {"value": lost_mean / max(best_mean, 1e-12), "lost": lost_mean, "best": best_mean,
            "per_head": per_head.round(decimals=4).tolist()}


def run_traces(handle: ModelHandle, reader: TraceReader, index: int, entries: list[ScorerEntry],
               budgets: list[Budget], wanted: Wanted) -> Iterator[Outcome]:
    """Outcomes of the wanted (scorer, budget) pairs on trace `index`, plus the whole-ranking cost per scorer."""
    labels = [(b.label, b) for b in budgets] + [(WHOLE_RANKING, None)]
    active = [e for e in entries if any(wanted(e.id, label) for label, _ in labels)]
    if not active:
        return
    clock = Clock()
    trace = reader.read_layers(index)
    utility = trace.utility.float()
    length = utility.shape[-1]
    bytes_full = trace.keys.numel() * 2 * 2  # the fp16 keys and values of the whole prompt
    read_s = clock.lap()
    sample = reader.manifest["samples"][index].get("id", str(index))
    for entry in active:
        scores = trace_scores(handle, reader, index, entry, trace.keys, trace.values, utility)
        todo = [(label, b) for label, b in labels if wanted(entry.id, label)]
        rank_s = clock.lap() / len(todo)
        for label, budget in todo:
            kept = budget.kept(length) if budget is not None else None
            fields = cost_fields(scores, utility, kept)
            kept_tokens = length if kept is None else kept
            yield Outcome(sample, entry, label, length, kept_tokens, bytes_full, bytes_full * kept_tokens // length,
                          rank_s + clock.lap(), read_s, fields)
            clock.lap()

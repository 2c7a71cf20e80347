"""Calibrating a policy's scores onto one scale across heads (policy/calibration.py) from training traces.

- `fit_curve`: per head, the mean future attention of the tokens at each relative rank of its scores (binned, made
  non-increasing); `fit_curve_reference` bins every token one by one.
- `fit_calibration`: the curves of a policy over a trace set (a bar), as the calibration the checkpoint keeps.

What it buys is measured on held-out traces by evaluation/calibration/attention_lost.py (`kvp calibrate --held-out`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpolicy.errors import KVPError
from kvpolicy.policy.calibration import Calibration, rank_edges, relative_ranks
from kvpolicy.policy.config import RECENT, SINKS
from kvpolicy.policy.network import PolicyNet
from kvpolicy.policy.protocol import evictable_range
from kvpolicy.progress import bar
from kvpolicy.traces.store import TraceSample
from kvpolicy.training.data import NO_STATES


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


def policy_scores(policy: PolicyNet, trace: TraceSample) -> torch.Tensor:
    """The policy's raw scores (L, H, T) float32 of one trace's cache (with its hidden states for a policy that
    reads them)."""
    L, H, T = trace.utility.shape
    positions = torch.as_tensor(trace.positions).view(1, 1, T).expand(1, H, T)
    if policy.config.hidden_state_dim and trace.states is None:
        raise KVPError(NO_STATES)
    states = trace.states if policy.config.hidden_state_dim else None
    with torch.no_grad():
        return torch.stack([policy.score_layer(layer, trace.keys[layer][None].float(),
                                               trace.values[layer][None].float(), positions,
                                               states=None if states is None else states[layer][None].float()
                                               )[0].float()
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

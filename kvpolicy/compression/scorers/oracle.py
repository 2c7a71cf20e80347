"""The oracle: score every cached entry by the future attention it will truly receive (e.g. from traces).

Ranking by the true future utility u minimises the evicted utility at every budget at once, so the oracle is
the upper bound every other scorer is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence

import torch

from kvpolicy.compression.scorers.base import LayerView, Scorer
from kvpolicy.errors import KVPError


@dataclass
class OracleScorer(Scorer):
    """utility: per layer, (H, N) or (B, H, N) future utility indexed by true position (N > every cached
    position); e.g. a traces (L, H, T) tensor. Scores are looked up by each entry's position, so the oracle also
    ranks a cache that was already compressed."""

    name = "oracle"
    utility: Sequence[torch.Tensor] = field(default_factory=list, repr=False)

    def score(self, view: LayerView) -> torch.Tensor:
        if view.layer_idx >= len(self.utility):
            raise KVPError(f"oracle has utility for {len(self.utility)} layers, not for layer {view.layer_idx}")
        u = self.utility[view.layer_idx]
        u = u.expand(view.positions.shape[0], *u.shape) if u.dim() == 2 else u
        if u.shape[:2] != view.positions.shape[:2] or int(view.positions.max()) >= u.shape[-1]:
            raise KVPError(
                f"oracle utility of shape {tuple(u.shape)} does not cover the cache (batch, heads, positions up to "
                f"{int(view.positions.max())}); record the utility for this exact prompt"
            )
        return u.to(view.keys.device).float().gather(-1, view.positions)

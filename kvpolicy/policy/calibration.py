"""Scores that compare across heads and layers: a per-head map from where a token ranks in its head to the future
attention such a token receives.

KVP's agents are trained to rank the tokens of their own head (a Plackett-Luce objective is blind to a constant
added to one head's scores), so a score says nothing about another head's. Moving budget between heads (an
allocation mode, compression/allocation.py) needs values on one scale, and the value of keeping one more entry in a
head is the future attention its next-best token receives. So the calibration holds, per (layer, head), a curve:
the mean future attention (the traces' utility) of the tokens the head's agent ranks at relative rank q (q = rank /
cached entries, in bins finer near the top), times the number of entries (which makes it independent of the cache
length), fitted on training traces (training/calibrate.py) and made non-increasing in q. A token's calibrated score
is log(curve(q) / entries + EPS), less a vanishing multiple of q that orders tokens of one bin by rank (float64, as
the engine keeps it): each head's ranking is exactly its agent's.

The calibration lives in the checkpoint's config.json ("calibration"), beside the weights it was fitted for, so the
weights' sha256 (and every result's identity in the uniform mode) is unchanged by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvpolicy.errors import KVPError
from kvpolicy.io import sha256_json

EPS = 1e-6  # utility floor inside the log: far below any kept token's share of one query's attention
TIE_BREAK = 1e-9  # subtracted per unit of relative rank (in float64): orders one bin's tokens by rank, moves nothing
BINS = 32

CALIBRATION = "calibration"  # config.json's key


def rank_edges(bins: int = BINS) -> torch.Tensor:
    """(bins + 1,) relative-rank bin edges from 0 to 1: 0, then geometric from 1/4096 to 1 (the top ranks, where a
    budget's last kept entries are decided at small budgets, get the finest bins)."""
    return torch.cat([torch.zeros(1), torch.logspace(-12, 0, bins, base=2.0)])


def relative_ranks(scores: torch.Tensor) -> torch.Tensor:
    """(..., T) scores -> (..., T) relative rank in [0, 1) of each entry among its row's, (rank + 0.5) / T with rank 0
    the highest score."""
    T = scores.shape[-1]
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return (rank.float() + 0.5) / max(T, 1)


@dataclass(frozen=True)
class Calibration:
    """edges: (B + 1,) relative-rank bin edges; curve: (L, H, B) float32, non-increasing along B, the mean future
    attention x entries of a head's tokens in each rank bin; `fit` records how it was fitted (traces, command,
    held-out figures)."""

    edges: torch.Tensor
    curve: torch.Tensor
    fit: dict[str, Any]

    def __post_init__(self):
        if self.curve.dim() != 3 or self.edges.shape != (self.curve.shape[-1] + 1,):
            raise KVPError(f"a calibration needs (layers, heads, bins) values and bins + 1 edges, got "
                           f"{tuple(self.curve.shape)} and {tuple(self.edges.shape)}")
        if not (bool(torch.isfinite(self.curve).all()) and bool((self.curve >= 0).all())
                and bool((self.curve[..., 1:] <= self.curve[..., :-1]).all())):
            raise KVPError("a calibration's curves must be finite, non-negative and non-increasing; fit it again "
                           "with `kvp calibrate`")

    def apply(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """Scores (B, H, T) of layer `layer` -> log of each token's predicted future attention (B, H, T) float64,
        ordering each head's tokens exactly as the scores do (float32 would round the tie-break away). The values
        depend on the rank alone, so they are laid out in rank order once per head and scattered back through one
        sort of the scores."""
        T = scores.shape[-1]
        order = scores.argsort(dim=-1, descending=True)  # (B, H, T): the entry at each rank
        q = (torch.arange(T, device=scores.device).float() + 0.5) / max(T, 1)  # rank -> relative rank, as fitted
        bins = torch.bucketize(q, self.edges.to(scores.device)[1:-1], right=True)  # (T,)
        by_rank = self.curve[layer].to(scores.device).double()[:, bins]  # (H, T)
        by_rank = (by_rank / max(T, 1) + EPS).log() - TIE_BREAK * q.double()
        return torch.empty(order.shape, dtype=torch.float64, device=scores.device).scatter_(
            -1, order, by_rank.expand(order.shape))

    @property
    def sha256(self) -> str:
        """What the calibrated scores depend on (the fitted numbers, not the record of the fit)."""
        return sha256_json({"edges": self.edges.tolist(), "curve": self.curve.tolist()})

    def to_config(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist(), "curve": self.curve.tolist(), "fit": self.fit}

    @classmethod
    def from_config(cls, config: dict[str, Any], shape: tuple[int, int], where: str | Path) -> Calibration:
        """The calibration of a checkpoint config's "calibration" entry, for a policy of `shape` (layers, heads)."""
        try:
            calibration = cls(torch.tensor(config["edges"], dtype=torch.float32),
                              torch.tensor(config["curve"], dtype=torch.float32), dict(config.get("fit", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise KVPError(f"{where} has an unreadable calibration ({err}); fit it again with `kvp calibrate`"
                           ) from None
        if tuple(calibration.curve.shape[:2]) != tuple(shape):
            raise KVPError(f"{where}'s calibration is for {tuple(calibration.curve.shape[:2])} (layers, heads), its "
                           f"policy has {tuple(shape)}; fit it again with `kvp calibrate`")
        return calibration

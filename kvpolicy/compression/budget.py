"""How many cache entries to keep, and which: the budget and the top-b selection with protected sinks/recent.

A budget is either an absolute number of entries per KV head (the KVP paper's setting: the same for every
head and layer, sinks and recent tokens included) or a kvpress compression ratio (fraction removed). Because
every head keeps the same number of entries, each layer's cache stays one dense (B, H, b, d) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.errors import KVPError
from kvpolicy.policy.protocol import RECENT, SINKS


@dataclass(frozen=True)
class Budget:
    """tokens: entries kept per KV head in total (sinks + recent included); ratio: fraction removed (kvpress).

    Exactly one of tokens/ratio. The first `sinks` and the last `recent` positions are always kept: a token
    budget below sinks + recent is refused. A ratio can still keep fewer entries than that on a short cache;
    then the sinks come first (earliest first), then the recent tokens (newest first), and `shortfall` says so.
    A budget >= the cache length keeps everything.
    """

    tokens: int | None = None
    ratio: float | None = None
    sinks: int = SINKS
    recent: int = RECENT

    def __post_init__(self):
        if (self.tokens is None) == (self.ratio is None):
            raise KVPError("give exactly one of a token budget (e.g. 256) or a compression ratio (e.g. 0.5)")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int)):
            raise KVPError(f"budget must be a whole number of tokens per KV head, got {self.tokens!r}")
        if self.tokens is not None and self.tokens <= 0:
            raise KVPError(f"budget must be a positive number of tokens per KV head, got {self.tokens}")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1):
            raise KVPError(f"compression ratio is the fraction of entries removed, in [0, 1); got {self.ratio!r}")
        for name in ("sinks", "recent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise KVPError(f"Budget.{name} must be a non-negative integer, got {value!r}")
        if self.tokens is not None and self.tokens < self.sinks + self.recent:
            raise KVPError(f"a budget of {self.tokens} entries per head cannot keep the {self.sinks} sinks and "
                           f"{self.recent} recent positions it promises; use a budget >= {self.sinks + self.recent} "
                           "or fewer sinks/recent")

    def kept(self, length: int) -> int:
        """Entries kept per head out of `length` (kvpress's rounding for ratios: at least 1)."""
        if self.tokens is not None:
            return min(self.tokens, length)
        if self.ratio == 0:
            return length
        return max(1, int(length * (1 - self.ratio)))

    def of_length(self, length: int) -> Budget:
        """The token budget keeping what this one keeps of a cache of `length` entries (itself when in tokens): a
        ratio of a whole prompt held fixed while the prompt is fed in chunks."""
        return self if self.tokens is not None else Budget(self.kept(length), sinks=self.sinks, recent=self.recent)

    def shortfall(self, length: int) -> str | None:
        """None when a cache of `length` entries keeps every promised sink and recent position; else which of
        the promises was kept (only a ratio budget on a short cache falls short)."""
        kept, promised = self.kept(length), min(self.sinks + self.recent, length)
        if kept >= promised:
            return None
        sinks = min(self.sinks, kept)
        return (f"{self.label} keeps {kept} of {length} entries per head, fewer than the {self.sinks} sinks + "
                f"{self.recent} recent positions promised: kept {sinks} sinks and the {kept - sinks} newest tokens")

    @property
    def label(self) -> str:
        """Short name for results and file names: 'b256' or 'r0.50'."""
        return f"b{self.tokens}" if self.tokens is not None else f"r{self.ratio:.2f}"


def protected_scores(scores: torch.Tensor, positions: torch.Tensor, budget: Budget, length: int) -> torch.Tensor:
    """Selection keys (B, H, T) float32 (float64 for float64 scores): sinks above recent tokens above every score.

    Sinks rank earliest first, recent tokens newest first, so even a budget below sinks + recent is well
    defined. Unprotected entries keep their score unchanged (ties break exactly as in kvpress's topk). Protected
    keys lie within 4x (largest finite |score| of their row + 1), so a kvpress press that rescales or adds to
    these scores can neither overflow them nor reorder them.
    positions: (B, H, T) true positions; length: tokens fed so far (recent = positions >= length - recent).
    """
    key = scores if scores.dtype == torch.float64 else scores.float()  # float64 keys keep their resolution
    base = key.masked_fill(~key.isfinite(), 0).abs().amax(-1, keepdim=True) + 1  # above every finite score
    age = (length - 1 - positions).float()  # 0 for the newest token
    key = torch.where(positions >= length - budget.recent, base * (2 - age / max(budget.recent, 1)), key)
    return torch.where(positions < budget.sinks, base * (4 - positions.float() / max(budget.sinks, 1)), key)


def protected(positions: torch.Tensor, budget: Budget, length: int) -> torch.Tensor:
    """(B, H, T) bool: the entries the budget always keeps, sinks and recent tokens (positions: (B, H, T) true
    positions; length: tokens fed so far)."""
    return (positions < budget.sinks) | (positions >= length - budget.recent)


def keep_indices(scores: torch.Tensor, positions: torch.Tensor, budget: Budget, length: int) -> torch.Tensor:
    """Indices (B, H, k) into the cache's sequence axis of the entries to keep, ascending, k = budget.kept(T).

    scores: (B, H, T), higher = keep; positions: (B, H, T) int64 true positions; length: tokens fed so far.
    """
    if scores.shape != positions.shape or scores.dim() != 3:
        raise KVPError(f"scores {tuple(scores.shape)} and positions {tuple(positions.shape)} must both be (B, H, T)")
    k = budget.kept(scores.shape[-1])
    key = protected_scores(scores, positions, budget, length)
    return key.topk(k, dim=-1).indices.sort(dim=-1).values


def keep_indices_reference(scores: torch.Tensor, positions: torch.Tensor, budget: Budget, length: int) -> torch.Tensor:
    """Slow, obviously-correct `keep_indices`: per (batch, head) list sinks (earliest first), then recent tokens
    (newest first), then the rest by score, and keep the first k."""
    B, H, T = scores.shape
    k = budget.kept(T)
    out = torch.empty(B, H, k, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            pos = positions[b, h].tolist()
            val = scores[b, h].tolist()
            sinks = sorted((i for i in range(T) if pos[i] < budget.sinks), key=lambda i: pos[i])
            recent = [i for i in range(T) if pos[i] >= length - budget.recent and i not in sinks]
            recent = sorted(recent, key=lambda i: -pos[i])
            rest = sorted((i for i in range(T) if i not in sinks and i not in recent), key=lambda i: -val[i])
            out[b, h] = torch.tensor(sorted((sinks + recent + rest)[:k]))
    return out

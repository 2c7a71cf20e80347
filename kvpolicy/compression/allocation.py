"""How a budget is spread over the cache's heads and layers: the number of entries each (layer, row, KV head)
keeps, at the memory of the uniform cut.

- `UNIFORM`: every head of every layer keeps `budget.kept(T)` entries (the KVP paper's setting, kvpress's
  ScorerPress).
- `AdaKV`: the heads of a layer share `kv_heads x kept` entries; each keeps its `alpha_safeguard x kept` best, the
  rest go to the layer's best scores whichever head they are in (AdaKV, arXiv 2407.11550; kvpress's AdaKVPress).
- `Global`: every head of every layer draws from one pool of layers x heads x kept entries, by score (kvpress's
  KVzipPress by default): the scores must compare across heads and layers.
- `Layerwise`: the pool of `Global`, but the heads of a layer share one count: layers differ, each stays one dense
  tensor (kvpolicy's `--allocation layer`).
- `Pyramid`: every head of layer l keeps the count kvpress's PyramidKVPress gives layer l, many in the first layers
  and few in the last, about `kept` per layer on average (PyramidKV, arXiv 2406.02069).
- `Threshold`: every entry whose score reaches one calibrated threshold is kept (KVzap's thresholded form, kvpress's
  DMSPress): `kept` per head on the training prompts' average, more or fewer on a given text.

Counts are computed from selection keys that already protect the sinks and recent tokens (`budget.protected_scores`),
so those stay kept in every head. The engine (`engine.evict`) keeps each head's top `count` entries; a layer whose
heads keep different counts is stored padded to its largest count, the padding masked out of attention
(`KVState.masks`) and counted in the bytes held.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from kvpolicy.compression.budget import Budget, protected, protected_scores
from kvpolicy.compression.names import HEAD
from kvpolicy.errors import KVPError


KEEP = torch.finfo(torch.float32).max  # a score that keeps its entry whatever the threshold (kvpress's mark too)
DMS_WINDOW = 128  # kvpress DMSPress's sliding window: the thresholded form never evicts the newest entries


@dataclass(frozen=True)
class Allocation:
    """Base class: the uniform allocation. `counts` gives each head's number of kept entries."""

    name = "uniform"

    def counts(self, keys: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
        """Per layer, entries kept (B, H) int64 by each row and head, at most the layer's T.

        keys: per layer the selection keys (B, H, T), higher = keep, protected entries above all others; kept: the
        uniform count per head (`budget.kept(T)`), which fixes the total."""
        return [torch.full(k.shape[:2], min(kept, k.shape[-1]), dtype=torch.long, device=k.device) for k in keys]

    def select(self, scores: list[torch.Tensor], positions: list[torch.Tensor], budget: Budget, length: int,
               masks: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What a cut keeps: per layer the selection keys (B, H, T) (`budget.protected_scores`: sinks and recent
        tokens above every score; entries masks (B, H, T) marks False below every other) and the entries each row
        and head keeps (B, H), counted with the protected entries above all others, so every head keeps them.
        Each head keeps its `count` best keys. scores, positions: per layer (B, H, T); length: tokens fed so far.
        Layers of one shape are keyed in one call for all (a few small ops instead of a few per layer)."""
        if len({layer.shape for layer in scores}) == 1:
            stacked = [torch.stack(scores), torch.stack(positions), None if masks is None else torch.stack(masks)]
            keys, guarded = (list(x.unbind(0)) for x in _selection_keys(*stacked, budget, length))
        else:
            pairs = [_selection_keys(layer, at, None if masks is None else masks[idx], budget, length)
                     for idx, (layer, at) in enumerate(zip(scores, positions))]
            keys, guarded = [key for key, _ in pairs], [guard for _, guard in pairs]
        return keys, self.counts(guarded, budget.kept(scores[0].shape[-1]))  # the first layer's length sets it


def _selection_keys(scores: torch.Tensor, positions: torch.Tensor, masks: torch.Tensor | None, budget: Budget,
                    length) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection keys of scores (..., T) (`protected_scores`, masked-out entries below every other) and the same
    with the protected entries at +inf (what counts read: every head keeps them)."""
    key = protected_scores(scores, positions, budget, length)
    if masks is not None:
        key = key.masked_fill(~masks, -torch.inf)  # padding is never preferred to a kept entry
    return key, key.masked_fill(protected(positions, budget, length), torch.inf)


def kept_entries(keys: list[torch.Tensor],
                 counts: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per layer the entries a cut keeps, (B, H, k) indices in position order, k = the layer's largest count, and
    which of them each head attends (B, H, k) bool, None when all: its `count` best selection keys; a head keeping
    fewer holds its next best as masked padding. keys: per layer (B, H, T); counts: per layer (B, H). When every
    layer is of one shape and every head keeps one count, one unordered topk and one sort cut all layers (SmolLM2 at
    4K: 3.5 ms, 11 ms layer by layer); the same entries either way, ties included."""
    if len({key.shape for key in keys}) == 1 and bool((torch.stack(counts) == counts[0].flatten()[0]).all()):
        top = torch.stack(keys).topk(int(counts[0].flatten()[0]), dim=-1, sorted=False).indices
        return [(layer, None) for layer in top.sort(dim=-1).values.unbind(0)]
    kept = []
    for key, count in zip(keys, counts):
        top = key.topk(int(count.max()), dim=-1).indices  # by key: the first `count` of each head are its own
        attended = torch.arange(top.shape[-1], device=top.device) < count[..., None]
        keep, order = top.sort(dim=-1)
        kept.append((keep, attended.gather(-1, order)))
    return kept


UNIFORM = Allocation()


@dataclass(frozen=True)
class AdaKV(Allocation):
    """The heads of a layer share its kv_heads x kept entries by score; each keeps at least its best
    alpha_safeguard x kept (kvpress's default 0.2)."""

    name = "adakv"
    alpha_safeguard: float = 0.2

    def __post_init__(self):
        if not 0 <= self.alpha_safeguard <= 1:
            raise KVPError(f"AdaKV's safeguard is a fraction of each head's budget in [0, 1], got "
                           f"{self.alpha_safeguard}")

    def counts(self, keys: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
        return [self._layer_counts(k, kept) for k in keys]

    def _layer_counts(self, keys: torch.Tensor, kept: int) -> torch.Tensor:
        B, H, T = keys.shape
        kept = min(kept, T)
        safe = max(1, int(kept * self.alpha_safeguard)) if self.alpha_safeguard > 0 and kept > 0 else 0
        selection = keys.float().clone()
        top = selection.topk(safe, dim=-1).indices
        selection.scatter_(-1, top, torch.inf)  # each head's safeguard ranks above every other entry of the layer
        chosen = selection.reshape(B, H * T).topk(H * kept, dim=-1).indices
        return torch.zeros(B, H, dtype=torch.long, device=keys.device).scatter_add_(
            1, chosen // T, torch.ones_like(chosen))


@dataclass(frozen=True)
class Global(Allocation):
    """The model's layers x kv_heads x kept entries go to its best scores, whichever layer and head they are in
    (kvpress KVzipPress with layerwise=False, its default)."""

    name = "global"

    def counts(self, keys: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
        B = keys[0].shape[0]
        heads = [k.shape[1] for k in keys]
        total = sum(h * min(kept, k.shape[-1]) for h, k in zip(heads, keys))
        chosen = torch.cat([k.float().reshape(B, -1) for k in keys], dim=1).topk(total, dim=-1).indices
        owner = torch.cat([torch.arange(h, device=k.device).repeat_interleave(k.shape[-1]) + sum(heads[:i])
                           for i, (h, k) in enumerate(zip(heads, keys))])  # the model-wide head of each entry
        per_head = torch.zeros(B, sum(heads), dtype=torch.long, device=keys[0].device)
        per_head.scatter_add_(1, owner[chosen], torch.ones_like(chosen))
        return list(per_head.split(heads, dim=1))


@dataclass(frozen=True)
class Layerwise(Allocation):
    """The model's layers x kv_heads x kept entries spread over layers by score: layer l gets the share of the
    model's best entries that fall in it, rounded to a whole count per head (largest remainders first, so the total
    stays exact), and each of its heads keeps its own best `count`. A layer's heads keep one count, so every layer
    stays one dense tensor: memory freed without a ragged layout."""

    name = "layer"

    def counts(self, keys: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
        B, H = keys[0].shape[:2]
        lengths = torch.tensor([k.shape[-1] for k in keys], device=keys[0].device)
        chosen = torch.stack([c.sum(1) for c in Global().counts(keys, kept)], dim=1)  # (B, L) entries per layer
        layer_counts = chosen // H
        short = int(lengths.clamp(max=kept).sum()) - layer_counts.sum(1)  # counts per head still to give, < L
        order = (chosen % H).argsort(dim=1, descending=True, stable=True)  # integer remainders: exact ties
        bonus = (torch.arange(len(keys), device=order.device) < short[:, None]).long()
        layer_counts.scatter_add_(1, order, bonus)
        layer_counts = torch.minimum(layer_counts, lengths)
        return [c[:, None].expand(B, H).clone() for c in layer_counts.unbind(1)]


@dataclass(frozen=True)
class Pyramid(Allocation):
    """Layer l's heads keep what kvpress's PyramidKVPress gives layer l (window_size: its SnapKV window; beta: the
    pyramid's steepness); the counts depend on the layer only, never on the scores."""

    name = "pyramid"
    window_size: int = 64
    beta: int = 20

    def __post_init__(self):
        if self.beta < 1 or self.window_size < 0:
            raise KVPError(f"PyramidKV needs beta >= 1 and a window >= 0, got beta={self.beta}, "
                           f"window={self.window_size}")

    def layer_budgets(self, n_layers: int, length: int, kept: int) -> list[int]:
        """Entries per head of each layer for a cache of `length` entries and the uniform `kept`: kvpress's
        `PyramidKVPress.get_layer_budget` at the compression ratio that keeps `kept` (capped at `length`)."""
        from kvpress import PyramidKVPress

        press = PyramidKVPress(compression_ratio=1 - kept / length, window_size=self.window_size, beta=self.beta)
        config = SimpleNamespace(num_hidden_layers=n_layers)  # all get_layer_budget reads of the attention module
        return [min(length, press.get_layer_budget(SimpleNamespace(config=config, layer_idx=layer), length))
                for layer in range(n_layers)]

    def counts(self, keys: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
        length = keys[0].shape[-1]
        budgets = self.layer_budgets(len(keys), length, min(kept, length))
        return [torch.full(k.shape[:2], n, dtype=torch.long, device=k.device) for k, n in zip(keys, budgets)]


@dataclass(frozen=True)
class Threshold(Allocation):
    """KVzap's thresholded form (kvpress DMSPress): an entry is kept when its score reaches one threshold, the same
    for every layer and head, so each head keeps as many entries as the text gives it. The scorer scores its window
    (the newest `window` entries, never evicted) KEEP, above every threshold. The threshold for a budget is
    calibrated, not fitted to the cache: `quantiles` (ascending, evenly spaced levels from 0 to 1) of the scorer's
    scores outside that window (and the sinks) on its training prompts; keeping kept of T entries per head on
    average, F of them kept whatever their score, then means keeping the fraction (kept - F) / (T - F) of the
    others, above the matching quantile."""

    name = "threshold"
    quantiles: tuple[float, ...] = ()
    window: int = DMS_WINDOW

    def too_small(self, kept: int) -> KVPError:
        """The one-line refusal of a budget of `kept` entries per head, below what this form always keeps."""
        return KVPError(f"a thresholded KVzap keeps its newest {self.window} entries, more than a budget of {kept} "
                        f"per head; give a budget of at least {self.window}, or use kvzap_linear / kvzap_mlp")

    def threshold(self, kept: int, length: int, fixed: float | None = None) -> float:
        """The score an entry must reach to be kept, for `kept` of `length` entries per head on average, of which
        `fixed` (default: the window) are kept whatever their score."""
        fixed = self.window if fixed is None else fixed
        if len(self.quantiles) < 2:
            raise KVPError("the thresholded form needs the calibration quantiles of its scorer's weights")
        if kept < min(length, fixed):
            raise self.too_small(kept)
        fraction = (kept - fixed) / max(length - fixed, 1)
        if fraction >= 1:
            return -torch.inf
        return float(np.interp(1 - fraction, np.linspace(0, 1, len(self.quantiles)), self.quantiles))

    def counts(self, keys: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
        """The entries whose key reaches the threshold; those kept whatever their score (the window, scored KEEP;
        the sinks and recent tokens, +inf) count towards the budget."""
        fixed = sum(float((k >= KEEP).sum(-1).float().mean()) for k in keys) / len(keys)
        threshold = self.threshold(kept, keys[0].shape[-1], fixed)
        return [(k >= threshold).sum(-1) for k in keys]


# `--allocation`'s modes (compression/names.py): the budget kept by every head, shared by a layer's heads, or
# drawn by every head from the model's one pool
MODES: dict[str, Allocation] = {HEAD: UNIFORM, "layer": Layerwise(), "model": Global()}


def counts_reference(allocation: Allocation, keys: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
    """Slow, obviously-correct `allocation.counts` for AdaKV, Global and Layerwise (the others take no ranking step):
    AdaKV, per row, each head's safeguard first, then the layer's entries one at a time by key, until kv_heads x
    kept are chosen; Global, per row, every entry of the model sorted by key, the first layers x kv_heads x kept
    counted; Layerwise, per row, Global's count of each layer over its heads, floored, then one more per head to the
    layers of largest remainder (earliest layer first among equals) until the uniform total is reached."""
    if isinstance(allocation, Layerwise):
        chosen = counts_reference(Global(), keys, kept)
        out = [torch.zeros(k.shape[:2], dtype=torch.long) for k in keys]
        for b in range(keys[0].shape[0]):
            heads = keys[0].shape[1]
            entries = [int(c[b].sum()) for c in chosen]
            counts = [n // heads for n in entries]
            target = sum(min(kept, k.shape[-1]) for k in keys)
            by_remainder = sorted(range(len(keys)), key=lambda layer: (-(entries[layer] % heads), layer))
            for layer in by_remainder[:target - sum(counts)]:
                counts[layer] += 1
            for layer, count in enumerate(counts):
                out[layer][b] = min(count, keys[layer].shape[-1])
        return out
    if isinstance(allocation, Global):
        B = keys[0].shape[0]
        out = [torch.zeros(k.shape[:2], dtype=torch.long) for k in keys]
        for b in range(B):
            entries = [(float(k[b, h, t]), layer, h) for layer, k in enumerate(keys) for h in range(k.shape[1])
                       for t in range(k.shape[2])]
            entries.sort(key=lambda e: -e[0])
            total = sum(k.shape[1] * min(kept, k.shape[2]) for k in keys)
            for _, layer, h in entries[:total]:
                out[layer][b, h] += 1
        return out
    if not isinstance(allocation, AdaKV):
        return allocation.counts(keys, kept)
    out = []
    for layer in keys:
        B, H, T = layer.shape
        k = min(kept, T)
        safe = max(1, int(k * allocation.alpha_safeguard)) if allocation.alpha_safeguard > 0 and k > 0 else 0
        counts = torch.zeros(B, H, dtype=torch.long)
        for b in range(B):
            chosen = set()
            for h in range(H):
                order = sorted(range(T), key=lambda t: (-float(layer[b, h, t]), t))
                chosen.update((h, t) for t in order[:safe])
            rest = sorted(((h, t) for h in range(H) for t in range(T) if (h, t) not in chosen),
                          key=lambda ht: -float(layer[b, ht[0], ht[1]]))
            chosen.update(rest[:H * k - len(chosen)])
            for h, _ in chosen:
                counts[b, h] += 1
        out.append(counts)
    return out

"""`KVState`: a model's KV cache plus the true position of every cached entry.

After eviction, heads keep different tokens, so positions are tracked per (batch, head, entry). New tokens get
RoPE positions that continue from `next_position` (the number of tokens ever fed), never from the shrunken
cache length. The cache stays a transformers `DynamicCache`. When the heads of a layer keep different numbers of
entries (compression/allocation.py), the layer's bookkeeping (positions, `masks`) is padded to its largest count,
and the layer itself is a `RaggedLayer` (compression/ragged.py) that holds only the entries its heads keep;
attention reads it padded, the padding masked out. A hybrid model's sliding-window layers are `WindowLayer`s
(compression/window.py): never cut, they hold their last window - 1 entries as the model keeps them; `evicted` names
the other layers, which a budget counts and a cut shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvpolicy.compression.ragged import RaggedLayer, layer_bytes
from kvpolicy.compression.window import WindowLayer
from kvpolicy.errors import KVPError
from kvpolicy.models.attention import AttentionInputs


def cache_from_tensors(layers: list[tuple[torch.Tensor, torch.Tensor]], masks: list[torch.Tensor] | None = None,
                       windows: tuple[int | None, ...] = ()) -> DynamicCache:
    """A DynamicCache holding these per-layer (keys, values), each (B, H, T, d): as they are (no copy), except a
    layer whose mask (B, H, T) leaves entries out, which becomes a `RaggedLayer` holding the masked-in ones only, and
    a layer with a sliding window in `windows` (one per layer, None: full attention; empty: none), a `WindowLayer`."""
    cache = DynamicCache()
    for idx, (keys, values) in enumerate(layers):
        if windows and windows[idx] is not None:
            cache.layers.append(WindowLayer.holding(windows[idx], keys, values))
            continue
        if masks is not None and not bool(masks[idx].all()):
            cache.layers.append(RaggedLayer.from_padded(keys, values, masks[idx]))
            continue
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def gather_entries(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each x (B, H, T, d) of `tensors` (a layer's keys and values) at the entries keep (B, H, k) of each row and head
    -> (B, H, k, d).

    One index_select of whole (d,) rows over the flattened (B·H·T, d) tensor, the row indices computed once for all:
    2.4x faster than advanced indexing x[b, h, keep] and 4x faster than gather with an expanded index (SmolLM2's
    keys at 2K, this CPU)."""
    b, h, t, _ = tensors[0].shape
    rows = (torch.arange(b * h, device=keep.device).reshape(b, h, 1) * t + keep).reshape(-1)
    return tuple(x.reshape(b * h * t, x.shape[-1]).index_select(0, rows).reshape(b, h, -1, x.shape[-1])
                 for x in tensors)


def shared_cache(cache: DynamicCache) -> DynamicCache:
    """A DynamicCache whose layers hold the same tensors as `cache`'s (appending to one leaves the other as it
    was)."""
    shared = DynamicCache()
    for layer in cache.layers:
        if isinstance(layer, RaggedLayer):
            shared.layers.append(layer.shared())
        elif isinstance(layer, WindowLayer):
            shared.layers.append(WindowLayer.holding(layer.sliding_window, layer.keys, layer.values))
        else:
            shared.layers.extend(cache_from_tensors([(layer.keys, layer.values)]).layers)
    return shared


@dataclass
class KVState:
    """A KV cache with true positions.

    cache: DynamicCache, layer l holds keys/values (B, H, T, d), keys after RoPE.
    positions: per layer (B, H, T) int64, ascending along T, the true position of each entry.
    next_position: RoPE position of the next token = number of tokens ever fed (not the cache length).
    recorded: per layer `AttentionInputs` of the latest chunk (only when a prefill recorded them), or None.
    logits: (B, vocab) next-token logits after the last fed token, or None before any token.
    ids: (B, T) int64, every token fed, in order, while the cache holds every one of them (positions 0..T-1 in every
        head); None once an eviction (or anything else) has dropped entries, or for a state built without them. Only
        scorers that re-read the cached text need it (`Scorer.reads_text`).
    masks: per layer (B, H, T) bool, True = the entry is attended, False = padding that attention skips; None when
        every entry is attended (every head of a layer keeps the same count).
    offsets: (B,) int64, how many positions each row is behind next_position, for rows of prompts of different
        lengths decoded as one batch (`stack_states`); None when every row is at next_position.
    The engine never writes into cache tensors in place (appending makes new tensors), so states that share
    tensors cannot disturb each other.
    """

    cache: DynamicCache
    positions: list[torch.Tensor]
    next_position: int = 0
    recorded: list[AttentionInputs] | None = None
    logits: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    masks: list[torch.Tensor] | None = None
    offsets: torch.Tensor | None = None

    @classmethod
    def empty(cls, windows: tuple[int | None, ...] = ()) -> KVState:
        """A state with no entry yet; windows: each layer's sliding window (None: full attention), as
        `ModelInfo.layer_windows` (empty: no layer slides, the layers are made as the model fills them)."""
        cache = DynamicCache()
        cache.layers = [WindowLayer(w) if w is not None else DynamicLayer() for w in windows]
        return cls(cache=cache, positions=[])

    @property
    def n_layers(self) -> int:
        return len(self.cache.layers)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention), or () when no layer slides."""
        windows = tuple(layer.sliding_window if isinstance(layer, WindowLayer) else None for layer in self.cache.layers)
        return windows if any(w is not None for w in windows) else ()

    @property
    def evicted(self) -> list[int]:
        """The layers eviction cuts: every layer but the sliding-window ones, which keep their window as they are."""
        return [i for i, layer in enumerate(self.cache.layers) if not isinstance(layer, WindowLayer)]

    @property
    def length(self) -> int:
        """Cached entries per head of the first evicted layer (of every evicted layer unless an adaptive allocation cut
        it); the new tokens' cache_position counts from it."""
        return self.cache.layers[self.evicted[0]].get_seq_length() if self.n_layers else 0

    def lengths(self) -> list[int]:
        """Cached entries per head of each layer, padding included."""
        return [p.shape[-1] for p in self.positions]

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of layer `idx`, each (B, H, T, d) (a ragged layer's padded with zeros, built anew)."""
        return self.cache.layers[idx].keys, self.cache.layers[idx].values

    def nbytes(self) -> int:
        """Bytes of the keys and values the cache holds over all layers (ragged layers hold no padding; positions
        and masks are bookkeeping, not counted)."""
        return sum(map(layer_bytes, self.cache.layers))

    def attended(self) -> float:
        """Entries attended per KV head, averaged over the evicted layers, rows and heads (the length when nothing is
        masked): what a budget counts."""
        if self.masks is None:
            return float(self.length)
        evicted = self.evicted
        rows, heads = self.masks[0].shape[:2]
        return sum(int(self.masks[i].sum()) for i in evicted) / (len(evicted) * rows * heads)  # exact counts

    def nbytes_at(self, entries: int) -> int:
        """Bytes the cache would hold with `entries` entries attended per KV head (e.g. a whole prompt's, which a
        chunked prefill never held): its evicted layers' bytes per attended entry, times `entries`, plus what its
        sliding-window layers hold (the same for any prompt longer than their window)."""
        evicted = set(self.evicted)
        held = [layer_bytes(layer) for i, layer in enumerate(self.cache.layers) if i in evicted]
        windows = self.nbytes() - sum(held)
        return windows + round(sum(held) / self.attended() * entries)

    def next_positions(self) -> int | torch.Tensor:
        """The position of each row's next token: next_position, or (B, 1, 1) when rows differ (`offsets`), which
        broadcasts against positions (B, H, T)."""
        return self.next_position if self.offsets is None else (self.next_position - self.offsets).view(-1, 1, 1)

    def update_from(self, other: KVState) -> None:
        """Become `other` (for functions that advance a caller's state in place)."""
        self.__dict__.update(other.__dict__)

    def branch(self) -> KVState:
        """A new state sharing this one's tensors: appending to either leaves the other as it was."""
        return KVState(
            cache=shared_cache(self.cache),
            positions=list(self.positions),
            next_position=self.next_position,
            recorded=list(self.recorded) if self.recorded is not None else None,
            logits=self.logits,
            ids=self.ids,
            masks=list(self.masks) if self.masks is not None else None,
            offsets=self.offsets,
        )

    def rows(self, index: list[int]) -> KVState:
        """The state of batch rows `index` (in that order): keys/values (len(index), H, T, d) and every per-row
        field selected alike; recorded attention inputs are dropped."""
        select = torch.tensor(index, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, select.to(t.device))

        masks = [pick(m) for m in self.masks] if self.masks is not None else None
        return KVState(
            cache=cache_from_tensors([(pick(k), pick(v)) for k, v in map(self.layer, range(self.n_layers))], masks,
                                     self.windows),
            positions=[pick(p) for p in self.positions],
            next_position=self.next_position,
            logits=pick(self.logits),
            ids=pick(self.ids),
            masks=masks,
            offsets=pick(self.offsets),
        )

    def clone(self) -> KVState:
        """A deep copy: no tensor is shared with this state."""
        return KVState(
            cache=cache_from_tensors([(k.clone(), v.clone()) for k, v in map(self.layer, range(self.n_layers))],
                                     self.masks, self.windows),
            positions=[p.clone() for p in self.positions],
            next_position=self.next_position,
            recorded=[r.clone() for r in self.recorded] if self.recorded is not None else None,
            logits=self.logits.clone() if self.logits is not None else None,
            ids=self.ids.clone() if self.ids is not None else None,
            masks=[m.clone() for m in self.masks] if self.masks is not None else None,
            offsets=self.offsets.clone() if self.offsets is not None else None,
        )


def stack_states(states: list[KVState], pad: bool = False) -> KVState:
    """One state whose batch rows are `states`' rows in order, e.g. the cuts of one cache by several scorers at
    one budget, so that they decode as a single batch: keys/values (ΣB, H, T, d), positions (ΣB, H, T).

    Every state must hold the same number of entries per head in each layer, unless `pad`: then each layer is as
    long as its longest state's, a shorter state's entries are followed by zero keys and values masked out (their
    positions repeat its last), so that cuts of any shapes (adaptive allocations, other budgets) decode together,
    each row attending to its own entries only; with `pad` the states may also have fed different numbers of tokens
    (prompts of different lengths): each row's new tokens then continue from its own next position (`offsets`).
    Recorded attention inputs are dropped, and the token ids are kept (ΣB, T) only when every state has them and
    nothing is padded. Masks (ΣB, H, T) are kept when any state has them or a row is padded (True for the entries of
    rows without them)."""
    if not states:
        raise KVPError("stack_states needs at least one state")
    first = states[0]
    if any(s.n_layers != first.n_layers for s in states) or (not pad and any(
            s.lengths() != first.lengths() or s.next_position != first.next_position for s in states)):
        raise KVPError("only states with equal cache lengths, layers and next positions can be stacked (or pad=True)")
    if any(s.logits is None for s in states):
        raise KVPError("stack_states needs prefilled states (with next-token logits)")
    windows = first.windows
    if windows and any(s.lengths()[i] != first.lengths()[i] for s in states for i, w in enumerate(windows) if w):
        whole = min(w for w in windows if w) - 1
        raise KVPError(f"rows of a model with sliding-window layers decode together only when each holds a whole "
                       f"window (prompts of at least {whole} tokens) or all have one length; run the others one at a "
                       "time")
    widths = [max(s.lengths()[i] for s in states) for i in range(first.n_layers)]
    padded = any(s.lengths() != widths for s in states)

    def extend(t: torch.Tensor, width: int, fill: torch.Tensor | float) -> torch.Tensor:
        """t (..., T, *) grown to `width` entries along T (dim 2) with `fill`."""
        missing = width - t.shape[2]
        if not missing:
            return t
        shape = (*t.shape[:2], missing, *t.shape[3:])
        tail = fill.expand(shape) if isinstance(fill, torch.Tensor) else t.new_full(shape, fill)
        return torch.cat([t, tail], dim=2)

    def mask(s: KVState, i: int) -> torch.Tensor:
        own = s.masks[i] if s.masks is not None else torch.ones_like(s.positions[i], dtype=torch.bool)
        return extend(own, widths[i], False)

    layers = [
        (torch.cat([extend(s.layer(i)[0], widths[i], 0.0) for s in states]),
         torch.cat([extend(s.layer(i)[1], widths[i], 0.0) for s in states]))
        for i in range(first.n_layers)
    ]
    positions = [torch.cat([extend(s.positions[i], widths[i], s.positions[i][..., -1:]) for s in states])
                 for i in range(first.n_layers)]
    logits = torch.cat([s.logits for s in states])
    ids = torch.cat([s.ids for s in states]) if all(s.ids is not None for s in states) and not padded else None
    masks = None
    if padded or any(s.masks is not None for s in states):
        masks = [torch.cat([mask(s, i) for s in states]) for i in range(first.n_layers)]
    last = max(s.next_position for s in states)
    behind = [torch.full(s.positions[0].shape[:1], last, dtype=torch.long) - s.next_position
              + (0 if s.offsets is None else s.offsets.cpu()) for s in states]
    offsets = torch.cat(behind).to(positions[0].device) if any(b.any() for b in behind) else None
    ids = ids if offsets is None else None
    return KVState(cache_from_tensors(layers, masks, windows), positions, last, None, logits, ids, masks, offsets)
